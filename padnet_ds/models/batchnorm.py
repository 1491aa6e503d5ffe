"""BatchNorm running statistics kept identical on every rank, in the parameters' dtype.

Data-parallel ranks see different images, so each BatchNorm layer's running mean and
variance drift apart unless they are averaged: every rank would then evaluate its rows with
its own statistics, and the checkpoint would keep rank 0's. :func:`average_bn_stats` does
that after every training forward (a few thousand values, one all-reduce).
"""
from __future__ import annotations

from typing import List

import torch
from torch import Tensor, nn

from ..comm import all_reduce_flat, world_size


def running_stats(module: nn.Module) -> List[Tensor]:
    """Every tracked BatchNorm running mean and variance under ``module``, in module order."""
    return [t for m in module.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats
            for t in (m.running_mean, m.running_var) if t is not None]


def average_bn_stats(module: nn.Module) -> None:
    """Average every BatchNorm running mean / variance over the ranks (a no-op on one process)."""
    world = world_size()
    bufs = running_stats(module)
    if world == 1 or not bufs:
        return
    with torch.no_grad():
        for buf, total in zip(bufs, all_reduce_flat(bufs, dtype=torch.float32)):
            # Through .data: the forward's autograd graph saved these buffers (version-checked in backward).
            buf.data.copy_(total / world)


def match_bn_buffers(module: nn.Module, dtype: torch.dtype) -> None:
    """Cast BatchNorm running statistics to ``dtype`` (bf16/fp16 engines cast parameters, not these buffers)."""
    for m in module.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            for name in ("running_mean", "running_var"):
                buf = getattr(m, name)
                if buf is not None and buf.dtype != dtype:
                    setattr(m, name, buf.to(dtype))
