"""Overhead of the in_training partitioner as a fraction of the train step.

Two identical PAD-MoE models in DeepSpeed engines train side by side in one process: A with
``partition.ratio=1.0`` (partitioner off), B scoring on every step with a partition step every
``--interval`` steps. Single steps run interleaved A B A B ..., so slow drifts of a shared machine
hit both; partition steps are timed apart from the train step they follow. The overhead is

    median(B step) / median(A step) - 1  +  median(partition step) / interval / median(A step)

(scoring, paid on every step of a scoring window, plus the partition step amortized over its
window). Run: ``python -m bench.partitioner [--reps STEPS] [--out FILE]``.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import time

import torch
import torch.nn.functional as F
from torch import nn


def build(args, ratio: float):
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
    pcfg = PartitionConfig(ratio=ratio, warmup_steps=0, interval=args.interval, steps=10**6)
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


def train_step(engine, part, state, x, y) -> tuple:
    """One optimizer step (with the partitioner's hooks); returns (step seconds, partition-step seconds)."""
    g = state["step"]
    t0 = time.perf_counter()
    part.before_step(g)
    loss = F.mse_loss(engine(x), y)
    engine.backward(loss)
    engine.step()
    t1 = time.perf_counter()
    part.after_step(g + 1)
    state["step"] = g + 1
    return t1 - t0, time.perf_counter() - t1


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--hidden", type=int, default=256)
    ap.add_argument("--ffn", type=int, default=1024)
    ap.add_argument("--experts", type=int, default=8)
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--batch", type=int, default=8, help="sequences per micro-batch")
    ap.add_argument("--seq", type=int, default=64)
    ap.add_argument("--zero", type=int, default=2)
    ap.add_argument("--interval", type=int, default=10, help="optimizer steps between partition steps")
    ap.add_argument("--reps", type=int, default=80, help="measured steps per variant")
    ap.add_argument("--warmup", type=int, default=10, help="steps per variant discarded")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", default="bench/results/partitioner.json")
    args = ap.parse_args(argv)

    from padnet_ds.engine.distributed import init_distributed

    torch.set_num_threads(args.threads)
    init_distributed()
    a, pa = build(args, 1.0)
    b, pb = build(args, 0.5)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(args.batch, args.seq, args.hidden, generator=g)
    y = torch.randn(args.batch, args.seq, generator=g)
    times = {"off": [], "on": [], "partition": []}
    states = {"off": {"step": 0}, "on": {"step": 0}}
    for i in range(args.warmup + args.reps):
        for name, (engine, part) in (("off", (a, pa)), ("on", (b, pb)))[::1 if i % 2 else -1]:
            logged = len(part.log)
            dt, dpart = train_step(engine, part, states[name], x, y)
            if i >= args.warmup:
                times[name].append(dt)
                if len(part.log) > logged:
                    times["partition"].append(dpart)
    off, on = statistics.median(times["off"]), statistics.median(times["on"])
    part_s = statistics.median(times["partition"])
    scoring = on / off - 1.0
    result = {
        "config": vars(args),
        "step_s_off": off,
        "step_s_on": on,
        "overhead": scoring + part_s / args.interval / off,
        "scoring_overhead": scoring,
        "partition_step_s": part_s,
        # partition-step cost amortized over its window, relative to the off step
        "partition_step_fraction": part_s / args.interval / off,
        "partition_steps_run": len(pb.log),
        "achieved_ratio": pb.overall_ratio(),  # ~1: the schedule is long so scoring stays on throughout
        "raw": times,
    }
    print(f"step off {off * 1e3:.1f} ms, scoring {on * 1e3:.1f} ms (+{100 * scoring:.2f}%); partition step "
          f"{part_s * 1e3:.1f} ms every {args.interval} steps (+{100 * result['partition_step_fraction']:.2f}%): "
          f"overhead {100 * result['overhead']:+.2f}% (target < 3%)")
    if args.out:
        os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
        with open(args.out, "w") as f:
            json.dump(result, f, indent=2)
    return result


if __name__ == "__main__":
    main()
