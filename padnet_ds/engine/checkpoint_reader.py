"""Read a padnet-ds checkpoint from its files alone: no process group, no DeepSpeed engine, any machine.

A tag folder (``checkpoints/stepN/``) holds DeepSpeed's files:

- ``mp_rank_00_model_states.pt``: the replicated model state (``module``: every parameter
  and buffer outside the experts, shared PAD masks included) and the client state;
- ``layer_<L>_expert_<E>_mp_rank_00_model_states.pt``: one file per global expert ``E`` of MoE
  layer ``L``, its keys ``<layer>.deepspeed_moe.experts.deepspeed_experts.<E>.<name>`` (DeepSpeed
  writes the global expert id, whatever the ``ep_size`` of the run).

:func:`read_checkpoint` returns both as :class:`CheckpointState`:
``replicated`` {key: tensor} and ``experts`` {MoE layer path: {global expert id: {name: tensor}}},
with ``name`` relative to the expert (``fc1.weight``, ``fc1.mask``). ``inspect`` reads
checkpoints through it; export, resharding and ``init_from`` build on it.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, Optional, Tuple

import torch
import yaml

from .checkpoint import CLIENT_KEY, FOOTPRINT_KEY, latest_tag
from .layout import Layout, of_checkpoint

MODEL_STATES = "mp_rank_00_model_states.pt"
EXPERT_FILE = re.compile(r"layer_(\d+)_expert_(\d+)_mp_rank_\d+_model_states\.pt")
EXPERT_KEY = re.compile(r"(.*)\.deepspeed_moe\.experts\.deepspeed_experts\.(\d+)\.(.*)")
EXPERT_PREFIX = "{layer}.deepspeed_moe.experts.deepspeed_experts.{expert}."

ExpertStates = Dict[str, Dict[int, Dict[str, torch.Tensor]]]


@dataclass
class CheckpointState:
    run: Path  # the run folder (output_dir)
    tag_dir: Path  # checkpoints/<tag>
    config: Dict[str, Any]  # the run's config.yaml ({} when the folder has none)
    replicated: Dict[str, torch.Tensor]  # every key outside the experts
    experts: ExpertStates = field(default_factory=dict)  # MoE layer -> global expert id -> {name: tensor}
    loop_state: Dict[str, Any] = field(default_factory=dict)  # the trainer's LoopState.state_dict()
    layout: Optional[Layout] = None  # the cluster shape it was written at (or resharded for), engine/layout.py
    footprint: Dict[str, Any] = field(default_factory=dict)  # layout and sizes recorded at save (engine/footprint.py)

    @property
    def tag(self) -> str:
        return self.tag_dir.name

    def expert_state_dict(self) -> Dict[str, torch.Tensor]:
        """The experts under DeepSpeed's key names (global expert ids), e.g. for a one-process model."""
        return {EXPERT_PREFIX.format(layer=layer, expert=gid) + name: t
                for layer, by_id in self.experts.items() for gid, state in by_id.items() for name, t in state.items()}


def resolve(path: str) -> Tuple[Path, Path]:
    """(run folder, tag folder) from a run folder, its checkpoints/ folder, or one tag folder."""
    p = Path(path)
    for run, ckpt, tag in ((p, p / "checkpoints", None), (p.parent, p, None), (p.parent.parent, p.parent, p.name)):
        if (ckpt / "latest").is_file() or (tag and (ckpt / tag).is_dir()):
            tag = tag or latest_tag(ckpt)
            if (ckpt / tag / MODEL_STATES).is_file():
                return run, ckpt / tag
    raise FileNotFoundError(f"{path} holds no DeepSpeed checkpoint: give a run folder (output_dir), its "
                            "checkpoints/ folder, or a checkpoint tag folder")


def read_experts(tag_dir: Path) -> ExpertStates:
    experts: ExpertStates = {}
    for f in sorted(tag_dir.iterdir()):
        if EXPERT_FILE.fullmatch(f.name):
            for key, t in torch.load(f, map_location="cpu", weights_only=False).items():
                m = EXPERT_KEY.fullmatch(key)
                if m:
                    experts.setdefault(m.group(1), {}).setdefault(int(m.group(2)), {})[m.group(3)] = t
    return experts


def read_checkpoint(path: str) -> CheckpointState:
    """The checkpoint ``path`` names (latest tag of a run folder by default), on the CPU."""
    run, tag_dir = resolve(path)
    config_file = run / "config.yaml"
    config = (yaml.safe_load(config_file.read_text()) or {}) if config_file.is_file() else {}
    states = torch.load(tag_dir / MODEL_STATES, map_location="cpu", weights_only=False)
    return CheckpointState(run=run, tag_dir=tag_dir, config=config, replicated=dict(states["module"]),
                           experts=read_experts(tag_dir), loop_state=dict(states.get(CLIENT_KEY) or {}),
                           footprint=dict(states.get(FOOTPRINT_KEY) or {}), layout=of_checkpoint(states, config))
