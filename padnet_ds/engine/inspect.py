"""``padnet-ds inspect``: what a checkpoint holds, read from its files (no process group).

A PAD unit is any state-dict prefix with ``phi`` and a static weight (``static_weight``, or
``static_values`` when packed); its factors are the experts of its MoE layer (one file per
global expert) or the kernels of its DY-Conv layer. Masks (or a packed unit's positions) come
from the replicated state (shared) or the expert files. Sizes: the checkpoint's bytes on disk
and the model-state bytes per rank that the run recorded when it saved (engine/footprint.py),
each packed and as it would be unpacked.
"""
from __future__ import annotations

from typing import Any, Dict

import torch

from ..moe.expert import unit_key
from ..pad.accounting import pad_counts
from ..pad.compose import lambda_pair
from .checkpoint_reader import CheckpointState, read_checkpoint
from .footprint import checkpoint_bytes


def inspect_checkpoint(path: str) -> Dict[str, Any]:
    ckpt = read_checkpoint(path)
    moe_cfg = ckpt.config.get("moe", {})
    units = [unit_report(key.rpartition(".")[0], ckpt) for key in sorted(ckpt.replicated)
             if key.endswith((".static_weight", ".static_values"))]
    full = sum(u["params_fully_dynamic"] for u in units)
    pad = sum(u["params_pad"] for u in units)
    dyn = sum(u["dynamic_ratio"] * u["mask_bits"] for u in units)
    moe_layers = sorted({u["layer"] for u in units if u["kind"] == "moe"})
    layout = ckpt.layout
    return {
        "checkpoint": str(ckpt.tag_dir),
        # the cluster shape its files are cut for (a resharded checkpoint: the one it was resharded for)
        "world_size": layout.world_size, "zero_stage": layout.zero_stage, "dtype": "bf16" if layout.bf16 else "fp32",
        "optimizer_files": "padnet-ds portable" if layout.portable else "DeepSpeed",
        "resharded_from": layout.resharded_from,
        # A vision run's config still has the (unused) moe section's defaults: report them only with MoE layers.
        "ep_size": (max(layout.ep_size.values()) if layout.ep_size else moe_cfg.get("ep_size")) if moe_layers else None,
        "num_experts": moe_cfg.get("num_experts") if moe_layers else None,
        "moe_layers": moe_layers,
        "dyconv_layers": sorted({u["layer"] for u in units if u["kind"] == "dyconv"}),
        "units": units,
        "dynamic_ratio": dyn / max(1, sum(u["mask_bits"] for u in units)),
        "params_fully_dynamic": full,
        "params_pad": pad,
        "pad_fraction_of_fully_dynamic": pad / full if full else None,
        **sizes(ckpt),
    }


def sizes(ckpt: CheckpointState) -> Dict[str, Any]:
    """``packed``, ``checkpoint_bytes`` and (per rank) ``model_state_bytes``, each ``{packed, unpacked}``."""
    record = ckpt.footprint
    packed = bool(record.get("packed", False))
    delta = record.get("checkpoint_delta")
    on_disk = checkpoint_bytes(ckpt.tag_dir, packed, delta) if delta is not None else None
    return {"packed": packed, "checkpoint_bytes": on_disk, "model_state_bytes": record.get("model_state_bytes")}


def lambda_modes(cfg: Dict[str, Any]) -> Dict[str, str]:
    """The lambda mode of MoE units and of DY-Conv units, from the run's config.yaml."""
    vision = (cfg.get("extra") or {}).get("vision") or {}
    # conv=dynamic (plain DY-Conv baseline) builds its layers with lambda_mode "none" whatever the config says.
    conv_mode = "none" if vision.get("conv") == "dynamic" else vision.get("lambda_mode", "both")
    return {"moe": cfg.get("moe", {}).get("lambda_mode", "both"), "dyconv": conv_mode}


def unit_report(prefix: str, ckpt: CheckpointState) -> Dict[str, Any]:
    """One PAD unit: its layer, factor count, dynamic ratio, lambdas and deployment cost."""
    module, experts = ckpt.replicated, ckpt.experts
    moe_prefix, _, unit_name = prefix.rpartition(".pad.")
    shared = dynamic_count(module, prefix)
    if moe_prefix and moe_prefix in experts:
        layer_experts = experts[moe_prefix]
        factors = len(layer_experts)
        counts = [shared] if shared is not None else [expert_count(e, unit_name) for e in layer_experts.values()]
        kind, layer = "moe", moe_prefix
    else:
        layer = prefix.rpartition(".")[0]
        kernels = module.get(f"{layer}.weight", module.get(f"{layer}.values"))  # [K, *shape] or packed [K, n]
        factors = int(kernels.shape[0]) if kernels is not None and kernels.ndim in (2, 5) else 1
        counts = [shared]
        kind = "dyconv"
    mode = lambda_modes(ckpt.config)[kind]
    shape = weight_shape(module, prefix)
    p = int(torch.Size(shape).numel())
    ratio = sum(counts) / (p * len(counts))
    lam_d, lam_s = lambda_pair(mode, module[f"{prefix}.phi"].float().view(()))
    cost = pad_counts(p, factors, ratio, mode != "prune")
    return dict(name=prefix, kind=kind, layer=layer, factors=factors, shape=list(shape),
                packed=f"{prefix}.dense_shape" in module,  # every packed unit records its dense shape
                dynamic_ratio=ratio, lambda_d=float(lam_d), lambda_s=float(lam_s),
                params_fully_dynamic=cost["fully_dynamic"], params_pad=cost["pad"], mask_bits=cost["mask_bits"])


def weight_shape(module: Dict[str, torch.Tensor], prefix: str) -> list:
    """One factor's shape: the static weight's, or a packed unit's recorded dense shape."""
    if f"{prefix}.dense_shape" in module:
        return [int(d) for d in module[f"{prefix}.dense_shape"].tolist()]
    return list(module[f"{prefix}.static_weight"].shape)


def dynamic_count(state: Dict[str, torch.Tensor], prefix: str):
    """Dynamic entries of the mask at ``prefix`` (a bool ``mask`` or packed ``positions``); None if absent."""
    if f"{prefix}.positions" in state:
        return int(state[f"{prefix}.positions"].numel())
    if f"{prefix}.mask" in state:
        return int(torch.count_nonzero(state[f"{prefix}.mask"]))
    return None


def expert_count(expert_state: Dict[str, torch.Tensor], unit_name: str) -> int:
    """One expert's dynamic count for the PAD unit keyed ``unit_name`` (the key PADMoE derived from its path)."""
    for key in expert_state:
        for leaf in (".mask", ".positions"):
            if key.endswith(leaf) and unit_key(key[: -len(leaf)]) == unit_name:
                return dynamic_count(expert_state, key[: -len(leaf)])
    raise KeyError(f"no per-expert mask for PAD unit {unit_name}")


def format_report(info: Dict[str, Any]) -> str:
    source = info["resharded_from"]
    lines = [f"checkpoint: {info['checkpoint']}",
             f"layout: world size {info['world_size']}  ZeRO {info['zero_stage']}  {info['dtype']}  "
             f"optimizer files: {info['optimizer_files']}"
             + (f"  (resharded from world size {source['world_size']}, ep_size "
                f"{max(source['ep_size'].values(), default=1)}, ZeRO {source['zero_stage']})" if source else ""),
             f"MoE layers: {len(info['moe_layers'])}  experts: {info['num_experts']}  ep_size: {info['ep_size']}  "
             f"DY-Conv layers: {len(info['dyconv_layers'])}",
             f"{'PAD unit':60s} {'factors':>7s} {'dyn.ratio':>9s} {'lambda_d':>8s} {'lambda_s':>8s} "
             f"{'fully dyn.':>11s} {'PAD':>11s}"]
    for u in info["units"]:
        lines.append(f"{u['name']:60s} {u['factors']:7d} {u['dynamic_ratio']:9.3f} {u['lambda_d']:8.3f} "
                     f"{u['lambda_s']:8.3f} {u['params_fully_dynamic']:11.0f} {u['params_pad']:11.0f}")
    for what in ("model_state_bytes", "checkpoint_bytes"):
        if info.get(what):
            lines.append(f"{what.replace('_', ' ')}{' per rank' if what == 'model_state_bytes' else ''}: "
                         f"packed {info[what]['packed']:,}, unpacked {info[what]['unpacked']:,}"
                         f"{' (stored packed)' if info['packed'] else ''}")
    frac = info["pad_fraction_of_fully_dynamic"]
    lines.append(f"overall dynamic ratio {info['dynamic_ratio']:.3f}; PAD stores {info['params_pad']:.0f} of "
                 f"{info['params_fully_dynamic']:.0f} values a fully dynamic model would"
                 + (f" ({100 * frac:.1f}%)" if frac else ""))
    return "\n".join(lines)
