"""Weak scaling of a PAD-MoE train step: 1 rank (ep_size 1) against 2 ranks (ep_size 2).

    python -m bench.scaling [--quick] [--rounds N] [--shape h256] [--out bench/results/scaling.json]

The same per-rank work in both: the ``bench.moe_step`` shape's tokens per rank, E=8, k=2,
capacity factor 1.25, ZeRO 2, fp32, AdamW, PAD at dynamic ratio 0.5 (phi != 0, experts
perturbed). One rank holds all 8 experts and sees ep_size x capacity = 1 x capacity rows per
expert; two ranks hold 4 each and see 2 x capacity rows per local expert, so every rank does
the same GEMM work. The two world sizes need separate spawns; they alternate 1, 2, 1, 2 ...
(``--rounds``), each spawn times its steps after warm-up, and the medians over all timed steps
of each world size give ``weak_scaling`` = tokens/s(2 ranks) / (2 x tokens/s(1 rank)) (1.0 is
perfect). On a machine with fewer free cores than ranks this measures contention too.
"""
from __future__ import annotations

from typing import Any, Dict

from . import common


def _rank(cfg: Dict[str, Any]) -> Dict[str, Any]:
    import torch

    common.quiet_deepspeed()
    from padnet_ds.engine.setup import build_engine

    from .moe_step import adamw, ds_config, make_models, train_step

    world = torch.distributed.get_world_size()
    shape = common.SHAPES[cfg["shape"]]
    model = make_models(shape["hidden"], shape["ffn"], world, variants=("pad",))["pad"]
    engine = build_engine(model, ds_config(shape["batch"]), optimizer=adamw)
    x = torch.randn(shape["batch"], shape["seq"], shape["hidden"], requires_grad=True)
    times = []
    for i in range(cfg["warmup"] + cfg["reps"]):
        t = train_step(engine, x)["total"]
        if i >= cfg["warmup"]:
            times.append(t)
    return times


def main(argv=None) -> Dict[str, Any]:
    common.setup_env()
    ap = common.parser(__doc__, "scaling")
    ap.add_argument("--rounds", type=int, default=None, help="alternations of (1 rank, 2 ranks); default 3, quick 1")
    ap.add_argument("--shape", default="h256", choices=list(common.SHAPES))
    args = ap.parse_args(argv)
    rounds = args.rounds or (1 if args.quick else 3)
    cfg = dict(shape=args.shape, warmup=common.warmup(args, 3, 1), reps=common.reps(args, 10, 3), rounds=rounds)
    steps: Dict[int, list] = {1: [], 2: []}
    for _ in range(rounds):
        for world in (1, 2):
            per_rank = common.spawn(_rank, world, cfg)
            steps[world] += [max(ts) for ts in zip(*per_rank)]  # a step ends when the slowest rank ends
    tok = common.tokens(common.SHAPES[args.shape])
    med = {w: common.median(v) for w, v in steps.items()}
    tps = {w: w * tok / med[w] for w in (1, 2)}
    weak = tps[2] / (2 * tps[1])
    print(f"PAD-MoE train step, {args.shape}, {tok} tokens per rank, {rounds} round(s) of 1,2 ranks, "
          f"{cfg['reps']} timed steps each after {cfg['warmup']} warm-up")
    print(common.table(["ranks", "ep_size", "step ms", "tokens/s"], [[w, w, med[w] * 1e3, tps[w]] for w in (1, 2)]))
    result = dict(config=cfg, shapes={args.shape: dict(common.SHAPES[args.shape], tokens_per_rank=tok, experts=8, k=2)},
                  machine=common.machine(), quick=args.quick, step_s=steps, median_step_s=med, tokens_per_s=tps,
                  weak_scaling=weak)
    out = common.write_json(args.out, result)
    print(f"weak_scaling = {weak:.3f}; wrote {out}")
    return result


if __name__ == "__main__":
    main()
