"""What the loop reads off the model after a forward: the MoE aux loss and expert loads, the PAD lambdas and ratios.

All local to this rank (no collective); the log step reduces what it needs over the ranks.
"""
from __future__ import annotations

from typing import Dict, Optional

import torch
from torch import Tensor, nn

from ..moe.layer import pad_moe_layers
from ..pad.compose import PADUnit


def moe_aux_loss(module: nn.Module) -> Optional[Tensor]:
    """Sum of the load-balancing losses of the latest forward (unscaled); None without MoE layers."""
    terms = [layer.last_l_aux for layer in pad_moe_layers(module).values() if layer.last_l_aux is not None]
    return torch.stack([t.float() for t in terms]).sum() if terms else None


def local_expert_loads(module: nn.Module) -> Dict[str, Tensor]:
    """Tokens this rank routed to each global expert in the latest forward, per MoE layer (float64)."""
    return {name: torch.as_tensor(layer.last_expert_counts).detach().to(torch.float64)
            for name, layer in pad_moe_layers(module).items() if layer.last_expert_counts is not None}


def pad_stats(module: nn.Module) -> Dict[str, float]:
    """Per PAD unit: lambda_d, lambda_s and (shared masks) the dynamic ratio, keyed ``pad/<unit>/<what>``."""
    out: Dict[str, float] = {}
    for name, unit in module.named_modules():
        if isinstance(unit, PADUnit):
            lam_d, lam_s = (float(t.detach()) for t in unit.lambdas())
            out[f"pad/{name}/lambda_d"] = lam_d
            out[f"pad/{name}/lambda_s"] = lam_s
            if unit.shared_mask:
                out[f"pad/{name}/dynamic_ratio"] = unit.dynamic_ratio()
    return out
