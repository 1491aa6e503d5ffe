"""A checkpoint's PAD weights in the layout an export stores (``modeling_padnet.py``'s docstring).

Notation: a PAD weight has F factors f (the experts of one MoE linear, or the K kernels of a
DY-Conv layer) of P entries each, masks M_f (1 = dynamic; one shared mask for every f) and
A = AND_f M_f (the entries every factor reads dynamically). The export keeps

    mask_bits = packbits(M) or packbits([M_0 .. M_F-1])      (absent when A is everything)
    static_values = W_static[A = 0]                          (where some factor reads it)
    values_f = W_f[M_f = 1]

A dense checkpoint (W_f, W_static, masks) and a packed one (v_f = W_f[M_f], the static weight at
the complement of a shared mask, or dense with per-expert masks, and int32 positions) give the
same tensors: the packed form holds exactly the entries an export keeps, in the same order
(ascending flat positions). Experts are read by global id from the checkpoint's per-expert files,
so the run's world size and ``ep_size`` do not matter.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Optional, Tuple

import numpy as np
import torch
from torch import Tensor

from ..moe.expert import unit_key
from ..pad.compose import lambda_pair
from ..pad.packed import check_packed, gather_at, mask_of, positions_of
from ..errors import CheckpointError
from .modeling_padnet import unpack_bits

GATE_KEY = ".deepspeed_moe.gate.wg.weight"  # one per MoE layer, in the replicated state
EXPERT_FILE = "layer_{layer}_expert_{expert}_mp_rank_00_model_states.pt"


def pack_bits(masks: Tensor) -> Tensor:
    """bool [rows, P] -> uint8 [rows, ceil(P/8)], most significant bit first (``numpy.packbits``)."""
    return torch.from_numpy(np.packbits(masks.cpu().numpy(), axis=-1))


def mask_from_bits(bits: Optional[Tensor], shape: torch.Size, rows: int = 1) -> Tensor:
    """The bool masks [rows, P] that ``bits`` hold (None: every entry dynamic)."""
    numel = shape.numel()
    if bits is None:
        return torch.ones(rows, numel, dtype=torch.bool)
    return unpack_bits(bits, numel)


@dataclass
class PADWeight:
    """One PAD weight in export form: ``masks`` bool [1 or F, P], ``static`` [P - |A|] or None,
    ``values`` per factor [|M_f|], ``phi`` [1]."""
    shape: torch.Size
    masks: Tensor
    static: Optional[Tensor]
    values: List[Tensor]
    phi: Tensor

    @property
    def dynamic_ratio(self) -> float:
        return sum(v.numel() for v in self.values) / (len(self.values) * self.shape.numel())

    @property
    def fully_dynamic(self) -> bool:
        return bool(self.masks.all())

    def mask_bits(self) -> Optional[Tensor]:
        return None if self.fully_dynamic else pack_bits(self.masks)

    def spec(self, lambda_mode: str) -> Dict:
        lam_d, lam_s = lambda_pair(lambda_mode, self.phi.float().view(()))
        return {"shape": list(self.shape), "dynamic": [v.numel() for v in self.values],
                "static": 0 if self.static is None else self.static.numel(), "dynamic_ratio": self.dynamic_ratio,
                "lambda_d": float(lam_d), "lambda_s": float(lam_s)}


def pad_weight(shape: torch.Size, masks: Tensor, dense_static: Optional[Tensor], packed_static: Optional[Tensor],
               factors: List[Tensor], packed: bool, phi: Tensor, what: str) -> PADWeight:
    """Export form from a checkpoint's tensors: ``factors`` are dense W_f or packed v_f (``packed``);
    the static weight is ``dense_static`` (any shape of P entries) or ``packed_static`` (at ~M, shared mask)."""
    every = masks.all(dim=0)  # A: [P]
    values = []
    for f, weight in enumerate(factors):
        mask = masks[0 if len(masks) == 1 else f]
        positions = positions_of(mask)
        if packed:
            check_packed(f"{what} factor {f}", shape, positions, weight.numel(), "dynamic")
            values.append(weight.reshape(-1).clone())
        else:
            values.append(gather_at(weight.reshape(-1), positions))
    static = None
    if not bool(every.all()):
        if dense_static is not None:
            static = gather_at(dense_static.reshape(-1), positions_of(~every))
        else:
            check_packed(f"{what} static values", shape, positions_of(every), packed_static.numel(), "static")
            static = packed_static.clone()
    return PADWeight(torch.Size(shape), masks.reshape(len(masks), -1), static, values, phi.detach().clone().float())


# -- MoE layers --------------------------------------------------------------------------------

def moe_layers(replicated: Dict[str, Tensor]) -> List[str]:
    """The MoE layers of a checkpoint (module paths), in module order: DeepSpeed numbers their expert files so."""
    layers = [key[: -len(GATE_KEY)] for key in replicated if key.endswith(GATE_KEY)]
    return sorted(layers, key=_natural)


def _natural(name: str) -> List:
    import re
    return [(0, int(p)) if p.isdigit() else (1, p) for p in re.split(r"(\d+)", name)]


def expert_states(tag_dir: Path, experts: Dict[int, Dict[str, Tensor]], index: int, layer: str,
                  num_experts: int) -> List[Dict[str, Tensor]]:
    """Every global expert's state of one MoE layer, in id order; a missing one names its file."""
    for e in range(num_experts):
        if e not in experts:
            file = tag_dir / EXPERT_FILE.format(layer=index, expert=e)
            raise CheckpointError(f"checkpoint {tag_dir} has no state for expert {e} of MoE layer {layer}: {file} "
                                    "is missing (an incomplete copy of the checkpoint?); nothing was written")
    return [experts[e] for e in range(num_experts)]


def linear_paths(state: Dict[str, Tensor]) -> List[str]:
    """The PAD linears of one expert (``fc1``, ``fc2``): names with a ``weight`` (dense) or ``values`` (packed)."""
    return sorted({name.rpartition(".")[0] for name in state if name.rpartition(".")[2] in ("weight", "values")})


def moe_linear(replicated: Dict[str, Tensor], layer: str, path: str, experts: List[Dict[str, Tensor]],
               what: str) -> Tuple[PADWeight, Optional[Tensor]]:
    """One PAD linear of every expert of ``layer`` in export form, and the experts' biases [E, out]."""
    unit = f"{layer}.pad.{unit_key(path)}"
    packed = f"{path}.values" in experts[0]
    name = "values" if packed else "weight"
    factors = [state[f"{path}.{name}"] for state in experts]
    bias = torch.stack([state[f"{path}.bias"] for state in experts]) if f"{path}.bias" in experts[0] else None
    dense_static = replicated.get(f"{unit}.static_weight")
    packed_static = replicated.get(f"{unit}.static_values")
    shape = _linear_shape(replicated, unit, dense_static, packed_static, factors, bias, what)
    if f"{unit}.mask" in replicated:
        masks = replicated[f"{unit}.mask"].reshape(1, -1)
    elif f"{unit}.positions" in replicated:
        masks = mask_of(replicated[f"{unit}.positions"], shape).reshape(1, -1)
    else:  # per-expert masks, in each expert's file
        masks = torch.stack([(state[f"{path}.mask"] if f"{path}.mask" in state
                              else mask_of(state[f"{path}.positions"], shape)).reshape(-1) for state in experts])
    return pad_weight(shape, masks, dense_static, packed_static, factors, packed, replicated[f"{unit}.phi"], what), bias


def _linear_shape(replicated, unit, dense_static, packed_static, factors, bias, what) -> torch.Size:
    if dense_static is not None:
        return dense_static.shape
    if f"{unit}.dense_shape" in replicated:  # packed units that record their shape
        return torch.Size(replicated[f"{unit}.dense_shape"].tolist())
    if bias is None:
        raise CheckpointError(f"{what}: a packed linear without bias does not record its weight shape; export it from "
                          "the unpacked checkpoint")
    numel = replicated[f"{unit}.positions"].numel() + packed_static.numel()
    return torch.Size([bias.shape[1], numel // bias.shape[1]])


# -- DY-Conv layers ----------------------------------------------------------------------------

def dyconv_weight(replicated: Dict[str, Tensor], layer: str, shape: torch.Size) -> PADWeight:
    """The K kernels of one DY-Conv layer (``layer.weight`` [K, *shape] or packed ``layer.values`` [K, n]);
    ``shape`` is one kernel's, from the model the run config builds."""
    unit = f"{layer}.pad"
    packed = f"{layer}.values" in replicated
    kernels = replicated[f"{layer}.values" if packed else f"{layer}.weight"]
    masks = replicated[f"{unit}.mask"] if f"{unit}.mask" in replicated else mask_of(replicated[f"{unit}.positions"],
                                                                                   shape)
    return pad_weight(torch.Size(shape), masks.reshape(1, -1), replicated.get(f"{unit}.static_weight"),
                      replicated.get(f"{unit}.static_values"), list(kernels), packed, replicated[f"{unit}.phi"],
                      f"DY-Conv layer {layer}")


def dyconv_layers(replicated: Dict[str, Tensor]) -> List[str]:
    """DY-Conv layers: a ``pad`` unit next to the layer's kernel attention."""
    return sorted({key[: -len(".pad.phi")] for key in replicated
                   if key.endswith(".pad.phi") and key[: -len(".pad.phi")] + ".attention.fc1.weight" in replicated},
                  key=_natural)
