"""Evaluation on every rank, and ``padnet-ds eval`` on a finished or interrupted run."""
from __future__ import annotations

import math
from typing import Any, Dict, List, Sequence

import torch
import torch.distributed as dist
from torch.utils.data import DataLoader

from .distributed import rank, world_size
from .tasks import Task


def eval_loader(task: Task, batch_size: int) -> DataLoader:
    """Each rank gets the same number of rows (the last rows repeated, flagged), so MoE
    all-to-alls line up; duplicates are dropped before the metric."""
    n, world, r = len(task.eval_set), world_size(), rank()
    per_rank = math.ceil(n / world)
    idx = list(range(r, n, world))
    flags = [True] * len(idx) + [False] * (per_rank - len(idx))
    idx += [idx[-1] if idx else 0] * (per_rank - len(idx))
    rows = [(i, keep) for i, keep in zip(idx, flags)]

    def collate(items):
        batch = task.collate([task.eval_set[i] for i, _ in items])
        batch["_index"] = torch.tensor([i for i, _ in items])
        batch["_keep"] = torch.tensor([k for _, k in items])
        return batch

    return DataLoader(rows, batch_size=batch_size, shuffle=False, collate_fn=collate,
                      generator=torch.Generator().manual_seed(0))  # keep the global RNG (dropout) untouched


@torch.no_grad()
def evaluate(engine, task: Task, batch_size: int) -> Dict[str, float]:
    engine.eval()
    device = engine.device
    preds: List[Any] = []
    for batch in eval_loader(task, batch_size):
        index, keep = batch.pop("_index"), batch.pop("_keep")
        batch = {k: v.to(device) for k, v in task.align(batch).items()}
        p = task.predict(engine, batch).cpu()
        labels = batch["labels"].cpu()
        preds += [(int(i), pv.item(), lv.item()) for i, pv, lv, k in zip(index, p, labels, keep) if k]
    gathered: List[Any] = [None] * world_size()
    if dist.is_initialized():
        dist.all_gather_object(gathered, preds)
    else:
        gathered = [preds]
    rows = sorted({i: (p, l) for part in gathered for i, p, l in part}.items())
    engine.train()
    return task.metrics([p for _, (p, _) in rows], [l for _, (_, l) in rows])


def evaluate_run(path: str, overrides: Sequence[str] = ()) -> Dict[str, float]:
    """Rebuild the run's model from its saved config, load the latest weights, evaluate.

    Experts are stored one file per global expert, so the run can be evaluated on any
    number of ranks: ``moe.ep_size`` is lowered to fit the world when needed.
    """
    from .config import ConfigError, build, merge, parse_overrides, RunConfig
    from .distributed import init_distributed
    from .inspect import resolve
    from .setup import build_engine
    from .tasks import build_task
    from .trainer import load_ds_config, seed_everything

    run, tag_dir = resolve(path)
    if not (run / "config.yaml").is_file():
        raise ConfigError(f"{run} has no config.yaml: padnet-ds eval needs a run folder written by padnet-ds train")
    import yaml

    saved = yaml.safe_load((run / "config.yaml").read_text())
    cfg = build(RunConfig, merge(saved, parse_overrides(overrides)))
    init_distributed()
    if world_size() % cfg.moe.ep_size:
        cfg.moe.ep_size = math.gcd(world_size(), cfg.moe.ep_size)
    seed_everything(cfg.seed)
    task = build_task(cfg)
    ds = load_ds_config(cfg)
    for key in ("optimizer", "scheduler"):
        ds.pop(key, None)
    ds["zero_optimization"] = {"stage": 0}  # inference: ZeRO's partitioned optimizer has nothing to do
    engine = build_engine(task.model, ds)
    loaded, _ = engine.load_checkpoint(str(tag_dir.parent), tag=tag_dir.name, load_module_only=True,
                                       load_optimizer_states=False, load_lr_scheduler_states=False)
    if loaded is None:
        raise FileNotFoundError(f"could not load {tag_dir}")
    metrics = evaluate(engine, task, cfg.train.eval_batch_size)
    return dict(metrics, checkpoint=str(tag_dir), rows=len(task.eval_set))
