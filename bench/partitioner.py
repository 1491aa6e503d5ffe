"""Overhead of the in_training partitioner as a fraction of the train step.

One PAD-MoE model in one DeepSpeed engine, one process, stepped alternately without and with
the partitioner (off, on, on, off, ...): an "on" step goes through ``before_step`` (scoring on)
and ``after_step`` (a partition step every ``--interval`` on-steps, timed apart from the step);
an "off" step has scoring switched off and no partition step. Using the same engine for both
matters: two engines built side by side differed by up to 5% in their GEMM time alone here
(memory placement), which swamped the scoring cost. The overhead is

    median(on step) / median(off step) - 1  +  median(partition step) / interval / median(off step)

(scoring, paid on every step of a scoring window, plus the partition step amortized over its
window). Timed in process CPU time, with glibc told to keep freed blocks (``common.tune_malloc``):
otherwise DeepSpeed's gradient copies page-fault by a varying amount per step and the on/off
difference of its ``copy_`` alone swung by +-200 ms at h768s in either direction. Run:
``python -m bench.partitioner [--shapes h256,h768s] [--reps STEPS] [--out FILE]``
(measured steps per variant: 60 after 8 discarded; ``--quick``: 12 after 3, interval 3).
"""
from __future__ import annotations

import statistics
import time

import torch
import torch.nn.functional as F
from torch import nn


def build(args):
    from padnet_ds import PADMoE
    from padnet_ds.engine.setup import build_engine
    from padnet_ds.moe.upcycle import perturb_experts
    from padnet_ds.partition import PartitionConfig, Partitioner

    torch.manual_seed(0)
    layers = []
    for i in range(args.layers):
        fc1, fc2 = nn.Linear(args.hidden, args.ffn), nn.Linear(args.ffn, args.hidden)
        layer = PADMoE.from_dense(fc1, fc2, nn.GELU(), num_experts=args.experts, k=2, drop_tokens=False)
        perturb_experts(layer, 0.01, seed=i)  # upcycled copies would score zero (the symmetry trap)
        layers.append(layer)
    model = Net(args.hidden, layers)
    cfg = {"train_micro_batch_size_per_gpu": args.batch, "gradient_accumulation_steps": 1,
           "zero_optimization": {"stage": args.zero}, "steps_per_print": 10**9, "zero_allow_untested_optimizer": True}
    engine = build_engine(model, cfg, optimizer=lambda p: torch.optim.AdamW(p, lr=1e-4, fused=True))
    # ratio 0.5 over a schedule so long the masks stay ~all dynamic: scoring never stops
    pcfg = PartitionConfig(ratio=0.5, warmup_steps=0, interval=args.interval, steps=10**6)
    return engine, Partitioner(engine.module, pcfg, engine)


class Net(nn.Module):

    def __init__(self, hidden: int, layers) -> None:
        super().__init__()
        self.moes = nn.ModuleList(layers)
        self.out = nn.Linear(hidden, 1)

    def forward(self, x):
        for layer in self.moes:
            y, _, _ = layer(x)
            x = x + y
        return self.out(x).squeeze(-1)


# CPU time of this (single-threaded, single) process: on a shared machine wall time also counts
# the time other tenants hold the core, which moved the medians by +-3% between runs here.
CLOCK = time.process_time


def plain_step(engine, x, y) -> float:
    t0 = CLOCK()
    engine.backward(F.mse_loss(engine(x), y))
    engine.step()
    return CLOCK() - t0


def train_step(engine, part, state, x, y) -> tuple:
    """One optimizer step (with the partitioner's hooks); returns (step seconds, partition-step seconds)."""
    g = state["step"]
    t0 = CLOCK()
    part.before_step(g)
    plain_step(engine, x, y)
    t1 = CLOCK()
    part.after_step(g + 1)
    state["step"] = g + 1
    return t1 - t0, CLOCK() - t1


def measure(args, shape: dict) -> dict:
    """One engine for one shape, stepped alternately with scoring off and on; the overhead figures."""
    import types

    from padnet_ds.partition import PartitionConfig

    cfg = types.SimpleNamespace(**{**vars(args), **shape})
    engine, part = build(cfg)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(cfg.batch, cfg.seq, cfg.hidden, generator=g)
    y = torch.randn(cfg.batch, cfg.seq, generator=g)
    times = {"off": [], "on": [], "partition": []}
    on_steps = {"step": 0}  # the partitioner's clock counts the steps it sees
    for i in range(args.warmup + args.reps):
        for name in ("off", "on")[::1 if i % 2 else -1]:
            if name == "on":
                logged = len(part.log)
                dt, dpart = train_step(engine, part, on_steps, x, y)
                partitioned = len(part.log) > logged
            else:
                part.book.switch(False)
                dt, dpart, partitioned = plain_step(engine, x, y), 0.0, False
            if i >= args.warmup:
                times[name].append(dt)
                if partitioned:
                    times["partition"].append(dpart)
    off, on = statistics.median(times["off"]), statistics.median(times["on"])
    part_s = statistics.median(times["partition"])
    scoring = on / off - 1.0
    default_interval = PartitionConfig().interval
    return {
        "shape": shape,
        "rows_per_expert": cfg.batch * cfg.seq * 2 // args.experts,
        "step_s_off": off,
        "step_s_on": on,
        "overhead": scoring + part_s / args.interval / off,
        "scoring_overhead": scoring,
        "partition_step_s": part_s,
        # partition-step cost amortized over its window, relative to the off step
        "partition_step_fraction": part_s / args.interval / off,
        "overhead_at_default_interval": scoring + part_s / default_interval / off,
        "default_interval": default_interval,
        "partition_steps_run": len(part.log),
        "achieved_ratio": part.overall_ratio(),  # ~1: the schedule is long so scoring stays on throughout
        "raw": times,
    }


def main(argv=None) -> dict:
    from . import common

    ap = common.parser(__doc__, "partitioner")  # --out, --quick, --reps / --warmup: steps per variant
    common.add_shape_args(ap)
    ap.add_argument("--experts", type=int, default=8)
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--zero", type=int, default=2)
    ap.add_argument("--interval", type=int, default=10, help="optimizer steps between partition steps")
    ap.add_argument("--default-malloc", action="store_true",
                    help="keep glibc's default allocator settings (page-fault noise of several %% per step)")
    args = ap.parse_args(argv)
    args.malloc_tuned = False if args.default_malloc else common.tune_malloc()
    args.reps = common.reps(args, 60, 12)
    args.warmup = common.warmup(args, 8, 3)
    if args.quick:
        args.interval = min(args.interval, 3)
    shapes = common.chosen_shapes(args)

    from padnet_ds.engine.distributed import init_distributed

    init_distributed()
    per_shape = {}
    for name in shapes:
        shape = {k: common.SHAPES[name][k] for k in ("hidden", "ffn", "batch", "seq")}
        r = per_shape[name] = measure(args, shape)
        print(f"[{name}] {shape['batch']}x{shape['seq']} tokens, {r['rows_per_expert']} rows per expert: step off "
              f"{r['step_s_off'] * 1e3:.1f} ms, scoring {r['step_s_on'] * 1e3:.1f} ms "
              f"({100 * r['scoring_overhead']:+.2f}%); partition step {r['partition_step_s'] * 1e3:.1f} ms every "
              f"{args.interval} steps ({100 * r['partition_step_fraction']:+.2f}%): overhead "
              f"{100 * r['overhead']:+.2f}% (at the default interval {r['default_interval']}: "
              f"{100 * r['overhead_at_default_interval']:+.2f}%; target < 3%)")
    first = per_shape[shapes[0]]
    result = {"config": vars(args), "machine": common.machine(), "quick": args.quick,
              "shapes": {n: r["shape"] for n, r in per_shape.items()},
              "overhead": first["overhead"], "overhead_per_shape": {n: r["overhead"] for n, r in per_shape.items()},
              "scoring_overhead_per_shape": {n: r["scoring_overhead"] for n, r in per_shape.items()},
              "results": per_shape}
    if args.out:
        common.write_json(args.out, result)
    return result


if __name__ == "__main__":
    main()
