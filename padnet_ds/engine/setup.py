"""Engine set-up: the DeepSpeed JSON, seeding, the optimizer and schedule, ``deepspeed.initialize``.

Every check here runs on every rank before ``deepspeed.initialize`` creates a process group
for experts, so a bad configuration raises the same clear error everywhere instead of
leaving some ranks waiting in a collective.
"""
from __future__ import annotations

import copy
import json
import logging
import random
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Tuple

import numpy as np
import torch
from torch import nn

from ..comm import world_size
from ..files import read_text
from ..moe.layer import pad_moe_layers
from ..pad.packed import is_packed_weight
from ..settings import ConfigError
from .config import RunConfig
from .distributed import accelerator_is_cpu

log = logging.getLogger(__name__)

NO_DECAY_SUFFIXES = ("bias", "phi", "LayerNorm.weight", "layer_norm.weight", "norm.weight")


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def load_ds_config(cfg: RunConfig) -> Dict[str, Any]:
    """``cfg.ds_config`` read, checked against what needs no model, with the run config's batch sizes."""
    path = Path(cfg.ds_config)
    if not path.is_file():
        raise ConfigError(f"ds_config {cfg.ds_config} not found "
                          "(ds_configs/ has zero{0,1,2}_{fp32,bf16,fp16}.json)")
    try:
        ds = json.loads(read_text(path))
    except json.JSONDecodeError as err:
        raise ConfigError(f"ds_config {path} is not valid JSON ({err})") from None
    if not isinstance(ds, dict):
        raise ConfigError(f"ds_config {path} must hold a JSON object of DeepSpeed settings")
    for key, ours in (("train_micro_batch_size_per_gpu", cfg.train.micro_batch_size),
                      ("gradient_accumulation_steps", cfg.train.grad_accum)):
        if key in ds and ds[key] not in (ours, "auto"):
            raise ConfigError(f"ds_config {path} sets {key}={ds[key]} but the run config asks for {ours} "
                              "(train.micro_batch_size / train.grad_accum): remove it from the JSON or make them agree")
        ds[key] = ours
    ds.pop("train_batch_size", None)
    ds.setdefault("steps_per_print", 10**9)
    check_ds_settings(ds)
    return ds


def check_ds_settings(ds_config: Dict[str, Any]) -> None:
    """What DeepSpeed's native MoE (and so PADMoE) cannot run here, whatever the model."""
    stage = int(ds_config.get("zero_optimization", {}).get("stage", 0))
    if stage not in (0, 1, 2):
        raise ConfigError(f"ds_config zero_optimization.stage={stage}: DeepSpeed's native MoE, and so PADMoE, "
                          "supports ZeRO stages 0, 1 and 2 only; set zero_optimization.stage to 2")
    if ds_config.get("fp16", {}).get("enabled") and accelerator_is_cpu():
        raise ConfigError("ds_config fp16.enabled=true: DeepSpeed does not support fp16 on CPU; "
                          "use bf16.enabled=true or fp32 (neither fp16 nor bf16 enabled)")
    check_checkpoint_settings(ds_config)


def check_checkpoint_settings(ds_config: Dict[str, Any]) -> None:
    """padnet-ds commits each checkpoint after every rank wrote its files (padnet_ds/commit.py), which
    needs DeepSpeed to write them synchronously, with torch.save, into the shared run folder."""
    ckpt = ds_config.get("checkpoint", {})
    settings = (("checkpoint.writer", ckpt.get("writer")), ("datastates_ckpt", ds_config.get("datastates_ckpt")),
                ("checkpoint.use_node_local_storage", ckpt.get("use_node_local_storage")))
    refused = [(key, value) for key, value in settings if value not in (None, False)]
    if refused:
        key, value = refused[0]
        raise ConfigError(f"ds_config {key}={json.dumps(value)}: padnet-ds commits every checkpoint once all ranks "
                          "have written their files into the shared output_dir (crash-consistent checkpoints), "
                          f"which needs DeepSpeed's default synchronous writer; remove {key}")


def optimizer_and_schedule(cfg: RunConfig, ds: Dict[str, Any],
                           total_steps: int) -> Tuple[Optional[Callable], Optional[Callable]]:
    """AdamW + linear warm-up/decay, unless the DeepSpeed JSON brings its own optimizer/scheduler."""
    opt = None if "optimizer" in ds else (lambda groups: torch.optim.AdamW(
        groups, lr=cfg.optim.lr, betas=tuple(cfg.optim.betas), eps=cfg.optim.eps, fused=cfg.optim.fused))
    if "scheduler" in ds:
        return opt, None
    warmup = int(cfg.optim.warmup_ratio * total_steps)

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / max(1, warmup)
        return max(0.0, (total_steps - step) / max(1, total_steps - warmup))

    return opt, lambda optimizer: torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def check_ds_config(ds_config: Dict[str, Any], model: nn.Module, world: int) -> Dict[str, Any]:
    """Reject what native DeepSpeed MoE cannot run with ``model``; return the config with CPU-safe defaults."""
    cfg = copy.deepcopy(ds_config)
    check_ds_settings(cfg)
    for name, layer in pad_moe_layers(model).items():
        if world % layer.ep_size:
            raise ConfigError(f"world size {world} is not divisible by ep_size={layer.ep_size} of layer {name}: "
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
        vector = p.ndim <= 1 and not is_packed_weight(name)  # a packed weight decays like the matrix it was
        (no_decay if vector or name.endswith(NO_DECAY_SUFFIXES) else decay).append(p)
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
    """``deepspeed.initialize`` after validation; returns the engine, with DeepSpeed's checkpoint engine
    replaced by :class:`~padnet_ds.engine.checkpoint_engine.SafeCheckpointEngine`.

    ``optimizer`` is None (the ds_config's ``optimizer`` section) or a callable taking the
    parameter groups, as ``deepspeed.initialize`` accepts.
    """
    import deepspeed

    from .checkpoint_engine import install

    cfg = check_ds_config(ds_config, model, world_size())
    engine, _, _, _ = deepspeed.initialize(model=model, model_parameters=param_groups(model, weight_decay),
                                           optimizer=optimizer, config=cfg, lr_scheduler=lr_scheduler,
                                           dist_init_required=False)
    install(engine)  # every checkpoint file DeepSpeed reads is loaded with weights_only=True
    return engine


def release_engine(engine) -> None:
    """Undo what ``deepspeed.initialize`` attached outside the engine, so that another engine can be
    built around the same module: the optimizer's hooks and parameter links (``destroy``) and the
    engine's forward hooks on the module (left in place by ``destroy``; they would keep the old
    engine, and its flat buffers, alive and run its forward prologue), and the MoE layers' last
    outputs, which carry the engine's backward hooks."""
    engine.destroy()
    for layer in pad_moe_layers(engine.module).values():
        layer.clear_last_outputs()
    for hook in ("module_forward_pre_hook", "module_forward_post_hook", "first_dataloader_check"):
        handle = getattr(engine, hook, None)
        if handle is not None:
            handle.remove()
            setattr(engine, hook, None)
