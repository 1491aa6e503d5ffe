"""``summary.json``: what a finished (or stopped) run reports. Collective (ratios of per-expert masks)."""
from __future__ import annotations

from typing import Any, Dict

from torch import nn

from ..comm import world_size
from ..conv.dyconv import dyconv_modules, total_param_counts
from ..moe.layer import pad_moe_layers
from ..partition import Partitioner
from .config import RunConfig, to_dict
from .state import LoopState
from .stats import pad_stats
from .tasks import Task


def layer_table(module: nn.Module, partitioner: Partitioner) -> Dict[str, Dict[str, float]]:
    """{PAD unit: {lambda_d, lambda_s, dynamic_ratio}}, ratios counted over every rank's masks."""
    layers: Dict[str, Dict[str, float]] = {}
    for key, value in pad_stats(module).items():
        _, name, what = key.split("/", 2)
        layers.setdefault(name, {})[what] = value
    for name, ratio in partitioner.layer_ratios().items():
        layers.setdefault(name, {})["dynamic_ratio"] = ratio
    return layers


def build_summary(cfg: RunConfig, task: Task, module: nn.Module, partitioner: Partitioner, state: LoopState,
                  last_eval: Dict[str, float], stopped: bool, footprint: Dict[str, Any]) -> Dict[str, Any]:
    """``footprint``: ``packed`` and, per rank, ``model_state_bytes`` / the last checkpoint's
    ``checkpoint_bytes`` (all ranks' files), each ``{packed, unpacked}`` (engine/footprint.py)."""
    history = state.history
    layers = layer_table(module, partitioner)
    dyconv = total_param_counts(module) if any(True for _ in dyconv_modules(module)) else None
    return {
        "eval": last_eval,
        "best_eval": state.best,
        "main_metric": task.main_metric,
        "train_loss": history[-1]["loss"] if history else None,
        "steps": state.step,
        "tokens_per_s": history[-1]["tokens_per_s"] if history else None,
        "dynamic_ratio": partitioner.overall_ratio(),
        "layers": layers,
        "moe_layers": list(pad_moe_layers(module)),
        "partition_log": list(partitioner.log),
        "dyconv_param_counts": dyconv,
        **footprint,
        "task": task.name,
        "world_size": world_size(),
        "config": to_dict(cfg),
        "history": history,
        "stopped_early": stopped,
    }
