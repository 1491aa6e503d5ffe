"""PAD weight composition, shared by the MoE expert linears and DY-Conv.

    W_eff(e) = lambda_d * M * W_e + lambda_s * (1 - M) * W_static

is evaluated as ``W_eff(e) = S + Md * W_e`` with two expert-independent terms computed
once per layer forward (not once per expert):

    S  = lambda_s * (1 - M) * W_static        Md = lambda_d * M

MoE expert linears go through a :class:`Composition` (one per mask and layer forward):
each expert needs one ``addcmul`` into a reused workspace in forward and again in
backward (the composed weight is never kept for backward), and its backward adds
``G_e = dL/dW_eff(e)`` into a per-layer sum instead of returning weight-sized gradients
for ``S`` and ``Md`` that autograd would add up. One ``_Hub`` node per layer, which
autograd runs after every expert of that layer, turns the sums into the gradients of the
replicated side:

    dL/dW_static = lambda_s (1-M) sum_e G_e          dL/dlambda_s = <(1-M) sum_e G_e, W_static>
    dL/dlambda_d = sum_e <G_e M, W_e>                dL/dM = lambda_d sum_e G_e W_e - lambda_s W_static sum_e G_e

The last one is the IMP sensitivity (docs/PAD.md section 4). While a partitioner scores,
the mask enters the hub as a float leaf (:meth:`PADUnit.mask_view`) whose hook receives
``dL/dM``; the experts then also add ``G_e * W_e`` into a second per-layer sum (one
in-place pass per expert), with no extra forward or backward pass.

DY-Conv mixes kernels per sample, not per expert slot, and keeps plain autograd terms
(:meth:`PADUnit.terms`).
"""
from __future__ import annotations

from typing import Callable, List, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

LAMBDA_MODES = ("both", "s", "d", "none", "prune")


def check_lambda_mode(mode: str) -> str:
    if mode not in LAMBDA_MODES:
        raise ValueError(f"lambda_mode={mode!r} is not one of {LAMBDA_MODES}: use 'both' (the paper's default, "
                         f"learn lambda_d = 2*sigmoid(phi), lambda_s = 2 - lambda_d), 's', 'd', 'none' or 'prune'")
    return mode


def flat_dot(a: Tensor, b: Tensor) -> Tensor:
    """``<a, b>`` over all entries (bf16/fp16 inputs summed in fp32)."""
    if a.dtype in (torch.float16, torch.bfloat16):
        return (a.float() * b.float()).sum()
    return torch.dot(a.reshape(-1), b.reshape(-1))


class Composition:
    """One layer forward's composition for one mask, shared by the experts that use the mask.

    Holds ``S``, ``Md`` and ``1 - M`` (computed without autograd) and collects what the
    experts' backward passes contribute to the replicated side; ``token`` is the output of
    the layer's hub node, which every expert takes as an input so that autograd runs the
    hub after all of them. Built by :meth:`PADUnit.composition`.
    """

    def __init__(self, unit: "PADUnit", mask: Tensor, owner: nn.Module, single_use: bool) -> None:
        w_s = unit.static_weight
        lam_d, lam_s = unit.lambdas()
        m = unit.mask_view(mask, owner)  # a leaf with the score hook while scoring
        self.scoring = m.requires_grad
        self.scaled_static: Optional[Tensor] = None  # lambda_s W_static, kept while scoring for dL/dM
        with torch.no_grad():
            self.static_mask = 1 - m
            if self.scoring:
                self.scaled_static = w_s * lam_s
                self.static = self.scaled_static * self.static_mask
            else:
                self.static = torch.mul(w_s, self.static_mask).mul_(lam_s)
            self.mdyn = torch.mul(m, lam_d)
        self.lam_d, self.lam_s = lam_d.detach(), lam_s.detach()
        self.workspace = unit.workspace(w_s.dtype, w_s.device)
        self.learn_lam_d = lam_d.requires_grad
        self.single_use = single_use
        self.gsum: Optional[Tensor] = None       # sum_e G_e
        self.dyn_score: Optional[Tensor] = None  # sum_e G_e * W_e, while scoring
        self.dlam_d: Optional[Tensor] = None
        hub_needed = torch.is_grad_enabled() and (w_s.requires_grad or lam_d.requires_grad or lam_s.requires_grad
                                                  or self.scoring)
        self.token = _Hub.apply(w_s, lam_d, lam_s, m if self.scoring else None, self) if hub_needed else None

    def kept(self) -> List[Tensor]:
        """The weight-sized tensors this composition holds for backward (and the unit's workspace)."""
        held = (self.static, self.mdyn, self.static_mask, self.scaled_static, self.workspace)
        return [t for t in held if t is not None]

    def compose(self, weight: Tensor, out: Optional[Tensor] = None) -> Tensor:
        """``S + Md * W_e`` into ``out``, by default the shared workspace (valid until the next expert composes)."""
        return torch.addcmul(self.static, self.mdyn, weight, out=self.workspace if out is None else out)

    def linear(self, x: Tensor, weight: Tensor, bias: Optional[Tensor]) -> Tensor:
        """``F.linear(x, W_eff, bias)`` for one expert's ``W_e``/``b_e``."""
        return expert_linear(self, x, weight, bias)

    def weight_grad(self, grad: Tensor, weight: Tensor, hubbed: bool) -> Tensor:
        """``dL/dW_e = G_e * Md`` from ``G_e``; through :meth:`collect` when the hub needs the layer sums."""
        return self.collect(grad, weight) if hubbed else grad.mul_(self.mdyn)

    def collect(self, grad: Tensor, weight: Tensor) -> Tensor:
        """Add one expert's ``G_e`` into the layer sums; returns ``G_e * Md`` (= dL/dW_e), in place where possible."""
        if self.scoring:
            if self.dyn_score is None:
                self.dyn_score = grad * weight
            else:
                self.dyn_score.addcmul_(grad, weight)
        if self.gsum is None:
            self.gsum = grad
            grad = grad * self.mdyn
        else:
            self.gsum.add_(grad)
            grad.mul_(self.mdyn)
        if self.learn_lam_d and not self.scoring:  # while scoring, the hub reads it off the score sum
            # sum(G * M * W) = <G * Md, W> / lambda_d; lambda_d = 2 sigmoid(phi) > 0 (0 only if phi < -88)
            d = flat_dot(grad, weight) / self.lam_d
            self.dlam_d = d if self.dlam_d is None else self.dlam_d + d
        return grad


def expert_linear(comp, x: Tensor, own: Tensor, bias: Optional[Tensor]) -> Tensor:
    """One expert linear through composition ``comp`` (dense or packed; ``own`` is its ``W_e`` or ``v_e``).

    Without autograd (eval, no hub) a plain ``F.linear`` on the composed weight; otherwise
    :class:`_ExpertLinear`, which recomposes in backward instead of keeping ``W_eff``.
    """
    if comp.token is None and not (torch.is_grad_enabled() and (x.requires_grad or own.requires_grad)):
        y = F.linear(x, comp.compose(own), bias)
    else:
        y = _ExpertLinear.apply(x, own, bias, comp.token, comp)
    if comp.single_use:
        comp.token = None  # the hub's context refers back to the composition: do not keep a cycle alive
    return y


class _Hub(torch.autograd.Function):
    """Per layer: (W_static, lambda_d, lambda_s, float mask leaf) -> an empty token for the experts."""

    @staticmethod
    def forward(ctx, static_weight: Tensor, lam_d: Tensor, lam_s: Tensor, mask_leaf: Optional[Tensor],
                comp: Composition) -> Tensor:
        ctx.comp = comp
        ctx.save_for_backward(static_weight)
        return static_weight.new_empty(0)

    @staticmethod
    def backward(ctx, _):
        (w_s,) = ctx.saved_tensors
        comp: Composition = ctx.comp
        need_ws, need_ld, need_ls, need_m, _ = ctx.needs_input_grad
        g, comp.gsum = comp.gsum, None
        if g is None:  # no expert of this layer ran backward
            return None, None, None, None, None
        grad_m = grad_ld = grad_ls = None
        if comp.scoring and comp.learn_lam_d:
            # dL/dlambda_d = sum_e <G_e M, W_e> = <M, sum_e G_e W_e>: one dot per layer instead of one per expert
            comp.dlam_d = flat_dot(comp.dyn_score, comp.mdyn) / comp.lam_d
        if need_m:
            grad_m = comp.dyn_score.mul_(comp.lam_d).addcmul_(g, comp.scaled_static, value=-1)
            comp.dyn_score = None
        if need_ld and comp.dlam_d is not None:
            grad_ld = comp.dlam_d.to(comp.lam_d.dtype).reshape(comp.lam_d.shape)
        comp.dlam_d = None
        g.mul_(comp.static_mask)
        if need_ls:
            grad_ls = flat_dot(g, w_s).to(comp.lam_s.dtype).reshape(comp.lam_s.shape)
        grad_ws = g.mul_(comp.lam_s) if need_ws else None
        return grad_ws, grad_ld, grad_ls, grad_m, None


class _ExpertLinear(torch.autograd.Function):
    """``y = x @ W_eff(e).T + b_e``, saving only ``x`` and the expert's own tensor for backward.

    ``own`` is ``W_e`` (dense, :class:`Composition`) or ``v_e`` (packed,
    ``pad.packed.PackedComposition``); the composition composes ``W_eff(e)`` from it and turns
    ``G_e = dL/dW_eff(e)`` into its gradient (``weight_grad``).
    """

    @staticmethod
    def forward(ctx, x: Tensor, own: Tensor, bias: Optional[Tensor], token: Optional[Tensor], comp) -> Tensor:
        ctx.comp = comp
        ctx.has_bias = bias is not None
        ctx.x_shape = x.shape
        # As one matrix: a non-contiguous expert chunk (DeepSpeed's dispatch) would otherwise go
        # through bmm, slower than the single GEMM nn.Linear gets (and copy again in backward).
        x2 = x.reshape(-1, x.shape[-1])  # [rows, in]
        ctx.save_for_backward(x2, own)
        y = F.linear(x2, comp.compose(own), bias)
        return y.view(*x.shape[:-1], y.shape[-1])

    @staticmethod
    def backward(ctx, grad_out: Tensor):
        x2, own = ctx.saved_tensors
        comp = ctx.comp
        need_x, need_own, need_b, need_hub, _ = ctx.needs_input_grad
        grad_x = grad_own = grad_b = grad_token = None
        g2 = grad_out.reshape(-1, grad_out.shape[-1])  # [rows, out]
        # Under torch.autocast the forward GEMM ran in a lower precision than the weights; the
        # backward GEMMs run in it too (the casts are no-ops otherwise).
        low = grad_out.dtype
        if need_x:
            grad_x = g2.mm(comp.compose(own).to(low)).to(x2.dtype).view(ctx.x_shape)
        if need_own or need_hub:
            grad = g2.t().mm(x2.to(low)).to(own.dtype)  # G_e = dL/dW_eff(e), [out, in]
            grad = comp.weight_grad(grad, own, need_hub)
            grad_own = grad if need_own else None
            if need_hub:
                grad_token = grad_out.new_zeros(0)
        if need_b and ctx.has_bias:
            grad_b = g2.sum(0)
        return grad_x, grad_own, grad_b, grad_token, None


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
        self._register_static("static_weight", weight)
        # Shape (1,), not 0-d: DeepSpeed's parameter broadcast views every tensor as bytes.
        self._register_phi(torch.zeros(1, dtype=weight.dtype, device=weight.device))
        self.shared_mask = shared_mask
        if shared_mask:
            self.register_buffer("mask", torch.ones(weight.shape, dtype=torch.bool, device=weight.device))
        # Set by the partitioner while it collects sensitivities: called with (mask owner, dL/dM).
        self.score_sink: Optional[ScoreSink] = None
        self._held: Optional[Composition] = None

    def _register_static(self, name: str, static: Tensor) -> None:
        if self.lambda_mode == "prune":
            # The pruning baseline has no static part; keep the tensor for accounting only.
            self.register_buffer(name, static)
        else:
            setattr(self, name, nn.Parameter(static))

    def _register_phi(self, phi: Tensor) -> None:
        if self.lambda_mode in ("both", "s", "d"):
            self.phi = nn.Parameter(phi)
        else:
            self.register_buffer("phi", phi)

    @property
    def weight_shape(self) -> torch.Size:
        return self.static_weight.shape

    def lambdas(self) -> Tuple[Tensor, Tensor]:
        """(lambda_d, lambda_s) as 0-d tensors carrying gradient to ``phi`` where it is learned."""
        return lambda_pair(self.lambda_mode, self.phi.view(()))

    def _shared_only(self) -> None:
        if not self.shared_mask:
            raise ValueError(f"PAD weight {self.name!r} uses per-expert masks (mask_scope='expert'): ask the layer "
                             "for its experts' ratios")

    def dynamic_ratio(self) -> float:
        """Fraction of the shared mask's entries that are dynamic."""
        self._shared_only()
        return int(torch.count_nonzero(self.mask)) / self.mask.numel()

    def check_mask(self, mask: Tensor, what: str = "mask") -> Tensor:
        if tuple(mask.shape) != tuple(self.weight_shape):
            raise ValueError(f"{what} for PAD weight {self.name or '<unnamed>'} has shape {tuple(mask.shape)}, "
                             f"expected {tuple(self.weight_shape)} (the shape of one expert's weight)")
        return mask.to(dtype=torch.bool, device=self.phi.device)

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

    def shared_terms(self) -> Tuple[Tensor, Tensor]:
        """(S, Md) of the shared mask, full autograd (DY-Conv composes with it)."""
        return self.terms(self.mask, self)

    def composition(self, owner: Optional[nn.Module] = None) -> Composition:
        """The :class:`Composition` for ``owner``'s mask (default: the shared mask, held by :meth:`hold`)."""
        mask = getattr(owner, "mask", None) if owner is not None else None
        if mask is None or owner is self:
            if not self.shared_mask:
                raise ValueError(f"PAD weight {self.name!r} uses per-expert masks: pass the expert linear as owner")
            if self._held is not None:
                return self._held
            return Composition(self, self.mask, self, single_use=True)
        return Composition(self, mask, owner, single_use=True)

    def hold(self) -> None:
        """Compose the shared terms once, for every expert of the forward that follows."""
        if self.shared_mask:
            self._held = Composition(self, self.mask, self, single_use=False)

    def release(self) -> None:
        # Dropped after every forward so an edited mask or reloaded weight is never served stale.
        if self._held is not None:
            self._held.token = None
        self._held = None

    def static_tensor(self) -> Tensor:
        """The static weight as stored (a parameter, or a buffer in ``prune`` mode)."""
        return self.static_weight

    def workspace(self, dtype: torch.dtype, device: torch.device) -> Tensor:
        """A weight-sized scratch tensor kept across steps: composing into fresh multi-MB tensors
        costs page faults on CPU every step."""
        ws = self.__dict__.get("_workspace")
        if ws is None or ws.shape != self.weight_shape or ws.dtype != dtype or ws.device != device:
            ws = torch.empty(self.weight_shape, dtype=dtype, device=device)
            self.__dict__["_workspace"] = ws
        return ws

    def scratch(self, numel: int, dtype: torch.dtype, device: torch.device) -> Tensor:
        """A flat scratch tensor of at least ``numel`` entries kept across steps (as :meth:`workspace`)."""
        buf = self.__dict__.get("_scratch")
        if buf is None or buf.numel() < numel or buf.dtype != dtype or buf.device != device:
            buf = torch.empty(numel, dtype=dtype, device=device)
            self.__dict__["_scratch"] = buf
        return buf

    def extra_repr(self) -> str:
        return f"{self.name!r}, shape={tuple(self.weight_shape)}, lambda_mode={self.lambda_mode!r}, " \
               f"mask={'shared' if self.shared_mask else 'per-expert'}"
