"""Top-k selection of dynamic entries, deterministic so every rank derives the same mask.

Ties are broken by flat index (the lower index stays dynamic): the result depends only on
the score values, never on sort stability or the device.
"""
from __future__ import annotations

import math
from typing import List

import torch
from torch import Tensor


def dynamic_count(n: int, ratio: float) -> int:
    """Entries of ``n`` that stay dynamic at ``ratio`` (rounded half up)."""
    return min(n, max(0, int(math.floor(ratio * n + 0.5))))


SAMPLE = 1 << 16  # entries looked at to bracket the threshold


def kth_largest(flat: Tensor, k: int) -> Tensor:
    """The ``k``-th largest value of 1-d ``flat`` (0-d tensor), exactly ``torch.kthvalue``'s answer.

    ``kthvalue`` over millions of scores costs most of a partition step. A strided sample
    brackets the answer; two comparisons count what lies above the bracket, and ``kthvalue``
    then runs on the few entries inside it. If the bracket misses (it practically never does),
    the full ``kthvalue`` runs, so the result never depends on the sample.
    """
    n = flat.numel()
    if n <= 8 * SAMPLE:
        return torch.kthvalue(flat, n - k + 1).values
    sample = flat[:: n // SAMPLE]
    m = sample.numel()
    pos = (n - k) / n * m  # where the answer sits among the sample's sorted values
    margin = 4 * math.sqrt(m) + 8
    ordered = torch.sort(sample).values
    lo = ordered[max(0, int(pos - margin))]
    hi = ordered[min(m - 1, int(pos + margin))]
    above = int(torch.count_nonzero(flat > hi))
    inside = flat[(flat >= lo) & (flat <= hi)]
    if above < k <= above + inside.numel():
        return torch.kthvalue(inside, inside.numel() - (k - above) + 1).values
    return torch.kthvalue(flat, n - k + 1).values


def top_k(scores: Tensor, k: int) -> Tensor:
    """Bool tensor like ``scores`` with the ``k`` largest entries set (ties: lowest flat index)."""
    flat = scores.reshape(-1)
    n = flat.numel()
    if k >= n:
        return torch.ones_like(scores, dtype=torch.bool)
    chosen = torch.zeros(n, dtype=torch.bool, device=flat.device)
    if k <= 0:
        return chosen.view(scores.shape)
    thr = kth_largest(flat, k)
    chosen |= flat > thr
    need = k - int(torch.count_nonzero(chosen))
    if need > 0:
        ties = torch.nonzero(flat == thr).squeeze(1)[:need]  # nonzero lists indices in ascending order
        chosen[ties] = True
    return chosen.view(scores.shape)


def select_global(scores: List[Tensor], ratio: float) -> List[Tensor]:
    """One threshold over every mask: the top ``ratio`` of all entries together."""
    flat = torch.cat([s.reshape(-1) for s in scores])
    dynamic = top_k(flat, dynamic_count(flat.numel(), ratio))
    return [part.view(s.shape) for part, s in zip(dynamic.split([s.numel() for s in scores]), scores)]


def select_each(scores: Tensor, ratio: float, masks: int) -> Tensor:
    """Each of ``masks`` masks stacked in ``scores`` (1 = replicated, E = per-expert) keeps ``ratio``."""
    rows = scores.reshape(masks, -1)
    k = dynamic_count(rows.shape[1], ratio)
    return torch.stack([top_k(r, k) for r in rows]).view(scores.shape)
