"""The dynamic half of PAD: expert linears that DeepSpeed copies, shards and reduces.

``to_pad_expert`` turns every ``nn.Linear`` of a user's expert module into a
:class:`PADExpertLinear` holding only that expert's ``W_e`` and ``b_e`` (plus its own mask
when masks are per expert). The replicated half (static weight, shared mask, phi) is a
:class:`~padnet_ds.pad.compose.PADUnit` owned by the layer and bound to every copy by
reference, outside the module tree, so DeepSpeed never sees it as part of an expert.
"""
from __future__ import annotations

import copy
from typing import Dict, List, Optional, Tuple

import torch
from torch import Tensor, nn

from ..pad.compose import PADUnit


class PADExpertLinear(nn.Module):

    def __init__(self, linear: nn.Linear, per_expert_mask: bool = False) -> None:
        super().__init__()
        self.in_features = linear.in_features
        self.out_features = linear.out_features
        self.weight = nn.Parameter(linear.weight.detach().clone())
        self.bias = nn.Parameter(linear.bias.detach().clone()) if linear.bias is not None else None
        if per_expert_mask:
            self.register_buffer("mask", torch.ones_like(self.weight, dtype=torch.bool))
        else:
            self.mask = None
        self.__dict__["unit"] = None  # bound by the layer; kept out of the module tree on purpose

    def bind(self, unit: PADUnit) -> None:
        self.__dict__["unit"] = unit

    def forward(self, x: Tensor) -> Tensor:
        unit: Optional[PADUnit] = self.__dict__["unit"]
        if unit is None:
            raise RuntimeError("PADExpertLinear is not bound to a PAD unit: build it through padnet_ds.PADMoE")
        return unit.composition(self).linear(x, self.weight, self.bias)

    def set_mask(self, mask: Tensor) -> None:
        if self.mask is None:
            raise ValueError("this layer shares one mask across experts (mask_scope='shared'): set the PAD unit's mask")
        self.mask.copy_(self.__dict__["unit"].check_mask(mask, "expert mask"))

    def extra_repr(self) -> str:
        return f"in={self.in_features}, out={self.out_features}, bias={self.bias is not None}, " \
               f"mask={'per-expert' if self.mask is not None else 'shared'}"


def unit_key(path: str) -> str:
    # ModuleDict keys may not contain '.', and must not contain 'expert' (DeepSpeed's
    # checkpoint code treats any state key with 'expert' in an MoE layer as an expert weight).
    return path.replace(".", "_").replace("expert", "xpt") or "linear"


def to_pad_expert(expert: nn.Module, per_expert_mask: bool) -> Tuple[nn.Module, Dict[str, str]]:
    """Copy ``expert`` with each ``nn.Linear`` replaced; returns it and {linear path: unit key}."""
    template = copy.deepcopy(expert)
    if isinstance(template, nn.Linear):
        return PADExpertLinear(template, per_expert_mask), {"": unit_key("")}
    paths: Dict[str, str] = {}
    for path, module in list(template.named_modules()):
        if isinstance(module, nn.Linear):
            parent_path, _, leaf = path.rpartition(".")
            parent = template.get_submodule(parent_path) if parent_path else template
            setattr(parent, leaf, PADExpertLinear(module, per_expert_mask))
            key = unit_key(path)
            while key in paths.values():
                key += "_"
            paths[path] = key
    if not paths:
        raise ValueError(f"expert module {type(expert).__name__} contains no nn.Linear: PADMoE makes each "
                         "nn.Linear of the expert a PAD linear, so give it an FFN built from nn.Linear layers")
    return template, paths


def expert_linears_of(module: nn.Module) -> List[Tuple[str, PADExpertLinear]]:
    return [(p, m) for p, m in module.named_modules() if isinstance(m, PADExpertLinear)]


class FFNExpert(nn.Module):
    """A two-linear FFN expert (``fc2(act(fc1(x)))``), the shape PAD-MoE upcycles dense FFNs into."""

    def __init__(self, fc1: nn.Linear, fc2: nn.Linear, activation: nn.Module) -> None:
        super().__init__()
        self.fc1 = fc1
        self.act = activation
        self.fc2 = fc2

    def forward(self, x: Tensor) -> Tensor:
        return self.fc2(self.act(self.fc1(x)))
