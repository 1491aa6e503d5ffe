"""The text workload (``task: text``): a BERT-family classifier upcycled to PAD-MoE on GLUE, files or
Rotten Tomatoes (the run config's ``model``, ``moe`` and ``data`` sections).

Batches must have the same shape on every rank when experts are sharded: DeepSpeed's expert
capacity, and so the all-to-all buffer size, depends on the tokens per rank. A training
micro-batch is padded to the longest row of its step's global batch (rounded up to 8, capped at
``model.max_length``), which every rank computes from the same row indices (``Task.step_length``,
engine/loader.py), so the padded length is also the same at any world size. An eval batch is
padded to its own longest row, then to the longest *across ranks* (:func:`align_lengths`, one
scalar all-reduce per batch).
"""
from __future__ import annotations

from functools import partial

import torch
import torch.distributed as dist
import torch.nn.functional as F

from ..comm import reduce_values
from ..data.text import check_text_files
from ..settings import ConfigError
from .config import RunConfig
from .distributed import launch_world
from .tasks import Batch, Task, register_task


def align_lengths(batch: Batch, pad_id: int) -> Batch:
    """Pad the sequence dimension to the longest across ranks (collective: every rank, every batch)."""
    if "input_ids" not in batch:
        return batch
    length = int(reduce_values([batch["input_ids"].shape[1]], dist.ReduceOp.MAX, torch.int64)[0])
    extra = length - batch["input_ids"].shape[1]
    if extra <= 0:
        return batch
    return {k: (F.pad(v, (0, extra), value=pad_id if k == "input_ids" else 0) if k != "labels" and v.ndim == 2
                else v) for k, v in batch.items()}


def check_text_config(cfg: RunConfig) -> None:
    world = launch_world()
    if not cfg.model.dense and world % cfg.moe.ep_size:
        raise ConfigError(f"moe.ep_size={cfg.moe.ep_size} does not divide the world size {world}: expert-parallel "
                          "groups tile the ranks, so launch a multiple of ep_size ranks or change moe.ep_size")
    check_text_files(cfg.data)  # the GLUE task, data files and folders: before the model is built


def text_task(cfg: RunConfig) -> Task:
    from ..data.encode import EncodedTextDataset, pad_to_length
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
    train_set = EncodedTextDataset(tokenizer, train, length, regression=spec.is_regression)
    return Task(name=spec.name, model=model, train_set=train_set,
                eval_set=EncodedTextDataset(tokenizer, evals, length, regression=spec.is_regression),
                collate=partial(pad_to_length, length=length, pad_id=pad_id),
                metrics=partial(compute_metrics, spec), main_metric=spec.main_metric,
                is_regression=spec.is_regression, label_names=tuple(spec.label_names), throughput_unit="tokens",
                step_length=partial(train_set.padded_length, cap=length), align=partial(align_lengths, pad_id=pad_id))


register_task("text", text_task, check=check_text_config)
