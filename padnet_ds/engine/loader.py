"""Which training rows each rank sees, in which order, grouped into optimizer steps; exact resume mid-epoch.

The order is a function of the *global* batch, not of the number of ranks. With ``n`` training
rows, ``W`` ranks, micro-batches of ``b`` rows and ``a`` micro-batches per optimizer step::

    P_e = randperm(n, seed + e)                     epoch e's order (DistributedSampler's)
    G   = W * b * a                                 rows per optimizer step (the global batch)
    B_s = P_e[o_s : o_s + G]                        step s's global batch, o_s = G * (steps of e before s)
    micro-batch m of rank r = B_s[k :: W * a],  k = m * W + r   (b rows)

so every layout with the same ``G`` trains on the same global batches, and every layout with
the same ``b`` (``W * a`` constant) on the same micro-batches: resuming on another number of
ranks with ``a`` scaled to keep ``G`` reproduces the uninterrupted run's micro-batches exactly.
With ``a = 1`` this is ``DistributedSampler``'s order (rank r takes every W-th row). A
text batch is padded to its global batch's longest row (``Task.step_length``), which every
rank computes from the same indices: one shape on every rank and in every layout, found
without a collective. The rows of an epoch that do not fill a whole step are skipped, so every
step is exactly ``a`` micro-batches and DeepSpeed's accumulation boundary is ours. The loop
state counts the rows of the epoch already used (``LoopState.rows_in_epoch``), which means
the same thing at any world size.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator, List, Sequence, Tuple

import torch

from ..comm import rank, world_size
from ..settings import ConfigError
from .config import RunConfig
from .state import LoopState
from .tasks import Batch, Task


@dataclass(frozen=True)
class GlobalBatches:
    """The training rows' global order and this rank's share of each global batch (module docstring)."""
    rows: int  # training rows
    micro: int  # rows per micro-batch (b)
    grad_accum: int  # micro-batches per optimizer step and rank (a)
    world: int  # ranks (W)
    rank: int
    seed: int

    @property
    def size(self) -> int:
        """Rows per optimizer step over all ranks: the global batch G."""
        return self.world * self.micro * self.grad_accum

    @property
    def steps_per_epoch(self) -> int:
        return self.rows // self.size

    def order(self, epoch: int) -> List[int]:
        """Epoch ``epoch``'s permutation of the rows (the same on every rank)."""
        gen = torch.Generator().manual_seed(self.seed + epoch)
        return torch.randperm(self.rows, generator=gen).tolist()

    def shares(self, batch: Sequence[int]) -> List[List[int]]:
        """This rank's micro-batches of the global batch ``batch``: slot k = m * W + r takes ``batch[k::W*a]``."""
        slots = self.world * self.grad_accum
        return [list(batch[m * self.world + self.rank::slots]) for m in range(self.grad_accum)]


def train_batches(task: Task, cfg: RunConfig, seed: int) -> GlobalBatches:
    """The run's global batches over ``task.train_set``, shuffled by ``seed`` per epoch; this rank's shares."""
    order = GlobalBatches(rows=len(task.train_set), micro=cfg.train.micro_batch_size, grad_accum=cfg.train.grad_accum,
                          world=world_size(), rank=rank(), seed=seed)
    if order.steps_per_epoch < 1:
        raise ConfigError(f"the global batch (world size {order.world} x train.micro_batch_size={order.micro} x "
                          f"train.grad_accum={order.grad_accum} = {order.size} rows) is larger than the {order.rows} "
                          "training rows: lower train.micro_batch_size or train.grad_accum, or use more data")
    return order


def micro_batches(task: Task, batches: GlobalBatches, batch: Sequence[int]) -> Iterator[Batch]:
    """This rank's collated micro-batches of the global batch ``batch``, lazily; text pads every one of them
    to the global batch's length (``task.step_length``)."""
    length = task.step_length(batch) if task.step_length is not None else None
    for share in batches.shares(batch):
        items = [task.train_set[i] for i in share]
        yield task.collate(items) if length is None else task.collate(items, pad_to=length)


def optimizer_steps(task: Task, batches: GlobalBatches, state: LoopState) -> Iterator[Tuple[float, Iterator[Batch]]]:
    """Endless ``(epoch position, micro-batches)`` per optimizer step, continuing from ``state``.

    ``micro-batches`` is a lazy iterator of ``grad_accum`` batches (each collated when the step
    asks for it); the epoch position is ``epoch + step in epoch / steps per epoch`` (what a
    ``DistributedSampler`` loader's ``batch / len(loader)`` gives with ``grad_accum`` 1, and the
    same at any layout with the same global batch), so an epoch's last step is just below ``epoch + 1``.
    ``state.epoch`` / ``state.rows_in_epoch`` advance as steps are handed out, so a checkpoint
    written during a step resumes after it.
    """
    while True:
        order = batches.order(state.epoch)
        while state.rows_in_epoch + batches.size <= batches.rows:
            start = state.rows_in_epoch
            state.rows_in_epoch = start + batches.size
            position = state.epoch + start / (batches.size * batches.steps_per_epoch)
            yield position, micro_batches(task, batches, order[start:state.rows_in_epoch])
        state.epoch += 1
        state.rows_in_epoch = 0


class ScoringBatches:
    """This rank's micro-batches of one epoch of a seeded order (``before_training`` scoring), re-iterable;
    every rank gets the same number."""

    def __init__(self, task: Task, batches: GlobalBatches) -> None:
        self.task, self.batches = task, batches

    def __iter__(self) -> Iterator[Batch]:
        order, size = self.batches.order(0), self.batches.size
        for start in range(0, self.batches.steps_per_epoch * size, size):
            yield from micro_batches(self.task, self.batches, order[start:start + size])


def scoring_batches(task: Task, cfg: RunConfig) -> ScoringBatches:
    """A seeded order of the training rows for ``before_training`` scoring (seed + 1)."""
    return ScoringBatches(task, train_batches(task, cfg, cfg.seed + 1))
