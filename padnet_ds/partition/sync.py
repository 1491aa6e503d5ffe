"""Rank synchronization of scores and masks (docs/PAD.md section 5).

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
from torch import Tensor

from ..comm import all_gather_flat, all_reduce_flat, dist_on, reduce_values, world_size as world
from .sites import Site

FP32 = torch.float32  # scores travel in fp32 whatever the model's dtype


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


def global_imp_scores(sites: List[Site], local: List[List[Tensor]]) -> List[Tensor]:
    """Global score per site: replicated -> [*shape]; per-expert -> [E, *shape] by global expert id.

    Divided by the world size, so it is ``dL/dM`` of the mean over ranks of each rank's loss:
    the quantity DeepSpeed's averaged gradients optimize, and what one process computes on
    the union of all ranks' batches.
    """
    out: List[Optional[Tensor]] = [None] * len(sites)
    rep = [i for i, s in enumerate(sites) if s.replicated]
    for i, t in zip(rep, all_reduce_flat([local[i][0] for i in rep], dtype=FP32)):
        out[i] = t
    by_group: Dict[str, List[int]] = defaultdict(list)
    for i, s in enumerate(sites):
        if not s.replicated:
            by_group[s.group_name].append(i)
    for idx in by_group.values():
        ep, edp = expert_groups(sites[idx[0]])
        stacked = [torch.stack(local[i]) for i in idx]
        summed = all_reduce_flat(stacked, group=edp, dtype=FP32)
        for i, parts in zip(idx, zip(*all_gather_flat(summed, ep, dtype=FP32))):
            out[i] = torch.cat(parts)  # EP rank r holds experts r*E_local .. (r+1)*E_local - 1
    return [t / world() for t in out]


def global_magnitudes(sites: List[Site], local: List[List[Tensor]]) -> List[Tensor]:
    """Magnitudes need no data-parallel sum: sum shared-mask experts over EP, gather per-expert ones."""
    out: List[Tensor] = []
    for site, parts in zip(sites, local):
        if site.replicated and site.factors_sharded:
            out.append(all_reduce_flat(parts, group=expert_groups(site)[0], dtype=FP32)[0])
        elif site.replicated:
            out.append(parts[0])
        else:
            gathered = all_gather_flat([torch.stack(parts)], expert_groups(site)[0], dtype=FP32)
            out.append(torch.cat([g[0] for g in gathered]))
    return out


def global_counts(sites: List[Site], local: List[List[int]]) -> List[List[int]]:
    """Per site, global sums of per-mask integer counts (e.g. dynamic entries, flips).

    Each site's entry is a list of counts summed over its masks: replicated masks are counted
    once, per-expert masks once per global expert.
    """
    sums = [sum(c) for c in local]
    if not any(not s.replicated for s in sites) or not dist_on():
        return sums
    copies = [world() if s.replicated else world() // (s.num_experts // len(s.masks)) for s in sites]
    return [int(v) // c for v, c in zip(reduce_values(sums, dtype=torch.int64), copies)]


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
    local = torch.tensor(rows, dtype=torch.int64).reshape(-1, 4)  # [masks, (site, expert id, digest halves)]
    table = [parts[0] for parts in all_gather_flat([local])]  # one [masks, 4] table per rank
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
