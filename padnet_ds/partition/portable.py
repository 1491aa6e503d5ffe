"""The partitioner's checkpointed state, independent of the cluster shape (resume on other ranks).

Each rank accumulates its own IMP sums ``s_r`` (its tokens, its local experts), and a partition
step uses the global score (sync.py)

    S = (sum_r s_r) / W                     replicated masks: over all W ranks
    S_e = (sum_{r holds e} s_r,e) / W       per-expert masks: over the ranks holding expert e

The global sum so far, ``S``, is what carries over: :func:`portable_state` computes it from the
per-rank files of a checkpoint written at W ranks, and :func:`local_sums` hands it back at W'
ranks so that the next partition step computes the same ``S`` plus the new contributions: the
first rank holding a mask (rank 0; for expert e the expert-data-parallel rank 0 of its holders)
gets ``W' * S``, every other rank starts from nothing. Counters: ``calls`` (the scored passes,
used only to detect "nothing scored") is the minimum over the source ranks, ``diverged`` (the
symmetry check) the OR, ``skipped`` the sum. Step, target ratio, log and the random method's
generator are the same on every rank and carry over as they are.
"""
from __future__ import annotations

from typing import Any, Dict, List, Optional

import torch
from torch import Tensor

from ..errors import CheckpointError

PORTABLE_VERSION = 1


def site_shapes(layout: List[list]) -> List[list]:
    """[name, mask shape, per-expert?] of each site: the part of a rank's layout every rank shares."""
    return [[name, list(shape), experts is not None] for name, shape, experts in layout]


def portable_state(states: List[Dict[str, Any]]) -> Dict[str, Any]:
    """The per-rank partitioner states of one checkpoint (rank order, every rank) -> the layout-independent one."""
    world = int(states[0]["world"])
    if len(states) != world or [int(s["rank"]) for s in states] != list(range(world)):
        raise CheckpointError(f"partitioner states of ranks {[s['rank'] for s in states]} given, the checkpoint has "
                              f"{world} ranks: every rank's file is needed")
    first = states[0]
    if any(s["step"] != first["step"] for s in states):
        raise CheckpointError("partitioner states of one checkpoint disagree on the partition step: not one checkpoint")
    scores: List[Optional[Tensor]] = []
    for i, (_, shape, _) in enumerate(first["layout"]):
        total: Optional[Tensor] = None
        for s in states:
            experts = s["layout"][i][2]
            for j, buf in enumerate(s["scores"]["sums"][i]):
                if buf is None:
                    continue
                if total is None:
                    count = 1 + max(e for st in states for e in (st["layout"][i][2] or [0]))
                    total = torch.zeros(shape if experts is None else [count, *shape], dtype=torch.float32)
                (total if experts is None else total[experts[j]]).add_(buf.float())
        scores.append(None if total is None else total / world)
    return {"version": PORTABLE_VERSION, "portable": True, "source_world": world,
            "step": first["step"], "ratio": first["ratio"], "rng": first["rng"], "log": first["log"],
            "config": first["config"], "sites": site_shapes(first["layout"]), "scores": scores,
            "calls": min(int(s["scores"]["calls"]) for s in states),
            "skipped": sum(int(s["scores"].get("skipped", 0)) for s in states),
            "diverged": [any(s["scores"]["diverged"][i] for s in states) for i in range(len(first["layout"]))]}


def local_sums(score: Optional[Tensor], experts: Optional[List[int]], holds_first: bool,
               world: int) -> List[Optional[Tensor]]:
    """This rank's sums for one site from its global score (module docstring): ``world * S`` on the
    first holder, nothing elsewhere. ``experts`` are this rank's global expert ids (None: replicated)."""
    if experts is None:
        return [score * world if score is not None and holds_first else None]
    return [score[e] * world if score is not None and holds_first else None for e in experts]
