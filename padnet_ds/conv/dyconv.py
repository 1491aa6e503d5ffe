"""PAD dynamic convolution (DY-Conv with a partially dynamic kernel), docs/PAD.md section 6.

Per sample ``x`` the layer convolves with

    W_eff(x) = lambda_d * M * W~(x) + lambda_s * (1 - M) * W_static,   W~(x) = sum_k pi_k(x) W_k

The composition reuses :class:`~padnet_ds.pad.compose.PADUnit` (one per layer, one mask
shared by the K kernels). Because ``M * W~`` is linear in the kernels,

    W_eff(x) = S + sum_k pi_k(x) * (Md * W_k)       (S, Md from ``PADUnit.shared_terms``)

so the mask is applied to the K kernels once per forward (K*P work) and the per-sample
aggregation plus the static term is one ``addmm``: PAD adds O(K*P) work to plain DY-Conv's
O(B*K*P) aggregation, never an extra batch-sized pass. Samples are convolved in one call
by folding the batch into the groups dimension.

Packed (``pack()``, once the mask is final; ``pad.packed``): the K kernels hold only their
values at the mask's dynamic positions, ``V`` [K, n], and

    W_eff(x) = S + scatter_idx(lambda_d * pi(x) @ V)

so the aggregation is O(B*K*n) with n = rP.
"""
from __future__ import annotations

import math
from functools import partial
from typing import Dict, Iterator, List, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.modules.utils import _pair

from ..pad.accounting import pad_counts
from ..pad.compose import PADUnit
from ..pad.packed import (DenseSource, Packable, PackedUnit, complement_of, gather_at, pack_unit, scatter_at,
                          unit_sizes, unpack_unit)


def _conv_init_(weight: Tensor, bias: Optional[Tensor] = None) -> None:
    # nn.Conv2d.reset_parameters, applied to one kernel [out, in/groups, kh, kw].
    nn.init.kaiming_uniform_(weight, a=math.sqrt(5))
    if bias is not None:
        fan_in = weight[0].numel()
        bound = 1 / math.sqrt(fan_in) if fan_in > 0 else 0.0
        nn.init.uniform_(bias, -bound, bound)


class KernelAttention(nn.Module):
    """``pi(x) = softmax(FC2(ReLU(FC1(GAP(x)))) / tau)``: one weight per kernel per sample."""

    def __init__(self, in_ch: int, num_kernels: int, reduction: int = 16) -> None:
        super().__init__()
        hidden = max(1, in_ch // reduction)
        self.fc1 = nn.Linear(in_ch, hidden)
        self.fc2 = nn.Linear(hidden, num_kernels)

    def logits(self, x: Tensor) -> Tensor:
        return self.fc2(F.relu(self.fc1(x.mean(dim=(2, 3)))))

    def forward(self, x: Tensor, temperature: float) -> Tensor:
        return torch.softmax(self.logits(x) / temperature, dim=1)


class PADDynamicConv2d(nn.Module, Packable):
    """DY-Conv whose aggregated kernel is composed with a static kernel under a PAD mask.

    ``lambda_mode="none"`` with the mask all ones is plain (fully dynamic) DY-Conv.
    """

    def __init__(self, in_ch: int, out_ch: int, kernel_size, stride=1, padding=0, dilation=1,
                 groups: int = 1, bias: bool = False, num_kernels: int = 4, temperature: float = 30.0,
                 reduction: int = 16, lambda_mode: str = "both", name: str = "") -> None:
        super().__init__()
        if in_ch % groups or out_ch % groups:
            raise ValueError(f"in_ch={in_ch} and out_ch={out_ch} must both be divisible by groups={groups}")
        if num_kernels < 1:
            raise ValueError(f"num_kernels must be >= 1, got {num_kernels}")
        self.in_channels = in_ch
        self.out_channels = out_ch
        self.kernel_size = _pair(kernel_size)
        self.stride = _pair(stride)
        self.padding = padding if isinstance(padding, str) else _pair(padding)
        self.dilation = _pair(dilation)
        self.groups = groups
        self.num_kernels = num_kernels
        self.temperature = float(temperature)
        shape = (out_ch, in_ch // groups, *self.kernel_size)
        self.weight = nn.Parameter(torch.empty(num_kernels, *shape))
        self.bias = nn.Parameter(torch.empty(num_kernels, out_ch)) if bias else None
        for k in range(num_kernels):
            _conv_init_(self.weight.data[k], None if self.bias is None else self.bias.data[k])
        self.attention = KernelAttention(in_ch, num_kernels, reduction)
        static = torch.empty(shape)
        _conv_init_(static)
        self.pad = PADUnit(static, lambda_mode, shared_mask=True, name=name)

    @classmethod
    def from_conv(cls, conv: nn.Conv2d, num_kernels: int = 4, temperature: float = 30.0, reduction: int = 16,
                  lambda_mode: str = "both", name: str = "") -> "PADDynamicConv2d":
        """Upcycle ``conv``: W_static and every kernel (and bias) are copies of its weight."""
        if conv.padding_mode != "zeros":
            raise ValueError(f"only padding_mode='zeros' convolutions can be upcycled, got {conv.padding_mode!r}")
        layer = cls(conv.in_channels, conv.out_channels, conv.kernel_size, conv.stride, conv.padding,
                    conv.dilation, conv.groups, conv.bias is not None, num_kernels, temperature, reduction,
                    lambda_mode, name)
        layer.to(device=conv.weight.device, dtype=conv.weight.dtype)
        with torch.no_grad():
            layer.weight.copy_(conv.weight.unsqueeze(0).expand_as(layer.weight))
            if conv.bias is not None:
                layer.bias.copy_(conv.bias.unsqueeze(0).expand_as(layer.bias))
            layer.pad.static_weight.copy_(conv.weight)
        return layer

    def kernel_attention(self, x: Tensor) -> Tensor:
        return self.attention(x, self.temperature)

    def forward(self, x: Tensor) -> Tensor:
        b, c, h, w = x.shape
        pi = self.kernel_attention(x)                                   # [B, K]
        weight = self._packed_kernels(pi) if self.packed else self._dense_kernels(pi)  # [B, P]
        bias = None if self.bias is None else torch.mm(pi, self.bias).reshape(-1)  # never masked
        shape = self.pad.weight_shape
        out = F.conv2d(x.reshape(1, b * c, h, w), weight.reshape(b * self.out_channels, *shape[1:]),
                       bias, self.stride, self.padding, self.dilation, b * self.groups)
        return out.reshape(b, self.out_channels, *out.shape[2:])

    def _dense_kernels(self, pi: Tensor) -> Tensor:
        static, mdyn = self.pad.shared_terms()                          # [out, in/g, kh, kw] each
        kernels = (mdyn * self.weight).flatten(1)                        # [K, P]: mask once per kernel
        return torch.addmm(static.reshape(1, -1), pi, kernels)          # [B, P] = S + Md * W~(x)

    def _packed_kernels(self, pi: Tensor) -> Tensor:
        # W_eff(x) = S + scatter_idx(lambda_d pi(x) @ V): the aggregation runs over the n dynamic
        # values of each kernel only; S is zero at idx, so the mixed values are written over it.
        unit = self.pad
        lam_d, lam_s = unit.lambdas()
        dyn = unit.positions.long()
        numel = unit.weight_shape.numel()
        static = unit.static_values.new_zeros(numel).index_copy(0, complement_of(dyn, numel),
                                                                unit.static_values * lam_s)  # [P] = S
        mixed = torch.mm(pi, self.values * lam_d).to(static.dtype)      # [B, n]
        return static.expand(pi.shape[0], numel).index_copy(1, dyn, mixed)  # [B, P]

    # -- packed storage ----------------------------------------------------------------------
    @property
    def packed(self) -> bool:
        return isinstance(self.pad, PackedUnit)

    def pack(self) -> None:
        """Keep only the kernels' dynamic entries, ``values`` [K, n], under the current mask (final)."""
        if self.packed:
            raise ValueError(f"DY-Conv layer {self.pad.name!r} is already packed")
        unit = pack_unit(self.pad)
        values = nn.Parameter(gather_at(self.weight, unit.positions, batch_dims=1))  # [K, n]
        values.requires_grad_(self.weight.requires_grad)
        del self.weight
        self.values = values
        self.pad = unit

    def unpack(self) -> None:
        """The dense kernels again (zero outside the mask, where the composition never reads them)."""
        if not self.packed:
            raise ValueError(f"DY-Conv layer {self.pad.name!r} is not packed")
        weight = nn.Parameter(scatter_at(self.values, self.pad.positions, self.pad.weight_shape))  # [K, *shape]
        weight.requires_grad_(self.values.requires_grad)
        del self.values
        self.weight = weight
        self.pad = unpack_unit(self.pad)

    def dense_sources(self) -> Dict[str, DenseSource]:
        unit = self.pad
        take = partial(gather_at, positions=unit.positions, batch_dims=1)
        return {"values": DenseSource("weight", torch.Size((self.num_kernels, *unit.weight_shape)), take),
                **unit.static_source("pad.")}

    def storage_sizes(self) -> Dict[str, Tuple[int, int]]:
        unit = self.pad
        p, value_bytes = unit.weight_shape.numel(), unit.static_tensor().element_size()
        n = round(self.dynamic_ratio() * p)
        factors = "values" if self.packed else "weight"
        return {factors: (self.num_kernels * n * value_bytes, self.num_kernels * p * value_bytes),
                **unit_sizes(unit, "pad.", value_bytes)}

    def pad_units(self) -> List[PADUnit]:
        return [self.pad]

    def dynamic_ratio(self) -> float:
        return self.pad.dynamic_ratio()

    def extra_repr(self) -> str:
        return (f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, stride={self.stride}, "
                f"padding={self.padding}, groups={self.groups}, bias={self.bias is not None}, "
                f"num_kernels={self.num_kernels}, temperature={self.temperature:g}")


def conv_param_counts(layer: PADDynamicConv2d) -> Dict[str, float]:
    """Deployment cost of one layer's kernels (``pad.accounting``), in values; P = one kernel.

    Biases and attention are the same for both and not counted.
    """
    p = layer.pad.weight_shape.numel()
    c = pad_counts(p, layer.num_kernels, layer.dynamic_ratio(), layer.pad.lambda_mode != "prune")
    return dict(kernel_size=p, num_kernels=layer.num_kernels, fully_dynamic=c["fully_dynamic"], pad=c["pad"],
                pad_dense_static=c["pad_dense_static"], mask_entries=p, dynamic_ratio=c["dynamic_ratio"])


def dyconv_modules(model: nn.Module) -> Iterator[PADDynamicConv2d]:
    return (m for m in model.modules() if isinstance(m, PADDynamicConv2d))


def total_param_counts(model: nn.Module) -> Dict[str, float]:
    """``conv_param_counts`` summed over every DY-Conv layer of ``model``; ratio is value-weighted."""
    keys = ("fully_dynamic", "pad", "pad_dense_static", "mask_entries")
    total = dict.fromkeys(keys, 0.0)
    total["layers"] = 0
    dynamic = 0.0
    for layer in dyconv_modules(model):
        c = conv_param_counts(layer)
        for key in keys:
            total[key] += c[key]
        total["layers"] += 1
        dynamic += c["dynamic_ratio"] * c["mask_entries"]
    total["dynamic_ratio"] = dynamic / total["mask_entries"] if total["mask_entries"] else 1.0
    return total


def set_temperature(model: nn.Module, tau: float) -> int:
    """Set the attention temperature of every DY-Conv layer; returns how many were set."""
    if tau <= 0:
        raise ValueError(f"temperature must be > 0, got {tau}")
    n = 0
    for layer in dyconv_modules(model):
        layer.temperature = float(tau)
        n += 1
    return n


def temperature_at(epoch: float, start: float = 30.0, end: float = 1.0, anneal_epochs: float = 10) -> float:
    """Linear annealing ``start -> end`` over ``anneal_epochs`` (fractional epochs), then ``end``."""
    if anneal_epochs <= 0:
        return float(end)
    t = min(max(epoch / anneal_epochs, 0.0), 1.0)
    return float(start + (end - start) * t)
