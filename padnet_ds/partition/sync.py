"""Rank synchronization of scores and masks (PAD_SPEC section 5).

- Replicated masks: each rank's score already sums its local experts and tokens; an
  all-reduce SUM over the world gives the global score everywhere.
- Per-expert masks: all-reduce SUM over the expert-data-parallel group (ranks holding the
  same experts), then all-gather over the expert-parallel group so that every rank holds
  every expert's score and computes the same threshold.
- Agreement: every rank all-gathers a digest of each of its masks; all ranks then check the
  same table and raise the same error, so a mismatch never leaves a rank waiting.

Tensors are batched into one flat buffer per collective, so a partition step costs a handful
of collectives however many layers the model has.
"""
from __future__ import annotations

import hashlib
from collections import defaultdict
from typing import Dict, List, Optional, Tuple

import numpy as np
import torch
import torch.distributed as dist
from torch import Tensor

from ..comm import comm_device, dist_on, rank, world_size as world  # noqa: F401
from .sites import Site


def group_size(group) -> int:
    return dist.get_world_size(group) if dist_on() else 1


def expert_groups(site: Site) -> Tuple[Optional[object], Optional[object]]:
    """(expert-parallel group, expert-data-parallel group) of a per-expert site."""
    if not dist_on():
        return None, None
    from deepspeed.utils import groups

    if site.group_name not in groups._get_expert_parallel_group_dict():
        raise RuntimeError(f"DeepSpeed's expert process groups '{site.group_name}' for {site.name} do not exist: "
                           "build the DeepSpeed engine (padnet_ds.engine.setup.build_engine) before the Partitioner")
    return (groups._get_expert_parallel_group(site.group_name),
            groups._get_expert_data_parallel_group(site.group_name))


def _flat(tensors: List[Tensor]) -> Tensor:
    return torch.cat([t.reshape(-1).float() for t in tensors]) if tensors else torch.zeros(0)


def _unflat(flat: Tensor, like: List[Tensor]) -> List[Tensor]:
    out, at = [], 0
    for t in like:
        out.append(flat[at:at + t.numel()].view(t.shape))
        at += t.numel()
    return out


def all_reduce_sum(tensors: List[Tensor], group=None) -> List[Tensor]:
    """Sum over ``group`` (None = world) in one collective; returns new fp32 tensors."""
    flat = _flat(tensors)
    if dist_on() and group_size(group) > 1 and flat.numel():
        dist.all_reduce(flat, group=group)
    return _unflat(flat, tensors)


def all_gather(tensors: List[Tensor], group) -> List[List[Tensor]]:
    """Every group member's ``tensors`` (same shapes everywhere), in group-rank order."""
    flat = _flat(tensors)
    if not dist_on() or group_size(group) == 1:
        return [_unflat(flat, tensors)]
    parts = [torch.empty_like(flat) for _ in range(group_size(group))]
    dist.all_gather(parts, flat, group=group)
    return [_unflat(p, tensors) for p in parts]


def global_imp_scores(sites: List[Site], local: List[List[Tensor]]) -> List[Tensor]:
    """Global score per site: replicated -> [*shape]; per-expert -> [E, *shape] by global expert id.

    Divided by the world size, so it is ``dL/dM`` of the mean over ranks of each rank's loss:
    the quantity DeepSpeed's averaged gradients optimize, and what one process computes on
    the union of all ranks' batches.
    """
    out: List[Optional[Tensor]] = [None] * len(sites)
    rep = [i for i, s in enumerate(sites) if s.replicated]
    for i, t in zip(rep, all_reduce_sum([local[i][0] for i in rep])):
        out[i] = t
    by_group: Dict[str, List[int]] = defaultdict(list)
    for i, s in enumerate(sites):
        if not s.replicated:
            by_group[s.group_name].append(i)
    for idx in by_group.values():
        ep, edp = expert_groups(sites[idx[0]])
        stacked = [torch.stack(local[i]) for i in idx]
        summed = all_reduce_sum(stacked, edp)
        for i, parts in zip(idx, zip(*all_gather(summed, ep))):
            out[i] = torch.cat(parts)  # EP rank r holds experts r*E_local .. (r+1)*E_local - 1
    return [t / world() for t in out]


def global_magnitudes(sites: List[Site], local: List[List[Tensor]]) -> List[Tensor]:
    """Magnitudes need no data-parallel sum: sum shared-mask experts over EP, gather per-expert ones."""
    out: List[Tensor] = []
    for site, parts in zip(sites, local):
        if site.replicated and site.factors_sharded:
            out.append(all_reduce_sum(parts, expert_groups(site)[0])[0])
        elif site.replicated:
            out.append(parts[0])
        else:
            out.append(torch.cat([g[0] for g in all_gather([torch.stack(parts)], expert_groups(site)[0])]))
    return out


def _over_ranks(values: list, op, dtype: torch.dtype) -> list:
    """Element-wise ``op`` of ``values`` over every rank (``values`` unchanged without a group)."""
    if not dist_on() or world() == 1 or not values:
        return list(values)
    t = torch.tensor(values, dtype=dtype, device=comm_device())
    dist.all_reduce(t, op=op)
    return t.tolist()


def min_over_ranks(value: int) -> int:
    return int(_over_ranks([value], dist.ReduceOp.MIN, torch.int64)[0])


def max_over_ranks(values: List[float]) -> List[float]:
    return _over_ranks(values, dist.ReduceOp.MAX, torch.float64)


def global_counts(sites: List[Site], local: List[List[int]]) -> List[List[int]]:
    """Per site, global sums of per-mask integer counts (e.g. dynamic entries, flips).

    Each site's entry is a list of counts summed over its masks: replicated masks are counted
    once, per-expert masks once per global expert.
    """
    sums = [sum(c) for c in local]
    if not any(not s.replicated for s in sites) or not dist_on():
        return sums
    t = torch.tensor(sums, dtype=torch.int64, device=comm_device())
    dist.all_reduce(t)
    copies = [world() if s.replicated else world() // (s.num_experts // len(s.masks)) for s in sites]
    return [int(v) // c for v, c in zip(t.tolist(), copies)]


# -- agreement ----------------------------------------------------------------------------------
def mask_digest(mask: Tensor) -> bytes:
    data = mask.detach().to("cpu", torch.bool).contiguous().numpy()
    return hashlib.blake2b(data.tobytes() + str(tuple(data.shape)).encode(), digest_size=16).digest()


def verify(sites: List[Site], when: str) -> List[str]:
    """Check every copy of every mask agrees; returns one digest string per rank.

    Raises RuntimeError (on every rank alike) naming the layer, unit, expert and ranks that differ.
    """
    rows = []
    for i, site in enumerate(sites):
        for j, mask in enumerate(site.masks):
            gid = -1 if site.replicated else site.experts[j]
            rows.append([i, gid, *np.frombuffer(mask_digest(mask), dtype=np.int64).tolist()])
    local = torch.tensor(rows, dtype=torch.int64, device=comm_device()).reshape(-1, 4)
    if dist_on() and world() > 1:
        table = [torch.empty_like(local) for _ in range(world())]
        dist.all_gather(table, local)
    else:
        table = [local]
    table = [t.cpu() for t in table]
    copies: Dict[Tuple[int, int], Dict[Tuple[int, int], List[int]]] = defaultdict(lambda: defaultdict(list))
    for r, t in enumerate(table):
        for site_idx, gid, d0, d1 in t.tolist():
            copies[(site_idx, gid)][(d0, d1)].append(r)
    problems = []
    for (site_idx, gid), by_digest in copies.items():
        if len(by_digest) > 1:
            site = sites[site_idx]
            which = f"unit {site.name}" + ("" if gid < 0 else f" expert {gid}")
            holders = "; ".join(f"ranks {rs} hold {np.array([d0, d1]).tobytes().hex()[:12]}"
                                for (d0, d1), rs in sorted(by_digest.items(), key=lambda kv: kv[1]))
            problems.append(f"layer {site.layer or '<root>'} {which}: {holders}")
    if problems:
        raise RuntimeError(f"PAD masks disagree between ranks {when}: " + " | ".join(problems[:8])
                           + (f" (+{len(problems) - 8} more)" if len(problems) > 8 else "")
                           + ". Every rank holding a copy of a mask must hold the same mask; it was changed on some "
                           "ranks only (a rank-local mask edit, or a checkpoint loaded on some ranks only)")
    return [hashlib.blake2b(t.numpy().tobytes(), digest_size=8).hexdigest() for t in table]
