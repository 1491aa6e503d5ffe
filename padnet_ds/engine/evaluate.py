"""Evaluation sharded over the ranks: every rank forwards the same number of batches, rank 0 and
every other rank get the same metrics."""
from __future__ import annotations

import math
from typing import Any, Dict, List, Optional

import torch
import torch.distributed as dist
from torch.utils.data import DataLoader

from ..comm import dist_on, rank, world_size
from .tasks import Task


def eval_loader(task: Task, batch_size: int) -> DataLoader:
    """Each rank gets the same number of rows (the last rows repeated, flagged), so MoE
    all-to-alls line up; duplicates are dropped before the metric."""
    n, world, r = len(task.eval_set), world_size(), rank()
    per_rank = math.ceil(n / world)
    idx = list(range(r, n, world))
    counted = [True] * len(idx) + [False] * (per_rank - len(idx))  # False: a repeated row, not scored
    idx += [idx[-1] if idx else 0] * (per_rank - len(idx))
    rows = list(zip(idx, counted))

    def collate(items):
        batch = task.collate([task.eval_set[i] for i, _ in items])
        batch["_index"] = torch.tensor([i for i, _ in items])
        batch["_counted"] = torch.tensor([c for _, c in items])
        return batch

    return DataLoader(rows, batch_size=batch_size, shuffle=False, collate_fn=collate,
                      generator=torch.Generator().manual_seed(0))  # keep the global RNG (dropout) untouched


@torch.no_grad()
def evaluate(engine, task: Task, batch_size: int, rows: Optional[List[Dict[str, Any]]] = None) -> Dict[str, float]:
    """Collective: per batch the task's align and the model's all-to-alls, then one all-gather of predictions.

    ``rows``, when given, receives one entry per eval row in order (every rank alike): its index,
    label, prediction and fp32 logits (``padnet-ds eval --predictions``).
    """
    engine.eval()
    preds: List[Any] = []
    for batch in eval_loader(task, batch_size):
        index, counted = batch.pop("_index"), batch.pop("_counted")
        batch = task.prepare(batch, engine.device)
        logits = task.logits(engine, batch).float().cpu()
        p = task.prediction(logits)
        labels = batch["labels"].cpu()
        preds += [(int(i), pv.item(), lv.item(), lg.tolist() if rows is not None else None)
                  for i, pv, lv, lg, c in zip(index, p, labels, logits, counted) if c]
    gathered: List[Any] = [None] * world_size()
    if dist_on():
        dist.all_gather_object(gathered, preds)
    else:
        gathered = [preds]
    ordered = sorted({i: (p, label, lg) for part in gathered for i, p, label, lg in part}.items())
    engine.train()
    if rows is not None:
        rows += [{"index": i, "label": label, "prediction": p, "logits": lg} for i, (p, label, lg) in ordered]
    return task.metrics([p for _, (p, _, _) in ordered], [label for _, (_, label, _) in ordered])
