"""Which training rows each rank sees, in which order, grouped into optimizer steps; exact resume mid-epoch.

Every rank trains on its own shard (``DistributedSampler``, reshuffled per epoch from the run's
seed) in micro-batches of ``train.micro_batch_size``; ``train.grad_accum`` micro-batches make
one optimizer step. An epoch's last micro-batches that do not fill a whole step are skipped
(like ``drop_last`` for rows), so every step sees exactly ``grad_accum`` micro-batches.
"""
from __future__ import annotations

import itertools
from typing import Iterator, Tuple

import torch
from torch.utils.data import DataLoader, DistributedSampler

from ..comm import rank, world_size
from .config import RunConfig
from .state import LoopState
from .tasks import Task


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


def steps_per_epoch(loader: DataLoader, grad_accum: int) -> int:
    return max(1, len(loader) // grad_accum)


def optimizer_steps(loader: DataLoader, grad_accum: int, state: LoopState) -> Iterator[Tuple[float, Iterator]]:
    """Endless ``(epoch position, micro-batches)`` per optimizer step, continuing from ``state``.

    ``micro-batches`` is a lazy iterator of ``grad_accum`` batches (each loaded when the step asks
    for it); the epoch position is the fractional epoch at the step's first micro-batch.
    ``state.epoch`` / ``state.batch_in_epoch`` advance as steps are handed out, so a checkpoint
    written during a step resumes after it.
    """
    while True:
        loader.sampler.set_epoch(state.epoch)
        done = state.batch_in_epoch
        batches = iter(resumed_loader(loader, done) if done else loader)
        while done + grad_accum <= len(loader):
            state.batch_in_epoch = done + grad_accum
            micro_batches = itertools.islice(batches, grad_accum)
            yield state.epoch + done / max(1, len(loader)), micro_batches
            for _ in micro_batches:  # a step that stopped early must not shift the next one
                pass
            done += grad_accum
        state.epoch += 1
        state.batch_in_epoch = 0
