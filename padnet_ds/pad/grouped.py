"""The PAD linears of a layer's local experts on contiguous row segments, as one autograd node.

Notation: local experts j = 0..L-1; expert j owns the rows ``x_j = x[o_j : o_j + n_j]`` of
``x`` [N, in] (``o_j = n_0 + ... + n_{j-1}``, any ``n_j`` may be 0), its composition
``W_eff(j) = S_j + Md_j * W_j`` (:class:`~padnet_ds.pad.compose.Composition`; one shared
object when the mask is shared) and its bias ``b_j``. With ``g_j = dL/dy_j``:

    y_j = x_j W_eff(j)^T + b_j        dL/dx_j = g_j W_eff(j)
    G_j = g_j^T x_j = dL/dW_eff(j)    dL/db_j = sum over the rows of g_j

``G_j`` goes to the composition (:meth:`Composition.collect`), which adds it into the
layer sums and returns ``dL/dW_j = Md_j * G_j``: the replicated side (static weight,
lambdas, IMP scores) is what the per-expert ``Composition.linear`` gives, and an expert
with no rows gets zero gradients, as on DeepSpeed's padded buffer.

Why one node: the dispatcher hands over every local expert's filled rows as one buffer with
their group sizes. On CUDA (bf16) one grouped GEMM (``torch.nn.functional.grouped_mm``)
runs each of the three products for all experts, over a ``[L, out, in]`` composed weight;
elsewhere the node loops over the segments, composing each expert into the unit's one
weight-sized workspace and writing straight into one output (torch's CPU grouped kernel
measured no faster than this loop here, bench/README.md, and needs L composed weights).
Either way there are no per-expert autograd nodes, reshapes or concatenations.
"""
from __future__ import annotations

from typing import List, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from .compose import Composition

_GROUPED_MM = getattr(F, "grouped_mm", None)


def grouped_kernel_fits(x: Tensor, weight: Tensor) -> bool:
    """Whether the grouped GEMM kernel is the one to use (CUDA bf16 on sm80+, rows of whole 16-byte units)."""
    aligned = all(n * x.element_size() % 16 == 0 for n in weight.shape)
    return (_GROUPED_MM is not None and x.is_cuda and x.dtype == torch.bfloat16 and aligned
            and torch.cuda.get_device_capability(x.device) >= (8, 0))


def grouped_linear(x: Tensor, comps: Sequence[Composition], weights: Sequence[Tensor],
                   biases: Sequence[Optional[Tensor]], sizes: Sequence[int],
                   kernel: Optional[bool] = None) -> Tensor:
    """``y_j = F.linear(x_j, W_eff(j), b_j)`` for every local expert j, as one [N, out] tensor.

    ``sizes`` are the host-side row counts ``n_j``; ``kernel`` forces the grouped GEMM (True),
    the segment loop (False) or picks by device (None, :func:`grouped_kernel_fits`).
    """
    if not (len(comps) == len(weights) == len(biases) == len(sizes)):
        raise ValueError(f"grouped_linear: {len(comps)} compositions, {len(weights)} weights, {len(biases)} "
                         f"biases and {len(sizes)} sizes: give one of each per local expert")
    if sum(sizes) != x.shape[0]:
        raise ValueError(f"grouped_linear: the group sizes add up to {sum(sizes)} rows, x has {x.shape[0]}")
    has_bias = biases[0] is not None
    if any((b is not None) != has_bias for b in biases):
        raise ValueError("grouped_linear: either every expert linear has a bias or none has")
    use_kernel = grouped_kernel_fits(x, weights[0]) if kernel is None else kernel
    tokens: List[Tensor] = []
    for comp in comps:  # each hub once: autograd runs it after every expert of its layer
        if comp.token is not None and not any(comp.token is t for t in tokens):
            tokens.append(comp.token)
    plan = _Plan(comps, list(sizes), has_bias, len(tokens), use_kernel)
    y = _GroupedExpertLinear.apply(x, plan, *weights, *(biases if has_bias else ()), *tokens)
    for comp in comps:
        if comp.single_use:
            comp.token = None  # the hub's context refers back to the composition: no cycle
    return y


class _Plan:
    """What the grouped node needs besides tensors: compositions, group sizes, layout."""

    def __init__(self, comps: Sequence[Composition], sizes: List[int], has_bias: bool, n_tokens: int,
                 kernel: bool) -> None:
        self.comps = list(comps)
        self.sizes = sizes
        self.bounds = [0]
        for n in sizes:
            self.bounds.append(self.bounds[-1] + n)
        self.has_bias = has_bias
        self.n_tokens = n_tokens
        self.hubbed = [comp.token is not None for comp in comps]  # which experts feed a hub in backward
        self.kernel = kernel

    def segments(self):
        return zip(range(len(self.sizes)), self.bounds[:-1], self.bounds[1:])

    def offsets(self, device: torch.device) -> Tensor:
        # grouped_mm's offs: the end of every group, int32, on the operands' device
        return torch.tensor(self.bounds[1:], dtype=torch.int32, device=device)

    def composed(self, weights: Sequence[Tensor], dtype: torch.dtype) -> Tensor:
        """Every local expert's ``W_eff(j)`` in one [L, out, in] tensor (for the grouped kernel)."""
        stack = torch.empty((len(weights), *weights[0].shape), dtype=weights[0].dtype, device=weights[0].device)
        for j, (comp, w) in enumerate(zip(self.comps, weights)):
            comp.compose(w, out=stack[j])
        return stack.to(dtype)


def _compute_dtype(x: Tensor) -> torch.dtype:
    # Under torch.autocast the GEMMs run in the autocast dtype, as F.linear would run them.
    dev = x.device.type
    return torch.get_autocast_dtype(dev) if torch.is_autocast_enabled(dev) else x.dtype


class _GroupedExpertLinear(torch.autograd.Function):
    """Inputs: ``x`` [N, in], the plan, then L weights, L biases (if any), the hub tokens."""

    @staticmethod
    def forward(ctx, x: Tensor, plan: _Plan, *tensors: Tensor) -> Tensor:
        n = len(plan.sizes)
        weights = tensors[:n]
        biases = tensors[n:2 * n] if plan.has_bias else [None] * n
        low = _compute_dtype(x)
        ctx.plan, ctx.low = plan, low
        ctx.save_for_backward(x, *weights)
        xl = x.to(low)
        out_features = weights[0].shape[0]
        with torch.autocast(x.device.type, enabled=False):
            if plan.kernel:
                # [N, in] x [L, in, out] -> [N, out], group j on rows o_j .. o_j + n_j
                y = _GROUPED_MM(xl, plan.composed(weights, low).transpose(1, 2), offs=plan.offsets(x.device))
                if plan.has_bias:
                    for j, lo, hi in plan.segments():
                        y[lo:hi] += biases[j].to(low)
                return y
            y = x.new_empty((x.shape[0], out_features), dtype=low)
            for j, lo, hi in plan.segments():
                w = plan.comps[j].compose(weights[j]).to(low)
                if plan.has_bias:
                    torch.addmm(biases[j].to(low), xl[lo:hi], w.t(), out=y[lo:hi])
                else:
                    torch.mm(xl[lo:hi], w.t(), out=y[lo:hi])
        return y

    @staticmethod
    def backward(ctx, grad_out: Tensor):
        x, *weights = ctx.saved_tensors
        plan: _Plan = ctx.plan
        n = len(plan.sizes)
        need_x = ctx.needs_input_grad[0]
        need_w = ctx.needs_input_grad[2:2 + n]
        need_b = ctx.needs_input_grad[2 + n:2 + 2 * n] if plan.has_bias else ()
        g = grad_out.contiguous()
        low = g.dtype
        xl = x.to(low)
        grad_x = None
        if plan.kernel:
            offs = plan.offsets(x.device)
            if need_x:
                # [N, out] x [L, out, in] -> [N, in]
                grad_x = _GROUPED_MM(g, plan.composed(weights, low), offs=offs).to(x.dtype)
            # [out, N] x [N, in] -> [L, out, in]: G_j = g_j^T x_j, the group dimension is the sum over rows
            grads = list(_GROUPED_MM(g.t(), xl, offs=offs).to(weights[0].dtype).unbind(0))
        else:
            if need_x:
                grad_x = x.new_empty(x.shape, dtype=low)
            grads = []
            for j, lo, hi in plan.segments():
                if need_x:
                    torch.mm(g[lo:hi], plan.comps[j].compose(weights[j]).to(low), out=grad_x[lo:hi])
                grads.append(g[lo:hi].t().mm(xl[lo:hi]).to(weights[j].dtype))
            if need_x:
                grad_x = grad_x.to(x.dtype)
        grad_w: List[Optional[Tensor]] = []
        for j in range(n):
            grad = plan.comps[j].weight_grad(grads[j], weights[j], plan.hubbed[j])
            grad_w.append(grad if need_w[j] else None)
        grad_b = [g[lo:hi].sum(0) if need_b[j] else None for j, lo, hi in plan.segments()] if plan.has_bias else []
        grad_tokens = [grad_out.new_zeros(0)] * plan.n_tokens
        return (grad_x, None, *grad_w, *grad_b, *grad_tokens)
