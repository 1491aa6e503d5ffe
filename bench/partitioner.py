"""Overhead of the in_training partitioner as a fraction of the train step.

Two identical PAD-MoE models in DeepSpeed engines train side by side: A with
``partition.ratio=1.0`` (partitioner off), B with scoring on every step and a partition step
every ``--interval`` steps. Blocks of ``--interval`` steps run interleaved A B A B, so
slow drifts of a shared machine hit both; the overhead is the ratio of the median block
times after ``--warmup`` blocks each. Run: ``python -m bench.partitioner [--out FILE]``.
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
    engine = build_engine(model, cfg, optimizer=lambda p: torch.optim.AdamW(p, lr=1e-4))
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


def block(engine, part, state, x, y, steps):
    """``steps`` optimizer steps; returns (seconds, seconds spent in partition steps)."""
    t_part = 0.0
    t0 = time.perf_counter()
    for _ in range(steps):
        g = state["step"]
        part.before_step(g)
        loss = F.mse_loss(engine(x), y)
        engine.backward(loss)
        engine.step()
        state["step"] = g + 1
        t1 = time.perf_counter()
        part.after_step(g + 1)
        t_part += time.perf_counter() - t1
    return time.perf_counter() - t0, t_part


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
    ap.add_argument("--reps", type=int, default=6, help="measured blocks per variant")
    ap.add_argument("--warmup", type=int, default=2, help="blocks per variant discarded")
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
    for rep in range(args.warmup + args.reps):
        for name, (engine, part) in (("off", (a, pa)), ("on", (b, pb))):
            dt, dpart = block(engine, part, states[name], x, y, args.interval)
            if rep >= args.warmup:
                times[name].append(dt / args.interval)
                if name == "on":
                    times["partition"].append(dpart)
    off, on = statistics.median(times["off"]), statistics.median(times["on"])
    part_s = statistics.median(times["partition"])
    result = {
        "config": vars(args),
        "step_s_off": off,
        "step_s_on": on,
        "overhead": on / off - 1.0,
        "partition_step_s": part_s,
        # Amortized partition-step cost per train step, relative to the off step; the rest of the
        # overhead is scoring (the sinks' extra backward work). Only meaningful when on > off.
        "partition_step_fraction": part_s / args.interval / off,
        "partition_steps_run": len(pb.log),
        "achieved_ratio": pb.overall_ratio(),  # ~1: the schedule is long so scoring stays on throughout
        "raw": times,
    }
    print(f"step off {off * 1e3:.1f} ms, on {on * 1e3:.1f} ms: overhead {100 * result['overhead']:+.2f}% "
          f"(partition step {part_s * 1e3:.1f} ms every {args.interval} steps = "
          f"{100 * part_s / args.interval / off:.2f}% of a step; the rest is scoring)")
    if args.out:
        os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
        with open(args.out, "w") as f:
            json.dump(result, f, indent=2)
    return result


if __name__ == "__main__":
    main()
