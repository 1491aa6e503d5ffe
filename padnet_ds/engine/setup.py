"""Validated construction of the DeepSpeed engine around a model with PAD-MoE layers.

Every check here runs on every rank before ``deepspeed.initialize`` creates a process group
for experts, so a bad configuration raises the same clear error everywhere instead of
leaving some ranks waiting in a collective.
"""
from __future__ import annotations

import copy
import logging
from typing import Any, Dict, List

import torch
from torch import nn

from ..moe.layer import pad_moe_layers
from .distributed import accelerator_is_cpu, world_size

log = logging.getLogger(__name__)

NO_DECAY_SUFFIXES = ("bias", "phi", "LayerNorm.weight", "layer_norm.weight", "norm.weight")


def check_ds_config(ds_config: Dict[str, Any], model: nn.Module, world: int) -> Dict[str, Any]:
    """Reject what native DeepSpeed MoE cannot run; return the config with CPU-safe defaults."""
    cfg = copy.deepcopy(ds_config)
    stage = int(cfg.get("zero_optimization", {}).get("stage", 0))
    if stage not in (0, 1, 2):
        raise ValueError(f"ds_config zero_optimization.stage={stage}: DeepSpeed's native MoE, and so PADMoE, "
                         "supports ZeRO stages 0, 1 and 2 only; set zero_optimization.stage to 2")
    if cfg.get("fp16", {}).get("enabled") and accelerator_is_cpu():
        raise ValueError("ds_config fp16.enabled=true: DeepSpeed does not support fp16 on CPU; "
                         "use bf16.enabled=true or fp32 (neither fp16 nor bf16 enabled)")
    for name, layer in pad_moe_layers(model).items():
        if world % layer.ep_size:
            raise ValueError(f"world size {world} is not divisible by ep_size={layer.ep_size} of layer {name}: "
                             "launch a multiple of ep_size ranks or lower ep_size")
    opt = cfg.get("optimizer")
    if opt and accelerator_is_cpu() and opt.get("type", "").lower() in ("adam", "adamw"):
        # DeepSpeed would JIT-build a fused CUDA/CPU Adam (about 60 s); torch's is what runs on CPU.
        opt.setdefault("params", {}).setdefault("torch_adam", True)
    return cfg


def param_groups(model: nn.Module, weight_decay: float = 0.0) -> List[Dict[str, Any]]:
    """Decay / no-decay groups, then split so expert params get their own (EP-aware) groups."""
    from deepspeed.moe.utils import split_params_into_different_moe_groups_for_optimizer

    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        (no_decay if p.ndim <= 1 or name.endswith(NO_DECAY_SUFFIXES) else decay).append(p)
    if not weight_decay:
        # Nothing tells the two apart: one group, because ZeRO pays per group and step (flat
        # buffers, norms, an all-gather; 3-4 ms per extra group on 2 gloo ranks at h256).
        groups = [{"params": decay + no_decay, "weight_decay": 0.0, "name": "all"}]
    else:
        groups = [{"params": decay, "weight_decay": weight_decay, "name": "decay"},
                  {"params": no_decay, "weight_decay": 0.0, "name": "no_decay"}]
    groups = [g for g in groups if g["params"]]
    return split_params_into_different_moe_groups_for_optimizer(groups)


def build_engine(model: nn.Module, ds_config: Dict[str, Any], *, optimizer=None, weight_decay: float = 0.0,
                 lr_scheduler=None):
    """``deepspeed.initialize`` after validation; returns the engine.

    ``optimizer`` is None (the ds_config's ``optimizer`` section) or a callable taking the
    parameter groups, as ``deepspeed.initialize`` accepts.
    """
    import deepspeed

    cfg = check_ds_config(ds_config, model, world_size())
    engine, _, _, _ = deepspeed.initialize(model=model, model_parameters=param_groups(model, weight_decay),
                                           optimizer=optimizer, config=cfg, lr_scheduler=lr_scheduler,
                                           dist_init_required=False)
    return engine


def is_expert_param(p: torch.Tensor) -> bool:
    return getattr(p, "allreduce", True) is False
