"""PAD weight composition, shared by the MoE expert linears and DY-Conv.

    W_eff(e) = lambda_d * M * W_e + lambda_s * (1 - M) * W_static

is evaluated as ``W_eff(e) = S + Md * W_e`` with two expert-independent terms computed
once per forward per layer (not once per expert):

    S  = lambda_s * (1 - M) * W_static        Md = lambda_d * M

Each expert then needs a single fused ``addcmul`` pass, and :class:`ComposedLinear`
recomputes ``W_eff`` in backward instead of keeping it alive, so the activation memory
a PAD expert adds is the two shared terms per layer, not weight-sized tensors per expert.

Because S and Md are ordinary autograd tensors built from ``W_static``, ``phi`` and a
float view of the mask, the gradient that reaches that float mask is exactly

    dL/dM = sum_e dL/dW_eff(e) * (lambda_d * W_e - lambda_s * W_static)

which is the IMP sensitivity (PAD_SPEC section 4). Partitioning reads it from a hook on
that tensor (see :meth:`PADUnit.mask_view`), with no extra forward or backward pass.
"""
from __future__ import annotations

from typing import Callable, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

LAMBDA_MODES = ("both", "s", "d", "none", "prune")


def check_lambda_mode(mode: str) -> str:
    if mode not in LAMBDA_MODES:
        raise ValueError(f"lambda_mode={mode!r} is not one of {LAMBDA_MODES}: use 'both' (the paper's default, "
                         f"learn lambda_d = 2*sigmoid(phi), lambda_s = 2 - lambda_d), 's', 'd', 'none' or 'prune'")
    return mode


class ComposedLinear(torch.autograd.Function):
    """``y = x @ (S + Md * W).T + b`` without saving the composed weight for backward.

    ``lam_d`` (optional 0-d tensor) is the scalar inside a *detached* ``Md = lam_d * M``: its
    gradient ``sum(dL/dW_eff * M * W)`` is then a dot product per expert instead of a
    weight-sized ``dL/dMd`` that autograd would add up over experts. The partitioner needs
    that full ``dL/dMd`` (it carries ``dL/dM``), so while it scores, ``Md`` keeps its graph and
    ``lam_d`` is None.
    """

    @staticmethod
    def forward(ctx, x: Tensor, weight: Tensor, bias: Optional[Tensor], static: Tensor, mdyn: Tensor,
                lam_d: Optional[Tensor] = None) -> Tensor:
        composed = torch.addcmul(static, mdyn, weight)
        ctx.save_for_backward(x, weight, static, mdyn, lam_d)
        ctx.has_bias = bias is not None
        return F.linear(x, composed, bias)

    @staticmethod
    def backward(ctx, grad_out: Tensor):
        x, weight, static, mdyn, lam_d = ctx.saved_tensors
        need_x, need_w, need_b, need_s, need_m, need_lam = ctx.needs_input_grad
        grad_x = grad_w = grad_b = grad_s = grad_m = grad_lam = None
        g2 = grad_out.reshape(-1, grad_out.shape[-1])
        if need_x:
            grad_x = grad_out.matmul(torch.addcmul(static, mdyn, weight))
        if need_w or need_s or need_m or need_lam:
            grad_composed = g2.t().matmul(x.reshape(-1, x.shape[-1]))
            if need_w or need_lam:
                grad_w = grad_composed * mdyn
            if need_lam:
                # sum(G * M * W) = <G * Md, W> / lam_d; lam_d = 2 sigmoid(phi) > 0 (0 only if phi < -88)
                grad_lam = _dot(grad_w, weight) / lam_d
                grad_w = grad_w if need_w else None
            if need_m:
                grad_m = grad_composed * weight
            if need_s:
                grad_s = grad_composed
        if need_b and ctx.has_bias:
            grad_b = g2.sum(0)
        return grad_x, grad_w, grad_b, grad_s, grad_m, grad_lam


def _dot(a: Tensor, b: Tensor) -> Tensor:
    if a.dtype in (torch.float16, torch.bfloat16):
        return (a.float() * b.float()).sum()
    return torch.dot(a.reshape(-1), b.reshape(-1))


def composed_linear(x: Tensor, weight: Tensor, bias: Optional[Tensor], static: Tensor, mdyn: Tensor,
                    lam_d: Optional[Tensor] = None) -> Tensor:
    return ComposedLinear.apply(x, weight, bias, static, mdyn, lam_d)


def lambda_pair(mode: str, phi: Tensor) -> Tuple[Tensor, Tensor]:
    """(lambda_d, lambda_s) for a lambda mode; ``phi`` is the layer's 0-d learnable scalar."""
    one = torch.ones((), dtype=phi.dtype, device=phi.device)
    learned = 2 * torch.sigmoid(phi)
    if mode == "both":
        return learned, 2 - learned
    if mode == "s":
        return one, learned
    if mode == "d":
        return learned, one
    if mode == "none":
        return one, one
    return one, torch.zeros_like(one)  # prune: the static part is dropped


ScoreSink = Callable[[nn.Module, Tensor], None]


class PADUnit(nn.Module):
    """The replicated half of one PAD weight: ``W_static``, the mask and ``phi``.

    The dynamic factors (expert weights, DY-Conv kernels) live elsewhere; for MoE they
    are inside DeepSpeed's expert modules so that DeepSpeed shards and reduces them.
    ``mask`` is a bool buffer (1 = dynamic) shared by all factors; with per-expert masks
    (``shared_mask=False``) each factor owner registers its own and this one is absent.
    """

    def __init__(self, static_weight: Tensor, lambda_mode: str = "both", shared_mask: bool = True,
                 name: str = "") -> None:
        super().__init__()
        self.lambda_mode = check_lambda_mode(lambda_mode)
        self.name = name
        weight = static_weight.detach().clone()
        if lambda_mode == "prune":
            # The pruning baseline has no static part; keep the tensor for accounting only.
            self.register_buffer("static_weight", weight)
        else:
            self.static_weight = nn.Parameter(weight)
        # Shape (1,), not 0-d: DeepSpeed's parameter broadcast views every tensor as bytes.
        phi = torch.zeros(1, dtype=weight.dtype, device=weight.device)
        if lambda_mode in ("both", "s", "d"):
            self.phi = nn.Parameter(phi)
        else:
            self.register_buffer("phi", phi)
        self.shared_mask = shared_mask
        if shared_mask:
            self.register_buffer("mask", torch.ones(weight.shape, dtype=torch.bool, device=weight.device))
        # Set by the partitioner while it collects sensitivities: called with (mask owner, dL/dM).
        self.score_sink: Optional[ScoreSink] = None
        self._held: Optional[Tuple[Tensor, Tensor, Optional[Tensor]]] = None

    @property
    def weight_shape(self) -> torch.Size:
        return self.static_weight.shape

    def lambdas(self) -> Tuple[Tensor, Tensor]:
        """(lambda_d, lambda_s) as 0-d tensors carrying gradient to ``phi`` where it is learned."""
        return lambda_pair(self.lambda_mode, self.phi.view(()))

    def check_mask(self, mask: Tensor, what: str = "mask") -> Tensor:
        if tuple(mask.shape) != tuple(self.weight_shape):
            raise ValueError(f"{what} for PAD weight {self.name or '<unnamed>'} has shape {tuple(mask.shape)}, "
                             f"expected {tuple(self.weight_shape)} (the shape of one expert's weight)")
        return mask.to(dtype=torch.bool, device=self.static_weight.device)

    def set_mask(self, mask: Tensor) -> None:
        if not self.shared_mask:
            raise ValueError(f"PAD weight {self.name!r} uses per-expert masks (mask_scope='expert'): "
                             "set each expert's mask instead")
        self.mask.copy_(self.check_mask(mask))

    def mask_view(self, mask: Tensor, owner: nn.Module) -> Tensor:
        """A float copy of ``mask``; while scoring, a leaf whose gradient is dL/dM for ``owner``."""
        view = mask.to(self.static_weight.dtype)
        if self.score_sink is not None and torch.is_grad_enabled():
            view.requires_grad_(True)
            sink = self.score_sink
            view.register_hook(lambda grad: sink(owner, grad))
        return view

    def terms(self, mask: Tensor, owner: nn.Module) -> Tuple[Tensor, Tensor]:
        """(S, Md) for one mask: ``S = lambda_s (1-M) W_static`` and ``Md = lambda_d M``, full autograd."""
        lam_d, lam_s = self.lambdas()
        m = self.mask_view(mask, owner)
        static = (1 - m) * self.static_weight * lam_s
        return static, lam_d * m

    def linear_terms(self, mask: Tensor, owner: nn.Module) -> Tuple[Tensor, Tensor, Optional[Tensor]]:
        """(S, Md, lam_d) for :func:`composed_linear`: ``Md`` detached and ``lam_d`` returned when
        only ``phi`` needs its gradient; ``(S, Md, None)`` with ``Md`` in the graph while scoring."""
        if self.score_sink is not None and torch.is_grad_enabled():
            return (*self.terms(mask, owner), None)
        lam_d, lam_s = self.lambdas()
        m = mask.to(self.static_weight.dtype)
        static = (1 - m) * self.static_weight * lam_s
        if not lam_d.requires_grad:
            return static, lam_d * m, None
        return static, lam_d.detach() * m, lam_d

    def shared_terms(self) -> Tuple[Tensor, Tensor]:
        """(S, Md) of the shared mask, full autograd (DY-Conv composes with it)."""
        return self.terms(self.mask, self)

    def shared_linear_terms(self) -> Tuple[Tensor, Tensor, Optional[Tensor]]:
        """The shared mask's :meth:`linear_terms`, cached for one layer forward (see :meth:`hold`)."""
        if self._held is not None:
            return self._held
        return self.linear_terms(self.mask, self)

    def hold(self) -> None:
        """Compute the shared terms once, for every expert of the forward that follows."""
        if self.shared_mask:
            self._held = self.linear_terms(self.mask, self)

    def release(self) -> None:
        # Dropped after every forward so an edited mask or reloaded weight is never served stale.
        self._held = None

    def extra_repr(self) -> str:
        return f"{self.name!r}, shape={tuple(self.weight_shape)}, lambda_mode={self.lambda_mode!r}, " \
               f"mask={'shared' if self.shared_mask else 'per-expert'}"
