"""The dynamic half of PAD: expert linears that DeepSpeed copies, shards and reduces.

``to_pad_expert`` turns every ``nn.Linear`` of a user's expert module into a
:class:`PADExpertLinear` holding only that expert's ``W_e`` and ``b_e`` (plus its own mask
when masks are per expert); once the mask is final, :class:`PackedExpertLinear` holds only
``W_e`` at the mask's dynamic positions (``pad.packed``). The replicated half (static weight,
shared mask or positions, phi) is a :class:`~padnet_ds.pad.compose.PADUnit` owned by the
layer and bound to every copy by reference, outside the module tree, so DeepSpeed never sees
it as part of an expert.
"""
from __future__ import annotations

import copy
from typing import Dict, List, Optional, Tuple

import torch
from torch import Tensor, nn

from ..pad.compose import PADUnit
from ..pad.packed import check_packed, gather_at, mask_of, positions_of, scatter_at


class _BoundToUnit(nn.Module):
    """An expert linear that composes through its layer's PAD unit (``bind``), kept out of the module
    tree on purpose: the unit is replicated state, the expert linear an expert parameter holder."""

    def bind(self, unit: PADUnit) -> None:
        self.__dict__["unit"] = unit

    def bound_unit(self) -> PADUnit:
        unit: Optional[PADUnit] = self.__dict__.get("unit")
        if unit is None:
            raise RuntimeError(f"{type(self).__name__} is not bound to a PAD unit: build it through padnet_ds.PADMoE")
        return unit


class PADExpertLinear(_BoundToUnit):
    """One expert's dense dynamic factor ``W_e`` and bias ``b_e`` (and its own mask with per-expert masks)."""

    def __init__(self, weight: Tensor, bias: Optional[Tensor], mask: Optional[Tensor] = None) -> None:
        super().__init__()
        self.out_features, self.in_features = weight.shape
        self.weight = nn.Parameter(weight.detach().clone())
        self.bias = nn.Parameter(bias.detach().clone()) if bias is not None else None
        if mask is not None:
            self.register_buffer("mask", mask.to(dtype=torch.bool, device=weight.device).clone())
        else:
            self.mask = None
        self.__dict__["unit"] = None  # bound by the layer; kept out of the module tree on purpose

    @classmethod
    def from_linear(cls, linear: nn.Linear, per_expert_mask: bool = False) -> "PADExpertLinear":
        mask = torch.ones_like(linear.weight, dtype=torch.bool) if per_expert_mask else None
        return cls(linear.weight, linear.bias, mask)

    def forward(self, x: Tensor) -> Tensor:
        return self.bound_unit().composition(self).linear(x, self.weight, self.bias)

    def set_mask(self, mask: Tensor) -> None:
        if self.mask is None:
            raise ValueError("this layer shares one mask across experts (mask_scope='shared'): set the PAD unit's mask")
        self.mask.copy_(self.__dict__["unit"].check_mask(mask, "expert mask"))

    def extra_repr(self) -> str:
        return f"in={self.in_features}, out={self.out_features}, bias={self.bias is not None}, " \
               f"mask={'per-expert' if self.mask is not None else 'shared'}"


class PackedExpertLinear(_BoundToUnit):
    """One expert's packed dynamic factor (``pad.packed``): ``values`` = ``W_e`` at the mask's
    dynamic positions, ``b_e``, and with per-expert masks its own int32 ``positions``."""

    def __init__(self, in_features: int, out_features: int, values: Tensor, bias: Optional[Tensor],
                 positions: Optional[Tensor] = None) -> None:
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.values = nn.Parameter(values)
        self.bias = nn.Parameter(bias) if bias is not None else None
        if positions is not None:
            check_packed(f"expert linear {out_features}x{in_features}", (out_features, in_features), positions,
                         values.numel(), "dynamic")
            self.register_buffer("positions", positions)
        else:
            self.positions = None
        self.__dict__["unit"] = None

    def forward(self, x: Tensor) -> Tensor:
        return self.bound_unit().composition(self).linear(x, self.values, self.bias)

    def extra_repr(self) -> str:
        return f"in={self.in_features}, out={self.out_features}, bias={self.bias is not None}, " \
               f"values={self.values.numel()}, mask={'per-expert' if self.positions is not None else 'shared'}"


def _carry_tags(old: Tensor, new: Tensor) -> Tensor:
    # DeepSpeed tags expert params once, when its Experts module is built (allreduce=False,
    # group_name): a tensor that replaces one must carry the tags, or it would be all-reduced.
    for tag in ("allreduce", "group_name"):
        if hasattr(old, tag):
            setattr(new, tag, getattr(old, tag))
    new.requires_grad_(old.requires_grad)
    return new


def pack_expert_linear(linear: PADExpertLinear, shared_positions: Optional[Tensor]) -> PackedExpertLinear:
    """``linear`` packed at the shared mask's positions, or (None) at its own mask's."""
    own = shared_positions is None
    positions = positions_of(linear.mask) if own else shared_positions
    packed = PackedExpertLinear(linear.in_features, linear.out_features, gather_at(linear.weight, positions),
                                None if linear.bias is None else linear.bias.detach().clone(),
                                positions if own else None)
    _carry_tags(linear.weight, packed.values)
    if linear.bias is not None:
        _carry_tags(linear.bias, packed.bias)
    return packed


def unpack_expert_linear(linear: PackedExpertLinear, shared_positions: Optional[Tensor]) -> PADExpertLinear:
    """The dense form: ``W_e`` is zero outside the mask (where the composition never reads it)."""
    positions = linear.positions if shared_positions is None else shared_positions
    shape = (linear.out_features, linear.in_features)
    mask = mask_of(linear.positions, shape) if linear.positions is not None else None
    dense = PADExpertLinear(scatter_at(linear.values, positions, shape), linear.bias, mask)
    _carry_tags(linear.values, dense.weight)
    if linear.bias is not None:
        _carry_tags(linear.bias, dense.bias)
    return dense


def unit_key(path: str) -> str:
    # ModuleDict keys may not contain '.', and must not contain 'expert' (DeepSpeed's
    # checkpoint code treats any state key with 'expert' in an MoE layer as an expert weight).
    return path.replace(".", "_").replace("expert", "xpt") or "linear"


def to_pad_expert(expert: nn.Module, per_expert_mask: bool) -> Tuple[nn.Module, Dict[str, str]]:
    """Copy ``expert`` with each ``nn.Linear`` replaced; returns it and {linear path: unit key}."""
    template = copy.deepcopy(expert)
    if isinstance(template, nn.Linear):
        return PADExpertLinear.from_linear(template, per_expert_mask), {"": unit_key("")}
    paths: Dict[str, str] = {}
    for path, module in list(template.named_modules()):
        if isinstance(module, nn.Linear):
            parent_path, _, leaf = path.rpartition(".")
            parent = template.get_submodule(parent_path) if parent_path else template
            setattr(parent, leaf, PADExpertLinear.from_linear(module, per_expert_mask))
            key = unit_key(path)
            while key in paths.values():
                key += "_"
            paths[path] = key
    if not paths:
        raise ValueError(f"expert module {type(expert).__name__} contains no nn.Linear: PADMoE makes each "
                         "nn.Linear of the expert a PAD linear, so give it an FFN built from nn.Linear layers")
    return template, paths


EXPERT_LINEARS = (PADExpertLinear, PackedExpertLinear)


def expert_linears_of(module: nn.Module) -> List[Tuple[str, nn.Module]]:
    """(path, PAD expert linear, dense or packed) of ``module``, in module order."""
    return [(p, m) for p, m in module.named_modules() if isinstance(m, EXPERT_LINEARS)]


class FFNExpert(nn.Module):
    """A two-linear FFN expert (``fc2(act(fc1(x)))``), the shape PAD-MoE upcycles dense FFNs into."""

    def __init__(self, fc1: nn.Linear, fc2: nn.Linear, activation: nn.Module) -> None:
        super().__init__()
        self.fc1 = fc1
        self.act = activation
        self.fc2 = fc2

    def forward(self, x: Tensor) -> Tensor:
        return self.fc2(self.act(self.fc1(x)))
