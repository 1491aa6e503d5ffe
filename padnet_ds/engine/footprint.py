"""Bytes a run holds: model state per rank and checkpoints on disk, packed and dense (pad/packed.py).

Model state of one trainable tensor of ``n`` values, ``b`` bytes each, on one rank, with ``dp``
ranks in its data-parallel group (the expert-data-parallel group for expert parameters):

    n * (b                      the parameter
         + b / dp^[stage 2]     its gradient (ZeRO 2 partitions it)
         + (4 [master] + 4 m) / dp^[stage >= 1])   fp32 master copy (ZeRO >= 1 or bf16) and m moments

plus every buffer at its size. The other layout of the same model (``packed`` <-> ``unpacked``)
swaps the tensors :func:`~padnet_ds.pad.packed.storage_sizes` lists: factors and static weights
at their kept sizes, masks (one byte per entry) for int32 positions. Checkpoints are measured on
disk; the other layout's size adds the same tensors' difference, each value stored once with its
optimizer state (ZeRO 0: once per data-parallel replica).
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict

from torch import nn

from ..comm import reduce_values
from ..moe.layer import pad_moe_layers
from ..pad.packed import is_packed, storage_sizes

ADAM_MOMENTS = 2  # exp_avg, exp_avg_sq


@dataclass(frozen=True)
class Precision:
    """How the engine keeps optimizer state (from its DeepSpeed config)."""
    stage: int
    master: bool  # a separate fp32 master copy
    moments: int = ADAM_MOMENTS

    @classmethod
    def of(cls, ds_config: Dict[str, Any]) -> "Precision":
        stage = int(ds_config.get("zero_optimization", {}).get("stage", 0))
        low = any(ds_config.get(k, {}).get("enabled") for k in ("bf16", "fp16"))
        return cls(stage, master=stage >= 1 or bool(low))

    def optimizer_bytes(self) -> int:
        """fp32 bytes of optimizer state per value (master copy and moments)."""
        return 4 * self.master + 4 * self.moments

    def per_rank(self, value_bytes: int, dp: int) -> float:
        """Model-state bytes per value of one trainable tensor (module docstring)."""
        grad = value_bytes / (dp if self.stage >= 2 else 1)
        return value_bytes + grad + self.optimizer_bytes() / (dp if self.stage >= 1 else 1)

    def on_disk(self, value_bytes: int, dp: int) -> float:
        """Checkpoint bytes per value: the module copy, and the optimizer state once (ZeRO 0: per replica)."""
        return value_bytes + self.optimizer_bytes() * (1 if self.stage >= 1 else dp)


def data_parallel_sizes(model: nn.Module, world: int) -> Dict[str, int]:
    """{expert parameter name prefix: its data-parallel size}; every other parameter's is ``world``."""
    return {f"{name}.deepspeed_moe.experts.": world // layer.ep_size for name, layer in pad_moe_layers(model).items()}


def _tensors(model: nn.Module, world: int):
    """(name, tensor, trainable, data-parallel size, is an expert tensor) of every parameter and buffer."""
    dps = data_parallel_sizes(model, world)
    for name, t in list(model.named_parameters()) + list(model.named_buffers()):
        dp = next((v for k, v in dps.items() if name.startswith(k)), None)
        yield name, t, t.requires_grad and isinstance(t, nn.Parameter), dp or world, dp is not None


def _both(model: nn.Module, world: int, per_value, experts_once: bool) -> Dict[str, Dict[str, float]]:
    """``{"replicated" | "experts": {"packed", "unpacked"}}`` bytes: ``per_value(value_bytes, dp)`` per
    trainable value, plain bytes for the rest. ``experts_once`` divides expert tensors by their
    data-parallel size (summed over the ranks, every expert then counts once)."""
    sizes = storage_sizes(model)
    out = {side: {"packed": 0.0, "unpacked": 0.0} for side in ("replicated", "experts")}
    names = set()
    for name, t, trainable, dp, expert in _tensors(model, world):
        names.add(name)
        own = t.numel() * t.element_size()
        packed, dense = sizes.get(name, (own, own))
        scale = per_value(t.element_size(), dp) / t.element_size() if trainable else 1.0
        if experts_once and expert:
            scale /= dp
        side = out["experts" if expert else "replicated"]
        side["packed"] += packed * scale
        side["unpacked"] += dense * scale
    for name in sizes.keys() - names:  # buffers only the other layout has (a packed unit's dense shape)
        out["replicated"]["packed"] += sizes[name][0]
        out["replicated"]["unpacked"] += sizes[name][1]
    return out


def model_state_bytes(model: nn.Module, ds_config: Dict[str, Any], world: int) -> Dict[str, int]:
    """Model-state bytes this rank holds, ``{"packed": ..., "unpacked": ...}`` (one of them as held now)."""
    both = _both(model, world, Precision.of(ds_config).per_rank, experts_once=False)
    return {k: int(round(both["replicated"][k] + both["experts"][k])) for k in ("packed", "unpacked")}


def checkpoint_delta(model: nn.Module, ds_config: Dict[str, Any], world: int) -> float:
    """Bytes a checkpoint of this model holds in the dense layout minus in the packed one (every rank's
    files together). Collective: each rank adds its own experts."""
    both = _both(model, world, Precision.of(ds_config).on_disk, experts_once=True)
    local = {side: v["unpacked"] - v["packed"] for side, v in both.items()}
    return local["replicated"] + float(reduce_values([local["experts"]])[0])


def footprint(model: nn.Module, ds_config: Dict[str, Any], world: int) -> Dict[str, Any]:
    """What a checkpoint records about its own size (collective): the layout, this rank's model-state
    bytes in both layouts and the checkpoint's dense - packed difference."""
    return {"packed": is_packed(model), "model_state_bytes": model_state_bytes(model, ds_config, world),
            "checkpoint_delta": checkpoint_delta(model, ds_config, world)}


def checkpoint_bytes(tag_dir: Path, packed: bool, delta: float) -> Dict[str, int]:
    """A checkpoint's bytes on disk (every rank's files), ``{"packed", "unpacked"}``: its own layout measured,
    the other estimated with ``delta`` (:func:`checkpoint_delta`)."""
    actual = sum(f.stat().st_size for f in Path(tag_dir).iterdir() if f.is_file())
    if packed:
        return {"packed": int(actual), "unpacked": int(round(actual + delta))}
    return {"packed": int(round(actual - delta)), "unpacked": int(actual)}
