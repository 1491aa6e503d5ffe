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

A run folder resolves to its newest tag that verifies against its manifest (older ones are
used, with a warning, when a newer one is damaged); a tag folder named explicitly must verify.
Every file is read with :func:`padnet_ds.files.safe_load`.
"""
from __future__ import annotations

import logging
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, Optional, Tuple

import torch

from ..commit import MANIFEST, PARTIAL, choose_tag
from ..errors import CheckpointError
from ..files import safe_load
from .checkpoint import CLIENT_KEY, FOOTPRINT_KEY
from .layout import EXPERT_NAME, EXPERT_PREFIX, Layout, of_checkpoint
from .run_dir import RunDir

log = logging.getLogger("padnet_ds")

MODEL_STATES = "mp_rank_00_model_states.pt"
EXPERT_FILE = re.compile(r"layer_(\d+)_expert_(\d+)_mp_rank_\d+_model_states\.pt")

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


def locate(path: str) -> Tuple[Path, Path, Optional[str]]:
    """(run folder, checkpoints folder, the tag ``path`` names or None) for a run folder (output_dir),
    its checkpoints/ folder, or one tag folder. Nothing is verified yet."""
    p = Path(path)
    if not p.is_dir():
        raise FileNotFoundError(f"{path} is not a folder: give a run folder (output_dir), its checkpoints/ folder, "
                                "or a checkpoint tag folder")
    if (p / MANIFEST).is_file() or (p / MODEL_STATES).is_file() or p.name.endswith(PARTIAL):
        return p.parent.parent, p.parent, p.name
    if (p / "checkpoints").is_dir():
        return p, p / "checkpoints", None
    return p.parent, p, None


def resolve(path: str, collective: bool = False) -> Tuple[Path, Path]:
    """(run folder, tag folder): the tag ``path`` names, or the newest one that verifies.

    ``collective=True``: every rank calls it and each hashes a share of the files."""
    run, ckpt, named = locate(path)
    tag, skipped = choose_tag(ckpt, named, collective=collective)
    for why in skipped:
        log.warning("checkpoint %s; using the older %s", why, tag)
    return run, ckpt / tag


def read_experts(tag_dir: Path) -> ExpertStates:
    experts: ExpertStates = {}
    for f in sorted(tag_dir.iterdir()):
        if EXPERT_FILE.fullmatch(f.name):
            for key, t in _mapping(f, safe_load(f)).items():
                m = EXPERT_NAME.fullmatch(key)
                if m:
                    experts.setdefault(m.group(1), {}).setdefault(int(m.group(2)), {})[m.group(3)] = t
    return experts


def model_states(tag_dir: Path) -> Dict[str, Any]:
    """The tag's DeepSpeed model-states file (replicated parameters and client state), loaded weights-only."""
    path = tag_dir / MODEL_STATES
    states = safe_load(path)
    _mapping(path, states, "module")
    return states


def _mapping(path: Path, obj: Any, key: Optional[str] = None) -> Dict[str, Any]:
    value = obj.get(key) if key is not None and isinstance(obj, dict) else obj
    if not isinstance(value, dict):
        raise CheckpointError(f"checkpoint file {path} does not hold DeepSpeed {'model' if key else 'expert'} states")
    return value


def read_checkpoint(path: str, verified: bool = False) -> CheckpointState:
    """The checkpoint ``path`` names (the newest verified tag of a run folder by default), on the CPU.

    ``verified=True``: ``path`` is a tag folder the caller has just chosen with
    :func:`~padnet_ds.commit.choose_tag` (every rank hashing its share), so it is not hashed again.
    """
    if verified:
        run, ckpt, tag = locate(path)
        if tag is None:
            raise ValueError(f"read_checkpoint(verified=True) needs a tag folder, not {path}")
        tag_dir = ckpt / tag
    else:
        run, tag_dir = resolve(path)
    states = model_states(tag_dir)
    module = states["module"]
    config = RunDir(str(run)).saved_config()
    return CheckpointState(run=run, tag_dir=tag_dir, config=config, replicated=dict(module),
                           experts=read_experts(tag_dir), loop_state=dict(states.get(CLIENT_KEY) or {}),
                           footprint=dict(states.get(FOOTPRINT_KEY) or {}), layout=of_checkpoint(states, config))
