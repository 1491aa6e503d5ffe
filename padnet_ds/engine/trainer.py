"""The training loop: DeepSpeed engine, PAD partitioner, eval, checkpoints, TensorBoard.

Order of one optimizer step (every rank runs the same sequence, so collectives line up):
``partitioner.before_step`` -> ``grad_accum`` x (forward, backward) -> ``engine.step`` ->
``partitioner.after_step`` (maybe a partition step) -> log / eval / checkpoint.
"""
from __future__ import annotations

import itertools
import json
import logging
import math
import random
import time
from pathlib import Path
from typing import Any, Dict, List, Optional

import numpy as np
import torch
import torch.distributed as dist
from torch.utils.data import DataLoader, DistributedSampler

from . import checkpoint
from .config import RunConfig, to_dict
from ..comm import comm_device
from .distributed import init_distributed, rank, world_size
from .monitor import Monitor
from .run_dir import RunDir
from .setup import build_engine
from .evaluate import evaluate
from .tasks import Task, build_task

log = logging.getLogger("padnet_ds")


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def load_ds_config(cfg: RunConfig) -> Dict[str, Any]:
    from .config import ConfigError

    path = Path(cfg.ds_config)
    if not path.is_file():
        raise ConfigError(f"ds_config {cfg.ds_config} not found (ds_configs/ has zero{{0,1,2}}_{{fp32,bf16,fp16}}.json)")
    ds = json.loads(path.read_text())
    for key, ours in (("train_micro_batch_size_per_gpu", cfg.train.micro_batch_size),
                      ("gradient_accumulation_steps", cfg.train.grad_accum)):
        if key in ds and ds[key] not in (ours, "auto"):
            raise ConfigError(f"ds_config {path} sets {key}={ds[key]} but the run config asks for {ours} "
                              "(train.micro_batch_size / train.grad_accum): remove it from the JSON or make them agree")
        ds[key] = ours
    ds.pop("train_batch_size", None)
    ds.setdefault("steps_per_print", 10**9)
    return ds


def optimizer_and_schedule(cfg: RunConfig, ds: Dict[str, Any], total_steps: int):
    """AdamW + linear warm-up/decay, unless the DeepSpeed JSON brings its own optimizer/scheduler."""
    opt = None if "optimizer" in ds else (lambda groups: torch.optim.AdamW(
        groups, lr=cfg.optim.lr, betas=tuple(cfg.optim.betas), eps=cfg.optim.eps, fused=cfg.optim.fused))
    if "scheduler" in ds:
        return opt, None
    warmup = int(cfg.optim.warmup_ratio * total_steps)

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / max(1, warmup)
        return max(0.0, (total_steps - step) / max(1, total_steps - warmup))

    return opt, lambda optimizer: torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


class SkipSampler(torch.utils.data.Sampler):
    """The rest of an epoch: ``sampler``'s order without its first ``skip`` indices.

    Skipping at the index level (not by loading and dropping batches) keeps resume exact even
    when a dataset or collate function draws random numbers.
    """

    def __init__(self, sampler, skip: int) -> None:
        self.sampler, self.skip = sampler, skip

    def __iter__(self):
        return itertools.islice(iter(self.sampler), self.skip, None)

    def __len__(self) -> int:
        return max(0, len(self.sampler) - self.skip)


def resumed_loader(loader: DataLoader, batches_done: int) -> DataLoader:
    return DataLoader(loader.dataset, batch_size=loader.batch_size, collate_fn=loader.collate_fn,
                      sampler=SkipSampler(loader.sampler, batches_done * loader.batch_size), drop_last=True,
                      generator=loader.generator)


def pad_stats(module) -> Dict[str, float]:
    """Per PAD unit: lambda_d, lambda_s and dynamic ratio (for TensorBoard and the summary)."""
    from ..pad.compose import PADUnit

    out: Dict[str, float] = {}
    for name, unit in module.named_modules():
        if isinstance(unit, PADUnit):
            lam_d, lam_s = (float(t.detach()) for t in unit.lambdas())
            out[f"pad/{name}/lambda_d"] = lam_d
            out[f"pad/{name}/lambda_s"] = lam_s
            if unit.shared_mask:
                out[f"pad/{name}/dynamic_ratio"] = float(unit.mask.float().mean())
    return out


def local_expert_loads(module) -> Dict[str, torch.Tensor]:
    """Tokens this rank routed to each global expert in the last forward, per MoE layer."""
    from ..moe.layer import pad_moe_layers

    return {name: torch.as_tensor(layer.last_expert_counts).detach().to(torch.float64)
            for name, layer in pad_moe_layers(module).items() if layer.last_expert_counts is not None}


def sum_over_ranks(loads: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
    if not dist.is_initialized() or not loads:
        return loads
    flat = torch.cat([t.reshape(-1) for t in loads.values()]).to(comm_device())
    dist.all_reduce(flat)
    out, at = {}, 0
    for name, t in loads.items():
        out[name] = flat[at:at + t.numel()].cpu().view(t.shape)
        at += t.numel()
    return out


def moe_aux(module) -> Optional[torch.Tensor]:
    from ..moe.layer import pad_moe_layers

    terms = [layer.last_l_aux for layer in pad_moe_layers(module).values() if layer.last_l_aux is not None]
    return torch.stack([t.float() for t in terms]).sum() if terms else None


def mean_over_ranks(values: Dict[str, float]) -> Dict[str, float]:
    if not dist.is_initialized() or not values:
        return values
    t = torch.tensor(list(values.values()), dtype=torch.float64, device=comm_device())
    dist.all_reduce(t)
    return {k: float(v) / world_size() for k, v in zip(values, t)}


def train(cfg: RunConfig) -> Dict[str, Any]:
    from ..partition import Partitioner

    init_distributed()
    run_dir = RunDir(cfg.output_dir)
    barrier = dist.barrier if dist.is_initialized() else (lambda: None)
    run_dir.prepare(cfg, is_writer=rank() == 0, barrier=barrier)
    barrier()
    seed_everything(cfg.seed)  # identical model init on every rank
    task = build_task(cfg)
    model = task.model
    if cfg.partition.mode == "before_training" and (cfg.partition.perturb_std or 0) > 0 and cfg.partition.ratio < 1.0:
        from ..moe.layer import pad_moe_layers
        from ..moe.upcycle import perturb_experts

        for layer in pad_moe_layers(model).values():
            perturb_experts(layer, cfg.partition.perturb_std, seed=cfg.seed)

    loader = train_loader(task, cfg, cfg.seed)
    sampler = loader.sampler
    steps_per_epoch = max(1, len(loader) // cfg.train.grad_accum)
    total = cfg.train.steps or max(1, int(cfg.train.epochs * steps_per_epoch))
    ds = load_ds_config(cfg)
    optimizer, scheduler = optimizer_and_schedule(cfg, ds, total)
    engine = build_engine(model, ds, optimizer=optimizer, weight_decay=cfg.optim.weight_decay,
                          lr_scheduler=scheduler)
    module = engine.module
    partitioner = Partitioner(module, cfg.partition, engine)
    monitor = Monitor(run_dir.tensorboard, enabled=rank() == 0)
    hooks = task.info.get("hooks", {})

    loop = {"step": 0, "epoch": 0, "batch_in_epoch": 0, "best": {}, "history": []}
    if cfg.resume:
        loop.update(checkpoint.load(engine, partitioner, run_dir))
        log.info("resumed from %s at step %d", loop.get("tag"), loop["step"])
    elif partitioner.active and cfg.partition.mode == "before_training":
        entries = partitioner.run_before_training(
            engine, scoring_batches(task, cfg),
            lambda eng, b: task.loss(eng, {k: v.to(eng.device) for k, v in task.align(b).items()}))
        for e in entries:
            log_partition(monitor, e, 0)

    progress = Progress(total, loop["step"])
    window: Dict[str, float] = {"loss": 0.0, "aux": 0.0, "n": 0, "tokens": 0}
    window_loads: Dict[str, torch.Tensor] = {}
    last_eval: Dict[str, float] = {}
    t0 = time.perf_counter()
    step = loop["step"]
    device = engine.device
    finished = step >= total
    while not finished:
        sampler.set_epoch(loop["epoch"])
        done = loop["batch_in_epoch"]
        for i, batch in enumerate(resumed_loader(loader, done) if done else loader, start=done):
            micro = i % cfg.train.grad_accum
            if micro == 0:
                partitioner.before_step(step)
                if "before_step" in hooks:
                    hooks["before_step"](module, step, loop["epoch"] + i / max(1, len(loader)))
            batch = {k: v.to(device) for k, v in task.align(batch).items()}
            window["tokens"] += task.tokens(batch)
            loss = task.loss(engine, batch)
            aux = moe_aux(module)
            total_loss = loss + cfg.moe.aux_loss_coef * aux if aux is not None else loss
            engine.backward(total_loss)
            engine.step()
            # Tensors until the log step: a float() here would sync the GPU every micro-batch.
            window["loss"] += loss.detach().float()
            window["aux"] += aux.detach().float() if aux is not None else 0.0
            window["n"] += 1
            for name, counts in local_expert_loads(module).items():
                window_loads[name] = window_loads.get(name, 0) + counts
            loop["batch_in_epoch"] = i + 1
            if micro != cfg.train.grad_accum - 1:
                continue
            step += 1
            loop["step"] = step
            entry = partitioner.after_step(step)
            if entry is not None:
                log_partition(monitor, entry, step)
            if step % cfg.train.log_every == 0 or step == total:
                elapsed = time.perf_counter() - t0
                stats = mean_over_ranks({"loss": float(window["loss"]) / max(1, window["n"]),
                                         "l_aux": float(window["aux"]) / max(1, window["n"]),
                                         "tokens_per_s": float(window["tokens"]) / max(elapsed, 1e-9)})
                stats["tokens_per_s"] *= world_size()
                unit = task.info.get("throughput_unit", "tokens")
                scalars = {"train/loss": stats["loss"], "train/l_aux": stats["l_aux"],
                           "train/lr": engine.get_lr()[0], f"perf/{unit}_per_s": stats["tokens_per_s"]}
                scalars.update(pad_stats(module))
                monitor.scalars(scalars, step)
                loads = sum_over_ranks(window_loads)
                monitor.expert_load(list(loads.values()), list(loads), step)
                window_loads = {}
                loop["history"].append({"step": step, "loss": stats["loss"], "l_aux": stats["l_aux"],
                                        "tokens_per_s": stats["tokens_per_s"]})
                progress.update(step, stats["loss"])
                window = {"loss": 0.0, "aux": 0.0, "n": 0, "tokens": 0}
                t0 = time.perf_counter()
            if cfg.train.eval_every and step % cfg.train.eval_every == 0 and step != total:
                last_eval = run_eval(engine, task, cfg, monitor, loop, step)
            if cfg.train.checkpoint_every and step % cfg.train.checkpoint_every == 0 and step != total:
                checkpoint.save(engine, partitioner, run_dir, step, loop, cfg.train.keep_checkpoints)
            if step >= total or (cfg.train.stop_at and step >= cfg.train.stop_at):
                finished = True
                break
        else:
            loop["epoch"] += 1
            loop["batch_in_epoch"] = 0
    progress.close()
    stopped = step < total
    if not stopped:
        last_eval = run_eval(engine, task, cfg, monitor, loop, step)
    checkpoint.save(engine, partitioner, run_dir, step, loop, cfg.train.keep_checkpoints)
    summary = build_summary(cfg, task, module, partitioner, loop, last_eval, step)
    summary["stopped_early"] = stopped
    if rank() == 0:
        run_dir.write_summary(summary)
    monitor.close()
    return summary


def run_eval(engine, task: Task, cfg: RunConfig, monitor: Monitor, loop: Dict[str, Any], step: int):
    metrics = evaluate(engine, task, cfg.train.eval_batch_size)
    monitor.scalars({f"eval/{k}": v for k, v in metrics.items()}, step)
    monitor.flush()
    main = metrics.get(task.main_metric)
    best = loop.get("best") or {}
    if main is not None and (not best or main > best.get(task.main_metric, -math.inf)):
        loop["best"] = dict(metrics, step=step)
    return metrics


def log_partition(monitor: Monitor, entry: Dict[str, Any], step: int) -> None:
    scalars = {"partition/ratio": entry.get("ratio", float("nan")),
               "partition/achieved": entry.get("achieved", float("nan"))}
    for name, layer in entry.get("layers", {}).items():
        scalars[f"partition/{name}/ratio"] = layer.get("ratio", float("nan"))
    monitor.scalars(scalars, step)


def train_loader(task: Task, cfg: RunConfig, seed: int) -> DataLoader:
    """This rank's shard of the training rows, shuffled by ``seed`` (per epoch via ``set_epoch``)."""
    sampler = DistributedSampler(task.train_set, num_replicas=world_size(), rank=rank(), shuffle=True,
                                 seed=seed, drop_last=True)
    # Its own generator: creating a loader iterator otherwise draws from the global RNG, and a
    # resumed run creates one at a different point than the uninterrupted run did.
    return DataLoader(task.train_set, batch_size=cfg.train.micro_batch_size, sampler=sampler,
                      collate_fn=task.collate, drop_last=True, generator=torch.Generator().manual_seed(cfg.seed))


def scoring_batches(task: Task, cfg: RunConfig) -> DataLoader:
    """A seeded subset of training rows for ``before_training`` scoring, the same on every rank's shard."""
    return train_loader(task, cfg, cfg.seed + 1)


def build_summary(cfg, task: Task, module, partitioner, loop, last_eval, step) -> Dict[str, Any]:
    from ..moe.layer import pad_moe_layers

    stats = pad_stats(module)
    layers: Dict[str, Dict[str, float]] = {}
    for key, value in stats.items():
        _, name, what = key.split("/", 2)
        layers.setdefault(name, {})[what] = value
    layer_ratios = partitioner.layer_ratios() if partitioner is not None else {}
    for name, ratio in layer_ratios.items():
        layers.setdefault(name, {})["dynamic_ratio"] = ratio
    history = loop.get("history", [])
    from ..conv.dyconv import dyconv_modules, total_param_counts

    dyconv = total_param_counts(module) if any(True for _ in dyconv_modules(module)) else None
    return {
        "eval": last_eval,
        "best_eval": loop.get("best", {}),
        "main_metric": task.main_metric,
        "train_loss": history[-1]["loss"] if history else None,
        "steps": step,
        "tokens_per_s": history[-1]["tokens_per_s"] if history else None,
        "dynamic_ratio": partitioner.overall_ratio(),
        "layers": layers,
        "moe_layers": list(pad_moe_layers(module)),
        "partition_log": list(partitioner.log),
        "dyconv_param_counts": dyconv,
        "task": task.info.get("task"),
        "world_size": world_size(),
        "config": to_dict(cfg),
        "history": history,
    }


class Progress:
    """tqdm on rank 0, silent elsewhere."""

    def __init__(self, total: int, start: int) -> None:
        self.bar = None
        if rank() == 0:
            from tqdm import tqdm

            self.bar = tqdm(total=total, initial=start, desc="train", dynamic_ncols=True, mininterval=2.0)
        self.last = start

    def update(self, step: int, loss: float) -> None:
        if self.bar is not None:
            self.bar.update(step - self.last)
            self.bar.set_postfix(loss=f"{loss:.4f}")
        self.last = step

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
