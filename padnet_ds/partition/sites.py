"""Where the PAD masks of a model live, and who holds identical copies of each.

A :class:`Site` is one PAD unit's family of masks as this rank sees it:

- *replicated*: the unit's shared mask (PADMoE with ``mask_scope='shared'``, DY-Conv, any PADUnit
  found by walking the model). Every rank holds the same copy; scores all-reduce over the world.
- *expert*: per-expert masks (``mask_scope='expert'``). This rank holds its local experts' masks;
  ranks of the expert-data-parallel group hold the same experts, the expert-parallel group
  holds the rest. The residual MLP's own mask (``use_residual``) is a separate replicated site.

A packed layer (``pad.packed``) has positions instead of masks: its sites carry rebuilt masks
(for ratios and agreement checks) and no dense factors; the partitioner refuses to change them.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Dict, List, Optional, Tuple

from torch import Tensor, nn

from ..moe.expert import PADExpertLinear
from ..moe.layer import PADMoE, pad_moe_layers
from ..moe.upcycle import global_expert_ids
from ..pad.compose import PADUnit
from ..pad.packed import PackedUnit, mask_of


@dataclass
class Site:
    name: str  # the unit's module path (plus ".residual" for a residual MLP's per-expert-scope mask)
    layer: str  # the module path of the layer that owns the unit
    unit: PADUnit
    masks: List[Tensor]  # this rank's bool buffers, 1 = dynamic
    owners: List[nn.Module]  # what the unit's score sink reports for each mask
    experts: Optional[List[int]] = None  # global expert ids of ``masks``; None = replicated
    num_experts: int = 1  # masks in the whole site (all EP ranks together)
    group_name: Optional[str] = None  # DeepSpeed expert group of the layer
    factors: List[List[Tensor]] = field(default_factory=list)  # per mask: the dynamic weights it gates
    factors_sharded: bool = False  # replicated MoE site: the other experts' factors live on other EP ranks

    @property
    def packed(self) -> bool:
        """Stored packed (``pad.packed``): ``masks`` are rebuilt copies and the mask is final."""
        return isinstance(self.unit, PackedUnit)

    @property
    def replicated(self) -> bool:
        return self.experts is None

    @property
    def numel(self) -> int:
        """Mask entries of the whole site (every global expert counted once)."""
        return self.masks[0].numel() * (1 if self.replicated else self.num_experts)


def _factor(lin: nn.Module) -> List[Tensor]:
    # A packed linear has no dense factor (and a packed site is never partitioned).
    return [lin.weight] if isinstance(lin, PADExpertLinear) else []


def _moe_sites(name: str, layer_name: str, layer: PADMoE, unit: PADUnit) -> List[Site]:
    path = next(p for p, key in layer._unit_of_path.items() if layer.pad[key] is unit)
    linears = layer.local_expert_linears(unit)
    masks = layer.masks(unit)
    residual = layer.mlp.get_submodule(path) if layer.use_residual else None
    moe = dict(layer=layer_name, unit=unit, group_name=layer.expert_group_name)
    if unit.shared_mask:
        # Magnitude sums over the experts only (the residual MLP is not a dynamic factor).
        return [Site(name, masks=masks, owners=[unit], factors=[[w for lin in linears for w in _factor(lin)]],
                     factors_sharded=layer.ep_size > 1, **moe)]
    sites = [Site(name, masks=masks, owners=list(linears), experts=global_expert_ids(layer),
                  num_experts=layer.num_experts, factors=[_factor(lin) for lin in linears], **moe)]
    if residual is not None:
        mask = residual.mask if isinstance(residual, PADExpertLinear) else mask_of(residual.positions,
                                                                                   unit.weight_shape)
        sites.append(Site(f"{name}.residual", masks=[mask], owners=[residual], factors=[_factor(residual)], **moe))
    return sites


def _plain_factors(parent: Optional[nn.Module], unit: PADUnit) -> List[Tensor]:
    # A DY-Conv style layer keeps its K factors stacked as ``weight`` [K, *unit shape].
    weight = getattr(parent, "weight", None)
    if isinstance(weight, Tensor) and tuple(weight.shape[1:]) == tuple(unit.weight_shape):
        return list(weight.unbind(0))
    return []


def find_sites(model: nn.Module) -> List[Site]:
    """Every PAD mask of ``model`` in module order (identical on every rank)."""
    moe_units: Dict[int, Tuple[str, PADMoE]] = {}
    for layer_name, layer in pad_moe_layers(model).items():
        for unit in layer.pad_units():
            moe_units[id(unit)] = (layer_name, layer)
    modules = dict(model.named_modules())
    sites: List[Site] = []
    for name, module in modules.items():
        if not isinstance(module, PADUnit):
            continue
        if id(module) in moe_units:
            sites.extend(_moe_sites(name, *moe_units[id(module)], module))
            continue
        if not module.shared_mask:
            raise ValueError(f"PAD unit {name} has per-expert masks but is not inside a PADMoE: the partitioner "
                             "cannot find its masks; use shared_mask=True outside PADMoE")
        parent_name = name.rpartition(".")[0]
        parent = modules.get(parent_name)
        mask = mask_of(module.positions, module.weight_shape) if isinstance(module, PackedUnit) else module.mask
        sites.append(Site(name, layer=parent_name, unit=module, masks=[mask], owners=[module],
                          factors=[_plain_factors(parent, module)]))
    return sites
