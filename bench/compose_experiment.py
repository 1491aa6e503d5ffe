"""EXPERIMENT (not used by the package): a cheaper PAD composition for the MoE expert linears.

    python -m bench.compose_experiment [--quick] [--shapes h256,h768]

What ``padnet_ds.pad.compose`` does today, per PAD linear and step: ``S`` and ``Md`` are built
with autograd (float mask copy, ``(1-m)``, ``*W_static``, ``*lambda_s``, ``lambda_d*m``: five
weight-sized tensors kept for backward), and each expert's ``ComposedLinear`` returns gradients
for ``S`` and ``Md`` that autograd accumulates across experts. Per expert backward that is:
recompose (addcmul), ``G*Md``, ``G*W_e`` (only to reach the scalar phi), and two weight-sized
accumulations; then the per-layer backward of the S/Md graph.

This variant (``fast``):
- builds ``S = lambda_s (1-M) W_static`` and ``Md = lambda_d M`` without autograd, once per layer
  forward, and keeps these and ``1-M`` per layer (float multiplies: ``torch.where``/``masked_fill``
  on a bool mask are about 40x slower than a float multiply on this CPU build);
- one ``Hub`` autograd node per layer takes (W_static, phi) and hands every expert a 0-size token;
  the experts' backward accumulate ``sum_e G_e`` and ``dL/dlambda_d`` into the layer's context, and
  the hub's backward (which autograd runs after all experts) turns them into the gradients of
  W_static and phi: ``grad W_s = lambda_s (1-M) sum_e G_e``, ``dL/dlambda_s = <(1-M) sum_e G_e, W_s>``,
  ``dL/dlambda_d = sum_e <G_e M, W_e>`` (a dot product, read-only, instead of a weight-sized ``G*W_e``);
- per expert: forward ``addcmul(S, Md, W_e, out=buf)`` into one reused buffer per layer; backward
  recompose into the same buffer, ``G = g^T x``, ``sum.add_(G)``, ``G.mul_(Md)`` in place (G becomes
  the expert's gradient), one dot for lambda_d.
Limits of the experiment: lambda_mode 'both' and shared masks only; IMP scoring (``score_sink``)
needs dL/dM and would keep the current path.
"""
from __future__ import annotations

import types
from typing import Any, Dict, Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from . import common


class LayerCtx:
    def __init__(self, unit) -> None:
        with torch.no_grad():
            phi = unit.phi.view(())
            self.lam_d = 2 * torch.sigmoid(phi)
            self.lam_s = 2 - self.lam_d
            w_s = unit.static_weight
            # Float arithmetic, not torch.where / masked_fill: on this CPU build the bool-mask kernels
            # are ~40x slower than a float multiply of the same size (bench/README.md).
            self.keep_static = 1 - unit.mask.to(w_s.dtype)          # (1 - M), needed again in backward
            self.static = w_s * self.keep_static
            self.static.mul_(self.lam_s)
            self.mdyn = unit.mask.to(w_s.dtype).mul_(self.lam_d)
        self.buf = torch.empty_like(w_s)
        self.gsum: Optional[Tensor] = None
        self.dlam_d = torch.zeros((), dtype=w_s.dtype)


class Hub(torch.autograd.Function):

    @staticmethod
    def forward(ctx, static_weight: Tensor, phi: Tensor, lctx: LayerCtx) -> Tensor:
        ctx.lctx = lctx
        ctx.save_for_backward(static_weight, phi)
        return static_weight.new_empty(0)

    @staticmethod
    def backward(ctx, _):
        w_s, phi = ctx.saved_tensors
        l: LayerCtx = ctx.lctx
        grad_ws = grad_phi = None
        if l.gsum is not None:
            g = l.gsum.mul_(l.keep_static)
            dlam_s = torch.dot(g.view(-1), w_s.reshape(-1))
            grad_ws = g.mul_(l.lam_s) if ctx.needs_input_grad[0] else None
            sig = l.lam_d / 2
            grad_phi = ((l.dlam_d - dlam_s) * 2 * sig * (1 - sig)).reshape(phi.shape)
            l.gsum = None
        return grad_ws, grad_phi, None


class FastLinear(torch.autograd.Function):

    @staticmethod
    def forward(ctx, x: Tensor, weight: Tensor, bias: Optional[Tensor], token: Tensor, lctx: LayerCtx) -> Tensor:
        composed = torch.addcmul(lctx.static, lctx.mdyn, weight, out=lctx.buf)
        ctx.lctx = lctx
        ctx.has_bias = bias is not None
        ctx.save_for_backward(x, weight)
        return F.linear(x, composed, bias)

    @staticmethod
    def backward(ctx, grad_out: Tensor):
        x, weight = ctx.saved_tensors
        l: LayerCtx = ctx.lctx
        need_x, need_w, need_b, _, _ = ctx.needs_input_grad
        grad_x = grad_w = grad_b = None
        g2 = grad_out.reshape(-1, grad_out.shape[-1])
        if need_x:
            grad_x = grad_out.matmul(torch.addcmul(l.static, l.mdyn, weight, out=l.buf))
        x2 = x.reshape(-1, x.shape[-1])
        if l.gsum is None:
            l.gsum = torch.mm(g2.t(), x2)
            g = torch.mul(l.gsum, l.mdyn)
        else:
            g = torch.mm(g2.t(), x2)
            l.gsum.add_(g)
            g.mul_(l.mdyn)
        l.dlam_d = l.dlam_d + torch.dot(g.view(-1), weight.reshape(-1)) / l.lam_d
        if need_w:
            grad_w = g
        if need_b and ctx.has_bias:
            grad_b = g2.sum(0)
        return grad_x, grad_w, grad_b, grad_out.new_zeros(0), None


def _fast_linear_forward(self, x: Tensor) -> Tensor:
    unit = self.__dict__["unit"]
    lctx, token = unit.__dict__["_fast"]
    return FastLinear.apply(x, self.weight, self.bias, token, lctx)


def _fast_layer_forward(self, hidden_states: Tensor, used_token: Optional[Tensor] = None):
    from deepspeed.moe.layer import MoE

    for unit in self.pad_linears():
        lctx = LayerCtx(unit)
        token = Hub.apply(unit.static_weight, unit.phi, lctx)
        unit.__dict__["_fast"] = (lctx, token)
    try:
        return MoE.forward(self, hidden_states, used_token)
    finally:
        for unit in self.pad_linears():
            unit.__dict__.pop("_fast", None)


def patch_layer(layer) -> None:
    """Switch one PADMoE (lambda_mode 'both', shared masks) to the fast composition, in place."""
    from padnet_ds.moe.expert import pad_linears_of

    assert layer.lambda_mode == "both" and layer.mask_scope == "shared", "experiment covers the default mode only"
    for owner in layer.expert_modules():
        for _, lin in pad_linears_of(owner):
            lin.forward = types.MethodType(_fast_linear_forward, lin)
    layer.forward = types.MethodType(_fast_layer_forward, layer)


def check_equal(hidden: int = 32, ffn: int = 64) -> float:
    """Max relative gradient difference between the current and the fast path on one layer."""
    import copy

    from .moe_step import make_models

    ref = make_models(hidden, ffn, 1, variants=("pad",))["pad"]
    fast = copy.deepcopy(ref)
    patch_layer(fast.moe)
    x = torch.randn(4, 16, hidden)
    worst = 0.0
    for m in (ref, fast):
        torch.manual_seed(3)
        y, aux = m(x)
        (y.pow(2).mean() + 0.01 * aux).backward()
    for (n, a), (_, b) in zip(ref.named_parameters(), fast.named_parameters()):
        ga, gb = a.grad, b.grad
        assert (ga is None) == (gb is None), n
        if ga is not None:
            worst = max(worst, float((ga - gb).abs().max() / ga.abs().max().clamp_min(1e-12)))
    return worst


def main(argv=None) -> Dict[str, Any]:
    common.setup_env()
    ap = common.parser(__doc__, "compose_experiment")
    common.add_shape_args(ap)
    args = ap.parse_args(argv)
    shapes = common.chosen_shapes(args)
    err = check_equal()
    print(f"gradients fast vs current: max relative difference {err:.2e}")
    from .moe_step import experts_pass, make_models

    warm, reps = common.warmup(args, 3, 1), common.reps(args, 15, 3)
    res = {}
    for s in shapes:
        shape = common.SHAPES[s]
        h, f = shape["hidden"], shape["ffn"]
        rows = common.rows_per_local_expert(shape)
        models = make_models(h, f, 2, variants=("moe", "pad"))
        fast = make_models(h, f, 2, variants=("pad",))["pad"]
        patch_layer(fast.moe)

        def fast_pass(n):
            # Like moe_step.experts_pass, with the fast path's per-layer context instead of _composition().
            layer = fast.moe
            nle = layer.num_local_experts
            x = torch.randn(2, nle, n // 2, h, requires_grad=True)
            g = torch.randn(2, nle, n // 2, h)

            def run():
                for p in layer.parameters():
                    p.grad = None
                for unit in layer.pad_linears():
                    lctx = LayerCtx(unit)
                    unit.__dict__["_fast"] = (lctx, Hub.apply(unit.static_weight, unit.phi, lctx))
                y = layer.deepspeed_moe.experts(x)
                for unit in layer.pad_linears():
                    unit.__dict__.pop("_fast")
                y.backward(g)
            return run

        variants = {"experts_moe": experts_pass(models["moe"].moe, rows, h, 2),
                    "experts_pad": experts_pass(models["pad"].moe, rows, h, 2),
                    "experts_fast": fast_pass(rows),
                    "compose_pad": experts_pass(models["pad"].moe, 0, h, 2),
                    "compose_fast": fast_pass(0)}
        med = {n: common.median(v) for n, v in common.interleave(variants, warm, reps).items()}
        res[s] = dict(median_s=med, experts_pad_vs_moe=med["experts_pad"] / med["experts_moe"],
                      experts_fast_vs_moe=med["experts_fast"] / med["experts_moe"],
                      compose_fast_vs_pad=med["compose_fast"] / med["compose_pad"])
        print(f"\n[{s}] 4 local experts fwd+bwd, {rows} rows each (compose_*: 0 rows)")
        print(common.table(["variant", "ms", "vs experts_moe"],
                           [[n, t * 1e3, t / med["experts_moe"]] for n, t in med.items()]))
    result = dict(config=dict(shapes=shapes, warmup=warm, reps=reps), quick=args.quick, machine=common.machine(),
                  max_rel_grad_diff=err, results=res)
    out = common.write_json(args.out, result)
    print(f"wrote {out}")
    return result


if __name__ == "__main__":
    main()
