"""Workloads the training loop can run: the :class:`Task` protocol and the registry of task types.

The loop (``trainer.py``) knows nothing about text or images; a task supplies the model, the
train/eval datasets, a collate function, the metric and two optional hooks. The built-in
task types register themselves: ``text`` (``text_task.py``) and ``image`` (``image_task.py``);
``validate.py`` imports both. Your own::

    register_task("audio", build_audio_task, check=check_audio_config, sections=("audio",))

``check(cfg)`` runs on every rank before the run folder is touched and must raise a
:class:`~padnet_ds.settings.ConfigError` naming the key; ``sections`` are the ``extra.<name>``
config sections the task reads (any other ``extra`` key is an error).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Dict, Optional, Sequence, Tuple

import torch
from torch import Tensor, nn

from ..settings import ConfigError
from .config import RunConfig

Batch = Dict[str, Tensor]


@dataclass
class Task:
    """What the loop needs from a workload."""
    name: str  # e.g. "sst2", "image/mnist5k" (summary.json's "task")
    model: nn.Module
    train_set: Any  # a map-style dataset; items go through `collate`
    eval_set: Any
    collate: Callable[..., Batch]  # collate(items), or collate(items, pad_to=L) when step_length is set
    metrics: Callable[[Sequence, Sequence], Dict[str, float]]  # (predictions, labels) -> {name: value}
    main_metric: str  # picks the best eval
    is_regression: bool = False
    label_names: Tuple[str, ...] = ()  # index = label id (summary.json, export's id2label); () for regression
    throughput_unit: str = "tokens"  # TensorBoard's perf/<unit>_per_s
    # Text: the sequence length every micro-batch of a training step is padded to, from the row indices
    # of the step's global batch (its longest row). Every rank sees the same indices, so all ranks, and
    # every world size, get one shape without a collective (engine/loader.py). None: fixed-size rows.
    step_length: Optional[Callable[[Sequence[int]], int]] = None
    # Every rank calls it on every eval (and, without step_length, training) batch, in the same order,
    # before the model sees it; it may run a collective (text: pad to the longest row across ranks).
    align: Optional[Callable[[Batch], Batch]] = None
    # before_step(module, step, epoch) before each optimizer step's micro-batches: `step` optimizer
    # steps are done, `epoch` is the fractional epoch position (image: the DY-Conv temperature).
    before_step: Optional[Callable[[nn.Module, int, float], None]] = None

    def prepare(self, batch: Batch, device: torch.device, train: bool = False) -> Batch:
        """``batch`` aligned across ranks and on ``device``: what the model is called with. Training
        batches of a task with ``step_length`` are aligned already (padded to their step's length)."""
        if self.align is not None and not (train and self.step_length is not None):
            batch = self.align(batch)
        return {k: v.to(device) for k, v in batch.items()}

    def loss(self, engine, batch: Batch) -> Tensor:
        out = engine(**batch)
        return out.loss if hasattr(out, "loss") else out[0]

    def logits(self, engine, batch: Batch) -> Tensor:
        """The model's raw outputs for ``batch`` [rows, num_labels] (labels are not passed)."""
        inputs = {k: v for k, v in batch.items() if k != "labels"}
        out = engine(**inputs)
        return out.logits if hasattr(out, "logits") else out

    def prediction(self, logits: Tensor) -> Tensor:
        """What the metric scores: the value (regression) or the argmax class, per row."""
        return logits.squeeze(-1).float() if self.is_regression else logits.argmax(-1)

    def predict(self, engine, batch: Batch) -> Tensor:
        return self.prediction(self.logits(engine, batch))

    def tokens(self, batch: Batch):
        """Real (unpadded) tokens, or rows; a device tensor, so counting never syncs the GPU."""
        mask = batch.get("attention_mask")
        return mask.sum() if mask is not None else batch["labels"].numel()


@dataclass(frozen=True)
class TaskType:
    build: Callable[[RunConfig], Task]
    check: Optional[Callable[[RunConfig], Any]] = None  # validates the task's settings; raises ConfigError
    sections: Tuple[str, ...] = ()  # the extra.<name> sections the task reads


TASKS: Dict[str, TaskType] = {}


def register_task(name: str, build: Callable[[RunConfig], Task], check: Optional[Callable[[RunConfig], Any]] = None,
                  sections: Sequence[str] = ()) -> None:
    TASKS[name] = TaskType(build, check, tuple(sections))


def task_type(name: str) -> TaskType:
    if name not in TASKS:
        raise ConfigError(f"task={name!r} is not one of {', '.join(sorted(TASKS))}")
    return TASKS[name]


def check_task_config(cfg: RunConfig) -> None:
    """The task exists, ``extra`` holds only its sections, and its own check passes."""
    kind = task_type(cfg.task)
    unknown = sorted(set(cfg.extra) - set(kind.sections))
    if unknown:  # e.g. a misspelt `extra.visoin` would otherwise train with every default
        reads = ", ".join(f"extra.{s}" for s in kind.sections) + " only" if kind.sections else "no extra.* section"
        raise ConfigError(f"unknown config key extra.{unknown[0]}: task {cfg.task!r} reads {reads}")
    if kind.check is not None:
        kind.check(cfg)


def build_task(cfg: RunConfig) -> Task:
    return task_type(cfg.task).build(cfg)
