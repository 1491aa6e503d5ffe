"""Workloads the training loop can run: what model, what data, how a batch becomes a loss.

The loop in ``trainer.py`` knows nothing about text or images; a task supplies the model,
the train/eval datasets, a collate function and the metric. Batches must have the same
shape on every rank when experts are sharded (DeepSpeed's expert capacity, and so the
all-to-all buffer size, depends on the tokens per rank), so text batches are padded to the
longest row *across ranks* (one scalar all-reduce per micro-batch), capped at ``max_length``.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Dict, List, Optional

import torch
from torch import nn

from .config import RunConfig


@dataclass
class Task:
    model: nn.Module
    train_set: Any
    eval_set: Any
    collate: Callable[[List[Dict[str, Any]]], Dict[str, torch.Tensor]]
    metrics: Callable[[Any, Any], Dict[str, float]]
    main_metric: str
    is_regression: bool
    info: Dict[str, Any]
    pad_id: Optional[int] = None  # text: pad sequences to the same length on every rank

    def align(self, batch: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
        """Pad the sequence dimension to the longest across ranks (text only; a no-op otherwise)."""
        if self.pad_id is None or "input_ids" not in batch:
            return batch
        import torch.distributed as dist

        from ..comm import comm_device

        length = torch.tensor(batch["input_ids"].shape[1], device=comm_device())
        if dist.is_initialized():
            dist.all_reduce(length, op=dist.ReduceOp.MAX)
        extra = int(length) - batch["input_ids"].shape[1]
        if extra <= 0:
            return batch
        return {k: (torch.nn.functional.pad(v, (0, extra), value=self.pad_id if k == "input_ids" else 0)
                    if k != "labels" and v.ndim == 2 else v) for k, v in batch.items()}

    def loss(self, engine, batch: Dict[str, torch.Tensor]):
        out = engine(**batch)
        return out.loss if hasattr(out, "loss") else out[0]

    def predict(self, engine, batch: Dict[str, torch.Tensor]) -> torch.Tensor:
        inputs = {k: v for k, v in batch.items() if k != "labels"}
        out = engine(**inputs)
        logits = out.logits if hasattr(out, "logits") else out
        return logits.squeeze(-1).float() if self.is_regression else logits.argmax(-1)

    def tokens(self, batch: Dict[str, torch.Tensor]):
        """Real (unpadded) tokens, or rows; a device tensor, so counting never syncs the GPU."""
        mask = batch.get("attention_mask")
        return mask.sum() if mask is not None else batch["labels"].numel()


def pad_to_length(items: List[Dict[str, Any]], length: int, pad_id: int) -> Dict[str, torch.Tensor]:
    """Pad to the batch's longest row rounded up to a multiple of 8, at most ``length``."""
    longest = max(len(it["input_ids"]) for it in items)
    length = min(length, -(-longest // 8) * 8)
    out: Dict[str, torch.Tensor] = {}
    for key in items[0]:
        if key == "labels":
            labels = [torch.as_tensor(it["labels"]) for it in items]
            out["labels"] = torch.stack(labels)
            continue
        fill = pad_id if key == "input_ids" else 0
        rows = torch.full((len(items), length), fill, dtype=torch.long)
        for i, it in enumerate(items):
            seq = torch.as_tensor(it[key], dtype=torch.long)[:length]
            rows[i, :len(seq)] = seq
        out[key] = rows
    return out


def text_task(cfg: RunConfig) -> Task:
    from ..data.encode import EncodedTextDataset
    from ..data.metrics import compute_metrics
    from ..data.text import load_text_task
    from ..models.encoder import build_classifier
    from ..models.pretrained import load_tokenizer

    spec, train, evals = load_text_task(cfg.data)
    tokenizer = load_tokenizer(cfg.model.tokenizer or cfg.model.name)
    moe = None if cfg.model.dense else cfg.moe
    model = build_classifier(cfg.model.name, spec.num_labels, spec.is_regression, moe,
                             random_init_config=cfg.model.random_init)
    length = cfg.model.max_length
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    return Task(model=model,
                train_set=EncodedTextDataset(tokenizer, train, length, regression=spec.is_regression),
                eval_set=EncodedTextDataset(tokenizer, evals, length, regression=spec.is_regression),
                collate=lambda items: pad_to_length(items, length, pad_id),
                metrics=lambda preds, labels: compute_metrics(spec, preds, labels),
                main_metric=spec.main_metric,
                is_regression=spec.is_regression,
                pad_id=pad_id,
                info={"task": spec.name, "num_labels": spec.num_labels, "train_rows": len(train),
                      "eval_rows": len(evals), "label_names": list(spec.label_names)})


def image_task(cfg: RunConfig) -> Task:
    """PAD DY-Conv ResNets on images (``engine/vision.py``, imported on demand); settings in ``extra.vision``."""
    from .vision import image_task as build_image_task

    return build_image_task(cfg)


TASKS: Dict[str, Callable[[RunConfig], Task]] = {"text": text_task, "image": image_task}


def register_task(name: str, factory: Callable[[RunConfig], Task]) -> None:
    TASKS[name] = factory


def build_task(cfg: RunConfig) -> Task:
    if cfg.task not in TASKS:
        from .config import ConfigError

        raise ConfigError(f"task={cfg.task!r} is not one of {sorted(TASKS)}")
    return TASKS[cfg.task](cfg)

