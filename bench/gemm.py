"""Expert GEMM efficiency: our PAD expert linears against bare ``torch.matmul`` on the same shapes.

    python -m bench.gemm [--quick] [--shapes h256,h768] [--out bench/results/gemm.json]

One process, one thread. The local experts of one rank at ep_size 2 (4 of E=8), each with its
dispatched token buffer (ep_size x capacity rows, as in ``bench.moe_step``), both FFN linears
(hidden->FFN and FFN->hidden) treated independently so only the linears are timed. Variants,
interleaved after warm-up (medians):

  matmul     the limit: per linear and expert, the three GEMMs of forward+backward written as
             bare ``torch.matmul`` calls (y = x W^T, dx = dy W, dW = dy^T x), no autograd, no bias
  composed   our PAD path: ``PADUnit`` terms (S, Md) once per linear per call, then
             ``Composition.linear`` forward+backward per expert through autograd (bias, phi learned,
             mask ratio 0.5), gradients for x, W_e, b_e, W_static and phi
  linear     the stock expert: ``F.linear`` through autograd (what DeepSpeed's MoE expert runs)
  grouped_loop / grouped_kernel
             the filled-row dispatch's node (``pad.grouped.grouped_linear``): all local experts'
             rows in one buffer, composed as in ``composed``, the GEMMs as a loop over the row
             segments or as torch's grouped GEMM kernel (``torch.nn.functional.grouped_mm``)

``gemm_efficiency`` = matmul / composed (<= 1, higher is better); ``linear_efficiency`` =
matmul / linear for reference; ``grouped_kernel_vs_loop_per_shape`` = grouped_kernel /
grouped_loop (> 1: the loop is faster on this device, which is what the dispatcher picks on CPU).
"""
from __future__ import annotations

from typing import Any, Dict

import torch
import torch.nn.functional as F

from . import common

LOCAL_EXPERTS = 4


def build(hidden: int, ffn: int, rows: int, ratio: float = 0.5, phi: float = 0.3):
    from padnet_ds.pad.compose import PADUnit

    g = torch.Generator().manual_seed(0)
    dims = [(hidden, ffn), (ffn, hidden)]  # (in, out) of fc1 and fc2
    units, weights, biases, xs, grads = [], [], [], [], []
    for fin, fout in dims:
        static = torch.randn(fout, fin, generator=g) / fin ** 0.5
        unit = PADUnit(static, "both")
        with torch.no_grad():
            unit.phi.fill_(phi)
        unit.set_mask(torch.rand(fout, fin, generator=g) < ratio)
        units.append(unit)
        weights.append([(static + 0.1 * static.std() * torch.randn(fout, fin, generator=g)).requires_grad_(True)
                        for _ in range(LOCAL_EXPERTS)])
        biases.append([torch.zeros(fout, requires_grad=True) for _ in range(LOCAL_EXPERTS)])
        xs.append([torch.randn(rows, fin, generator=g, requires_grad=True) for _ in range(LOCAL_EXPERTS)])
        grads.append([torch.randn(rows, fout, generator=g) for _ in range(LOCAL_EXPERTS)])
    leaves = [t for group in (weights, biases, xs) for per in group for t in per]
    leaves += [p for u in units for p in u.parameters()]

    def clear():
        for t in leaves:
            t.grad = None

    def matmul():
        with torch.no_grad():
            for i in range(2):
                for e in range(LOCAL_EXPERTS):
                    x, w, dy = xs[i][e], weights[i][e], grads[i][e]
                    torch.matmul(x, w.t())
                    torch.matmul(dy, w)
                    torch.matmul(dy.t(), x)

    def composed():
        clear()
        outs, gs = [], []
        for i in range(2):
            unit = units[i]
            unit.hold()
            comp = unit.composition()
            for e in range(LOCAL_EXPERTS):
                outs.append(comp.linear(xs[i][e], weights[i][e], biases[i][e]))
                gs.append(grads[i][e])
            unit.release()
        torch.autograd.backward(outs, gs)

    def linear():
        clear()
        outs, gs = [], []
        for i in range(2):
            for e in range(LOCAL_EXPERTS):
                outs.append(F.linear(xs[i][e], weights[i][e], biases[i][e]))
                gs.append(grads[i][e])
        torch.autograd.backward(outs, gs)

    grouped = dict(units=units, weights=weights, biases=biases, xs=xs, grads=grads, clear=clear, rows=rows)
    return {"matmul": matmul, "composed": composed, "linear": linear,
            "grouped_loop": grouped_pass(kernel=False, **grouped),
            "grouped_kernel": grouped_pass(kernel=True, **grouped)}


def grouped_pass(units, weights, biases, xs, grads, clear, rows: int, kernel: bool):
    """The same linears through ``pad.grouped.grouped_linear``: every expert's rows in one buffer."""
    from padnet_ds.pad.grouped import grouped_linear

    sizes = [rows] * LOCAL_EXPERTS
    x_all = [torch.cat([x.detach() for x in per]).requires_grad_(True) for per in xs]  # [L*rows, in]
    g_all = [torch.cat(per) for per in grads]

    def run():
        clear()
        for x in x_all:
            x.grad = None
        outs = []
        for i, unit in enumerate(units):
            unit.hold()
            outs.append(grouped_linear(x_all[i], [unit.composition()] * LOCAL_EXPERTS, weights[i], biases[i], sizes,
                                       kernel))
            unit.release()
        torch.autograd.backward(outs, g_all)

    return run


def main(argv=None) -> Dict[str, Any]:
    common.setup_env()
    ap = common.parser(__doc__, "gemm")
    common.add_shape_args(ap)
    args = ap.parse_args(argv)
    shapes = common.chosen_shapes(args)
    warm, reps = common.warmup(args, 3, 1), common.reps(args, 20, 3)
    res = {}
    for s in shapes:
        shape = common.SHAPES[s]
        rows = common.rows_per_local_expert(shape)
        samples = common.interleave(build(shape["hidden"], shape["ffn"], rows), warm, reps)
        med = {n: common.median(v) for n, v in samples.items()}
        gflop = 2 * 2 * 3 * LOCAL_EXPERTS * rows * shape["hidden"] * shape["ffn"] / 1e9
        res[s] = dict(median_s=med, rows_per_local_expert=rows, gflop=gflop,
                      gemm_efficiency=med["matmul"] / med["composed"], linear_efficiency=med["matmul"] / med["linear"],
                      grouped_kernel_vs_loop=med["grouped_kernel"] / med["grouped_loop"],
                      gflops={n: gflop / t for n, t in med.items()})
        print(f"\n[{s}] {LOCAL_EXPERTS} local experts x 2 linears ({shape['hidden']}<->{shape['ffn']}), "
              f"{rows} rows each, "
              f"fwd+bwd, {torch.get_num_threads()} thread(s); median of {reps} after {warm} warm-up")
        print(common.table(["variant", "ms", "GFLOP/s", "matmul/this"],
                           [[n, t * 1e3, gflop / t, med["matmul"] / t] for n, t in med.items()]))
    first = shapes[0]
    result = dict(config=dict(shapes=shapes, warmup=warm, reps=reps, threads=torch.get_num_threads(),
                              local_experts=LOCAL_EXPERTS),
                  shapes={s: dict(common.SHAPES[s], rows_per_local_expert=res[s]["rows_per_local_expert"])
                          for s in shapes},
                  machine=common.machine(), quick=args.quick, results=res,
                  gemm_efficiency=res[first]["gemm_efficiency"],
                  gemm_efficiency_per_shape={s: r["gemm_efficiency"] for s, r in res.items()},
                  grouped_kernel_vs_loop_per_shape={s: r["grouped_kernel_vs_loop"] for s, r in res.items()})
    out = common.write_json(args.out, result)
    print("\n" + ", ".join(f"{s}: gemm_efficiency = {r['gemm_efficiency']:.3f}, grouped kernel / loop = "
                            f"{r['grouped_kernel_vs_loop']:.3f}" for s, r in res.items()) + f"; wrote {out}")
    return result


if __name__ == "__main__":
    main()
