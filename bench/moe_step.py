"""Train-step time of PAD-MoE against DeepSpeed's stock (fully dynamic) MoE on identical shapes.

    python -m bench.moe_step [--quick] [--shapes h256,h768,h768s] [--reps N] [--out bench/results/moe_step.json]

2 gloo ranks (one thread each), ep_size 2, ZeRO 2, fp32, E=8, k=2, capacity factor 1.25,
torch's fused AdamW. Every variant is its own DeepSpeed engine built in the SAME two processes;
steps are interleaved A B C A B C (rotating order) after warm-up and the median step is
reported (a step = forward + backward + optimizer step, each timed; per step the slowest
rank counts; ``cpu``: both ranks' process CPU time). The drop_tokens=False pair runs as a
second group after the others (same ranks, same input), so that at most four engines are
alive at once. Variants:

  moe           deepspeed.moe.layer.MoE with a plain two-linear GELU FFN expert (the reference)
  pad           PADMoE: dynamic ratio 0.5 random shared mask, phi = 0.3 (lambda_d != lambda_s),
                experts perturbed away from the static weight (a realistic mid-training state);
                its default filled-row dispatch (moe/dispatch.py) sends and computes the routed
                rows only, where DeepSpeed computes every expert's whole capacity buffer
  pad_frozen    the same PAD model with the static weights frozen (requires_grad False): the
                difference pad - pad_frozen is what the replicated static weights cost in
                gradient computation, all-reduce and optimizer work
  packed        the same PAD model packed (``PADMoE.pack``): experts hold only the values at the
                mask's dynamic positions, the static weight only where the mask is 0
  moe_nodrop    the stock MoE with drop_tokens=False (every expert padded to the group's largest count)
  pad_dropless  PADMoE(dropless=True): no capacity, the same gate
  pad_padded    (not run by default) PADMoE with DeepSpeed's padded dispatch: pad_padded / pad is
                what the filled-row dispatch alone saves

The fill fraction is the share of DeepSpeed's expert rows (E x capacity per rank, summed over
the ranks) that hold a routed token, read off the PAD engines' routing of every timed step
(``fill_fraction_per_shape``: drop_tokens=True; ``fill_fraction_no_drop_per_shape``: against
the capacity drop_tokens=False pads to, the largest count in the group).

Plus, per rank and off the engines (no communication), interleaved with the steps:

  compose_pad / compose_moe   forward+backward of the local experts on ZERO rows: what is left
                is the composition itself (per-layer S / Md terms, one addcmul per expert in
                forward and again in backward, the sum of G_e and the mask multiply of the
                expert gradient, the hub's static-weight and phi gradients)
  experts_pad / experts_moe   forward+backward of the local experts on DeepSpeed's dispatched
                buffer (ep_size x capacity rows per local expert): PAD's expert compute at equal rows
"""
from __future__ import annotations

import json
from typing import Any, Dict, List

from . import common

VARIANTS = ("moe", "pad", "pad_frozen", "packed", "moe_nodrop", "pad_dropless")


def make_models(hidden: int, ffn: int, ep_size: int, *, seed: int = 0, ratio: float = 0.5, phi: float = 0.3,
                perturb: float = 0.1, variants=VARIANTS, capacity_factor: float = 1.25, experts: int = 8, k: int = 2):
    """{variant: nn.Module} with ``forward(x) -> (y, l_aux)``; PAD models share one seeded initialisation."""
    import torch
    from deepspeed.moe.layer import MoE
    from torch import nn

    from padnet_ds import PADMoE
    from padnet_ds.moe.expert import FFNExpert
    from padnet_ds.moe.upcycle import perturb_experts

    class Net(nn.Module):

        def __init__(self, moe):
            super().__init__()
            self.moe = moe

        def forward(self, x):
            y, aux, _ = self.moe(x)
            return y, aux

    kw = dict(num_experts=experts, ep_size=ep_size, k=k, capacity_factor=capacity_factor,
              eval_capacity_factor=capacity_factor)
    out = {}
    for name in variants:
        torch.manual_seed(seed)
        fc1, fc2 = nn.Linear(hidden, ffn), nn.Linear(ffn, hidden)
        if name in ("moe", "moe_nodrop"):
            out[name] = Net(MoE(hidden, FFNExpert(fc1, fc2, nn.GELU()), drop_tokens=name == "moe", **kw))
            continue
        mask_ratio = 1.0 if name == "pad_ones" else ratio
        pad_kw = dict(dropless=name == "pad_dropless", dispatch="padded" if name == "pad_padded" else "filled")
        layer = PADMoE.from_dense(fc1, fc2, nn.GELU(), **kw, **pad_kw)
        perturb_experts(layer, perturb, seed=seed)
        gen = torch.Generator().manual_seed(seed + 1)
        with torch.no_grad():
            for unit in layer.pad_units():
                unit.mask.copy_(torch.rand(unit.mask.shape, generator=gen) < mask_ratio)
                if isinstance(unit.phi, nn.Parameter):
                    unit.phi.fill_(phi)
                if name == "pad_frozen":
                    unit.static_weight.requires_grad_(False)
        if name.startswith("packed"):
            layer.pack(dense_static=name == "packed_dense_static")
        out[name] = Net(layer)
    return out


def ds_config(micro: int, stage: int = 2, overlap_comm: bool = False, zero: Dict[str, Any] = None) -> Dict[str, Any]:
    return {"train_micro_batch_size_per_gpu": micro, "gradient_accumulation_steps": 1,
            "zero_optimization": {"stage": stage, "overlap_comm": overlap_comm, **(zero or {})},
            "steps_per_print": 10**9, "zero_allow_untested_optimizer": True, "wall_clock_breakdown": False}


def adamw(params):
    import torch

    # fused: one kernel per parameter tensor, as DeepSpeed's FusedAdam on GPUs; torch's unfused CPU
    # path allocates temporaries per tensor and runs 8-17x slower on this machine (bench/README.md).
    return torch.optim.AdamW(params, lr=1e-4, weight_decay=0.0, fused=True)


def train_step(engine, x, barrier: bool = True) -> Dict[str, float]:
    import time

    import torch

    if barrier and torch.distributed.is_initialized():
        torch.distributed.barrier()
    c0, t0 = time.process_time(), time.perf_counter()
    y, aux = engine(x)
    loss = y.float().pow(2).mean() + 0.01 * aux
    t1 = time.perf_counter()
    engine.backward(loss)
    t2 = time.perf_counter()
    engine.step()
    t3 = time.perf_counter()
    # cpu: this process's CPU time (all threads, gloo's included): the work, without the time
    # other jobs on a shared machine held the core or the other rank kept this one waiting.
    return dict(fwd=t1 - t0, bwd=t2 - t1, step=t3 - t2, total=t3 - t0, cpu=time.process_time() - c0)


def experts_pass(layer, rows: int, hidden: int, ep_size: int):
    """A closure running forward+backward of ``layer``'s local experts on ``rows`` rows each."""
    import torch

    from padnet_ds import PADMoE

    nle = layer.num_local_experts
    x = torch.randn(ep_size, nle, rows // ep_size, hidden, requires_grad=True)
    g = torch.randn(ep_size, nle, rows // ep_size, hidden)
    experts = layer.deepspeed_moe.experts

    def run():
        for p in layer.parameters():
            p.grad = None
        x.grad = None
        if isinstance(layer, PADMoE):
            with layer._composition():
                y = experts(x)
        else:
            y = experts(x)
        y.backward(g)

    return run


# Variants compared with each other run side by side; the groups run one after the other in the
# same ranks (six engines at h768 at once need more memory than a shared 2-core machine has).
GROUPS = (("moe", "pad", "pad_frozen", "packed", "pad_padded"), ("moe_nodrop", "pad_dropless"))


def reference(variant: str) -> str:
    """The stock variant ``variant`` ran side by side with."""
    return next(g[0] for g in GROUPS if variant in g)


def _rank(cfg: Dict[str, Any]) -> Dict[str, Any]:
    import torch

    common.quiet_deepspeed()
    rank = torch.distributed.get_rank()
    if cfg["tune_malloc"]:
        common.tune_malloc()
    results = {}
    for shape_name in cfg["shapes"]:
        shape = common.SHAPES[shape_name]
        gen = torch.Generator().manual_seed(100 + rank)
        x = torch.randn(shape["batch"], shape["seq"], shape["hidden"], generator=gen).requires_grad_(True)
        res = dict(samples={}, fills={}, rows_per_local_expert=common.rows_per_local_expert(shape))
        groups = [[v for v in g if v in cfg["variants"]] for g in GROUPS]
        for i, group in enumerate(g for g in groups if g):
            _run_group(group, shape, x, cfg, res, extras=i == 0)
        results[shape_name] = res
    return results


def _run_group(variants, shape, x, cfg: Dict[str, Any], res: Dict[str, Any], extras: bool) -> None:
    """Build ``variants``' engines, step them interleaved (plus the off-engine extras), record into ``res``."""
    import gc

    from padnet_ds.engine.setup import build_engine

    h, f = shape["hidden"], shape["ffn"]
    models = make_models(h, f, common.MOE["ep_size"], variants=variants)
    engines = {n: build_engine(m, ds_config(shape["batch"], overlap_comm=cfg["overlap_comm"], zero=cfg["zero"]),
                               optimizer=adamw)
               for n, m in models.items()}
    fills: Dict[str, List[List[int]]] = {n: [] for n in engines}

    def step(name, engine):
        times = train_step(engine, x)
        moe = engine.module.moe.deepspeed_moe
        if getattr(moe, "last_rows", None) is not None:  # PAD's filled-row dispatch: rows sent, capacity
            fills[name].append([moe.last_rows, int(moe.last_capacity)])
        return times

    steps = {n: (lambda n=n, e=e: step(n, e)) for n, e in engines.items()}
    off = {}
    if extras:
        # Off-engine copies (ep_size 2 layout: 4 local experts) for the composition and expert-GEMM timings.
        local = make_models(h, f, common.MOE["ep_size"], variants=("moe", "pad"), seed=1)
        rows = res["rows_per_local_expert"]
        off = {"compose_pad": experts_pass(local["pad"].moe, 0, h, 2),
               "compose_moe": experts_pass(local["moe"].moe, 0, h, 2),
               "experts_pad": experts_pass(local["pad"].moe, rows, h, 2),
               "experts_moe": experts_pass(local["moe"].moe, rows, h, 2)}

    def clock(fn):
        return common.timed(fn) if fn in off.values() else fn()

    res["samples"].update(common.interleave({**steps, **off}, cfg["warmup"], cfg["reps"], clock=clock))
    res["fills"].update({n: f[cfg["warmup"]:] for n, f in fills.items() if f})  # the timed steps' routing
    if "pad" in models:
        res["static_params"] = sum(u.static_tensor().numel() for u in models["pad"].moe.pad_units())
        res["local_expert_params"] = sum(p.numel() for p in models["pad"].moe.deepspeed_moe.experts.parameters())
    del engines, models, steps
    off.clear()
    gc.collect()


def analyse(per_rank: List[Dict[str, Any]], variants) -> Dict[str, Any]:
    out = {}
    for shape_name in per_rank[0]:
        ranks = [r[shape_name]["samples"] for r in per_rank]
        med: Dict[str, Dict[str, float]] = {}
        totals: Dict[str, List[float]] = {}
        for v in variants:
            # One step = the slowest rank in each phase (the ranks meet at every collective); CPU time
            # is the work of both ranks together.
            steps = [{ph: (sum if ph == "cpu" else max)(r[v][i][ph] for r in ranks) for ph in ranks[0][v][i]}
                     for i in range(len(ranks[0][v]))]
            med[v] = common.phase_medians(steps)
            totals[v] = [s["total"] for s in steps]
        extra = {k: common.median(max(r[k][i] for r in ranks) for i in range(len(ranks[0][k])))
                 for k in ranks[0] if k not in variants}
        base = med["moe"]["total"]
        res = dict(median_s=med, per_rank_ops_median_s=extra,
                   rows_per_local_expert=per_rank[0][shape_name]["rows_per_local_expert"],
                   step_ratio=med["pad"]["total"] / base,
                   # Round i ran every variant back to back: its pad/moe ratio is one paired sample,
                   # and their spread shows how far apart two runs of this benchmark may land.
                   step_ratio_rounds=_paired(totals, "pad", "moe"),
                   step_cpu_ratio=med["pad"]["cpu"] / med["moe"]["cpu"])
        fills = [r[shape_name]["fills"] for r in per_rank]
        if "pad" in fills[0]:
            res["fill_fraction"] = fill_fraction([f["pad"] for f in fills], common.MOE["experts"], padded_to_max=False)
        if "pad_dropless" in fills[0]:
            res["fill_fraction_no_drop"] = fill_fraction([f["pad_dropless"] for f in fills], common.MOE["experts"],
                                                         padded_to_max=True)
        if "pad_dropless" in med and "moe_nodrop" in med:
            res["step_ratio_dropless_vs_no_drop"] = med["pad_dropless"]["total"] / med["moe_nodrop"]["total"]
            res["step_ratio_dropless_rounds"] = _paired(totals, "pad_dropless", "moe_nodrop")
            res["step_cpu_ratio_dropless_vs_no_drop"] = med["pad_dropless"]["cpu"] / med["moe_nodrop"]["cpu"]
        if "pad_padded" in med:
            res["step_ratio_padded_dispatch"] = med["pad_padded"]["total"] / base
        share = dict(
            composition=(extra["compose_pad"] - extra["compose_moe"]) / base,
            expert_compute_with_composition=(extra["experts_pad"] - extra["experts_moe"]) / base,
            optimizer_step=(med["pad"]["step"] - med["moe"]["step"]) / base,
            forward=(med["pad"]["fwd"] - med["moe"]["fwd"]) / base,
            backward_incl_grad_reduce=(med["pad"]["bwd"] - med["moe"]["bwd"]) / base,
        )
        if "pad_frozen" in med:
            share["static_weights"] = (med["pad"]["total"] - med["pad_frozen"]["total"]) / base
            res["step_ratio_static_frozen"] = med["pad_frozen"]["total"] / base
        if "packed" in med:
            res["step_ratio_packed"] = med["packed"]["total"] / base
            res["step_ratio_packed_rounds"] = _paired(totals, "packed", "moe")
            res["step_cpu_ratio_packed"] = med["packed"]["cpu"] / med["moe"]["cpu"]
        res["overhead_share_of_moe_step"] = share
        out[shape_name] = res
    return out


def _paired(totals: Dict[str, List[float]], num: str, den: str) -> List[float]:
    return common.quartiles([a / b for a, b in zip(totals[num], totals[den])])


def fill_fraction(per_rank: List[List[List[int]]], experts: int, padded_to_max: bool) -> float:
    """Mean over steps of (routed rows, all ranks) / (DeepSpeed's expert rows, all ranks).

    ``per_rank[r][i]`` = [rows rank r sent at step i, its gate's capacity]. DeepSpeed computes
    E x capacity rows per rank; with drop_tokens=False that capacity is the largest over the group.
    """
    fracs = []
    for step in zip(*per_rank):
        rows = sum(r for r, _ in step)
        caps = [max(c for _, c in step)] * len(step) if padded_to_max else [c for _, c in step]
        fracs.append(rows / (experts * sum(caps)))
    return sum(fracs) / len(fracs)


def print_tables(res: Dict[str, Any], cfg: Dict[str, Any]) -> None:
    print(f"train step, 2 gloo ranks x 1 thread, ep_size 2, ZeRO 2, fp32, E=8, k=2, cf 1.25, AdamW; "
          f"median of {cfg['reps']} interleaved steps after {cfg['warmup']} warm-up")
    for s, r in res.items():
        shape = common.SHAPES[s]
        print(f"\n[{s}] hidden {shape['hidden']} / FFN {shape['ffn']}, {common.tokens(shape)} tokens per rank "
              f"({shape['batch']}x{shape['seq']}), {r['rows_per_local_expert']} rows per local expert")
        rows = []
        for v, m in r["median_s"].items():
            ref = r["median_s"][reference(v)]
            rows.append([v, m["total"] * 1e3, m["fwd"] * 1e3, m["bwd"] * 1e3, m["step"] * 1e3,
                         m["total"] / ref["total"],
                         m["cpu"] * 1e3, m["cpu"] / ref["cpu"]])
        print(common.table(["variant", "step ms", "fwd ms", "bwd ms", "opt ms", "vs its group's moe",
                            "cpu ms (2 ranks)", "cpu vs moe"], rows))
        print(common.table(["per-rank op", "ms"], [[k, v * 1e3] for k, v in r["per_rank_ops_median_s"].items()]))
        print(common.table(["PAD overhead, share of the moe step", "fraction"],
                           [[k, v] for k, v in r["overhead_share_of_moe_step"].items()]))


def main(argv=None) -> Dict[str, Any]:
    common.setup_env()
    ap = common.parser(__doc__, "moe_step")
    common.add_shape_args(ap, threads=False)
    ap.add_argument("--variants", default=",".join(VARIANTS))
    ap.add_argument("--overlap-comm", action="store_true", help="ZeRO overlap_comm (default off, DeepSpeed's default)")
    ap.add_argument("--zero", default="{}", help='extra zero_optimization settings for every engine, as JSON, '
                    'e.g. \'{"reduce_scatter": false}\'')
    ap.add_argument("--tune-malloc", action="store_true", help="glibc keeps freed blocks in every rank "
                    "(common.tune_malloc): DeepSpeed's per-step gradient buffers then stop page-faulting")
    args = ap.parse_args(argv)
    shapes = common.chosen_shapes(args, default="h256,h768,h768s")
    variants = tuple(args.variants.split(","))
    assert "moe" in variants and "pad" in variants, "variants must include moe and pad"
    cfg = dict(shapes=shapes, variants=variants, warmup=common.warmup(args, 2, 1), reps=common.reps(args, 10, 3),
               overlap_comm=args.overlap_comm, zero=json.loads(args.zero), tune_malloc=args.tune_malloc)
    per_rank = common.spawn(_rank, 2, cfg)
    res = analyse(per_rank, variants)
    print_tables(res, cfg)
    first = shapes[0]
    result = dict(config=cfg, shapes={s: dict(common.SHAPES[s], tokens_per_rank=common.tokens(common.SHAPES[s]),
                                              **{k: v for k, v in common.MOE.items()}) for s in shapes},
                  machine=common.machine(), quick=args.quick, results=res,
                  step_ratio_vs_deepspeed_moe=res[first]["step_ratio"],
                  step_ratio_per_shape={s: r["step_ratio"] for s, r in res.items()},
                  step_ratio_round_quartiles_per_shape={s: r["step_ratio_rounds"] for s, r in res.items()},
                  step_ratio_packed_vs_deepspeed_moe=res[first].get("step_ratio_packed"),
                  goal="pad / moe <= 0.90 at h256 and h768; packed / moe <= 1.00")
    optional = dict(fill_fraction_per_shape="fill_fraction", fill_fraction_no_drop_per_shape="fill_fraction_no_drop",
                    step_ratio_dropless_vs_deepspeed_no_drop_per_shape="step_ratio_dropless_vs_no_drop",
                    step_ratio_dropless_round_quartiles_per_shape="step_ratio_dropless_rounds",
                    step_ratio_padded_dispatch_per_shape="step_ratio_padded_dispatch",
                    step_cpu_ratio_per_shape="step_cpu_ratio",
                    step_ratio_packed_per_shape="step_ratio_packed",
                    step_ratio_packed_round_quartiles_per_shape="step_ratio_packed_rounds",
                    step_cpu_ratio_packed_per_shape="step_cpu_ratio_packed",
                    step_cpu_ratio_dropless_vs_no_drop_per_shape="step_cpu_ratio_dropless_vs_no_drop")
    for key, name in optional.items():
        if all(name in r for r in res.values()):
            result[key] = {s: r[name] for s, r in res.items()}
    out = common.write_json(args.out, result)
    for s, r in res.items():
        line = (f"{s}: pad/moe = {r['step_ratio']:.3f} (per round: quartiles {r['step_ratio_rounds'][0]:.3f}-"
                f"{r['step_ratio_rounds'][2]:.3f}), fill fraction {r.get('fill_fraction', float('nan')):.3f}")
        if "step_ratio_packed" in r:
            line += f"; packed/moe = {r['step_ratio_packed']:.3f}"
        if "step_ratio_dropless_vs_no_drop" in r:
            q = r["step_ratio_dropless_rounds"]
            line += (f"; dropless pad / moe drop_tokens=False = {r['step_ratio_dropless_vs_no_drop']:.3f} "
                     f"({q[0]:.3f}-{q[2]:.3f}), fill {r['fill_fraction_no_drop']:.3f}")
        print(line)
    print(f"(goal: pad/moe <= 0.90 at h256 and h768, packed/moe <= 1.00); wrote {out}")
    return result


if __name__ == "__main__":
    main()
