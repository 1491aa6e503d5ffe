"""Upcycling helpers: which global experts this rank holds, and symmetry breaking.

Right after upcycling every expert equals the static weight, so ``dL/dM`` is exactly zero
(docs/PAD.md section 4, the symmetry trap). ``perturb_experts`` breaks the symmetry with noise
seeded by the *global* expert id, so the perturbed model is the same for any ``ep_size``.
"""
from __future__ import annotations

from typing import List

import torch

from .layer import PADMoE


def expert_parallel_rank(layer: PADMoE) -> int:
    from deepspeed.utils import groups

    if layer.expert_group_name in groups._get_expert_parallel_group_dict():
        return groups._get_expert_parallel_rank(layer.expert_group_name)
    if torch.distributed.is_initialized():
        # DeepSpeed's default (expert-parallel before data-parallel) layout: EP groups are
        # consecutive blocks of ep_size ranks.
        return torch.distributed.get_rank() % layer.ep_size
    return 0


def global_expert_ids(layer: PADMoE) -> List[int]:
    first = expert_parallel_rank(layer) * layer.num_local_experts
    return list(range(first, first + layer.num_local_experts))


@torch.no_grad()
def perturb_experts(layer: PADMoE, relative_std: float, seed: int = 0) -> None:
    """Add ``relative_std * std(W) * N(0, 1)`` to each expert weight (biases untouched).

    Call before the DeepSpeed engine is built (ZeRO keeps its own fp32 copies afterwards).
    """
    if relative_std <= 0:
        return
    for gid, expert in zip(global_expert_ids(layer), layer.deepspeed_moe.experts.deepspeed_experts):
        gen = torch.Generator().manual_seed(seed * 100003 + gid)
        for _, p in sorted(expert.named_parameters()):
            if p.ndim < 2:
                continue
            noise = torch.randn(p.shape, generator=gen, dtype=torch.float32).to(p)
            p.add_(noise * (relative_std * p.float().std().to(p.dtype)))
