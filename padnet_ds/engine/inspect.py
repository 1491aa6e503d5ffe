"""``padnet-ds inspect``: what a checkpoint holds, read from its files (no process group).

A PAD unit is any state-dict prefix with both ``static_weight`` and ``phi``; its factors
are the experts of its MoE layer (one file per global expert) or the kernels of its
DY-Conv layer. Masks come from the replicated state (shared) or the expert files.
"""
from __future__ import annotations

from typing import Any, Dict

import torch

from ..moe.expert import unit_key
from ..pad.accounting import pad_counts
from ..pad.compose import lambda_pair
from .checkpoint_reader import CheckpointState, read_checkpoint


def inspect_checkpoint(path: str) -> Dict[str, Any]:
    ckpt = read_checkpoint(path)
    moe_cfg = ckpt.config.get("moe", {})
    units = [unit_report(key[: -len(".static_weight")], ckpt) for key in sorted(ckpt.replicated)
             if key.endswith(".static_weight")]
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
    }


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
    if moe_prefix and moe_prefix in experts:
        layer_experts = experts[moe_prefix]
        factors = len(layer_experts)
        masks = [module[f"{prefix}.mask"]] if f"{prefix}.mask" in module else [
            expert_mask(e, unit_name) for e in layer_experts.values()]
        kind, layer = "moe", moe_prefix
    else:
        layer = prefix.rpartition(".")[0]
        kernels = module.get(f"{layer}.weight")
        factors = int(kernels.shape[0]) if kernels is not None and kernels.ndim == 5 else 1
        masks = [module[f"{prefix}.mask"]]
        kind = "dyconv"
    mode = lambda_modes(ckpt.config)[kind]
    weight = module[f"{prefix}.static_weight"]
    ratio = float(sum(m.float().sum() for m in masks) / sum(m.numel() for m in masks))
    lam_d, lam_s = lambda_pair(mode, module[f"{prefix}.phi"].float().view(()))
    counts = pad_counts(weight.numel(), factors, ratio, mode != "prune")
    return dict(name=prefix, kind=kind, layer=layer, factors=factors, shape=list(weight.shape),
                dynamic_ratio=ratio, lambda_d=float(lam_d), lambda_s=float(lam_s),
                params_fully_dynamic=counts["fully_dynamic"], params_pad=counts["pad"], mask_bits=counts["mask_bits"])


def expert_mask(expert_state: Dict[str, torch.Tensor], unit_name: str) -> torch.Tensor:
    """One expert's mask for the PAD unit keyed ``unit_name`` (the key PADMoE derived from its path)."""
    for key, t in expert_state.items():
        if key.endswith(".mask") and unit_key(key[: -len(".mask")]) == unit_name:
            return t
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
    frac = info["pad_fraction_of_fully_dynamic"]
    lines.append(f"overall dynamic ratio {info['dynamic_ratio']:.3f}; PAD stores {info['params_pad']:.0f} of "
                 f"{info['params_fully_dynamic']:.0f} values a fully dynamic model would"
                 + (f" ({100 * frac:.1f}%)" if frac else ""))
    return "\n".join(lines)
