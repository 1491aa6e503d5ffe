"""Top-k selection of dynamic entries, deterministic so every rank derives the same mask.

Ties are broken by flat index (the lower index stays dynamic): the result depends only on
the score values, never on sort stability or the device.
"""
from __future__ import annotations

import math
from typing import List

import torch
from torch import Tensor


def keep_count(n: int, ratio: float) -> int:
    return min(n, max(0, int(math.floor(ratio * n + 0.5))))


def top_k(scores: Tensor, k: int) -> Tensor:
    """Bool tensor like ``scores`` with the ``k`` largest entries set (ties: lowest flat index)."""
    flat = scores.reshape(-1)
    n = flat.numel()
    if k >= n:
        return torch.ones_like(scores, dtype=torch.bool)
    keep = torch.zeros(n, dtype=torch.bool, device=flat.device)
    if k <= 0:
        return keep.view(scores.shape)
    # kthvalue is O(n) where a full sort would be O(n log n); the k-th largest is the (n-k+1)-th smallest.
    thr = torch.kthvalue(flat, n - k + 1).values
    keep |= flat > thr
    need = k - int(keep.sum())
    if need > 0:
        ties = torch.nonzero(flat == thr).squeeze(1)[:need]  # nonzero lists indices in ascending order
        keep[ties] = True
    return keep.view(scores.shape)


def select_global(scores: List[Tensor], ratio: float) -> List[Tensor]:
    """One threshold over every mask: the top ``ratio`` of all entries together."""
    flat = torch.cat([s.reshape(-1) for s in scores])
    keep = top_k(flat, keep_count(flat.numel(), ratio))
    return [part.view(s.shape) for part, s in zip(keep.split([s.numel() for s in scores]), scores)]


def select_each(scores: Tensor, ratio: float, masks: int) -> Tensor:
    """Each of ``masks`` masks stacked in ``scores`` (1 = replicated, E = per-expert) keeps ``ratio``."""
    rows = scores.reshape(masks, -1)
    k = keep_count(rows.shape[1], ratio)
    return torch.stack([top_k(r, k) for r in rows]).view(scores.shape)
