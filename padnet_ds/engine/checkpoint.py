"""Checkpoints: DeepSpeed's own (model, ZeRO optimizer, scheduler, one file per expert)
plus what it leaves out: each rank's RNG state, the partitioner's state, the loop position.

Masks are module buffers, so DeepSpeed saves them (shared masks with the replicated
weights, per-expert masks in the per-expert files). Old checkpoints are pruned only after a
new one is complete, and never the one ``latest`` names. Reading a checkpoint without a
process group (inspect, export) is ``checkpoint_reader.py``'s job.
"""
from __future__ import annotations

import random
import shutil
from pathlib import Path
from typing import Any, Dict, Optional

import numpy as np
import torch

from ..comm import barrier, rank
from ..files import atomic_torch_save
from .layout import LAYOUT_KEY, of_engine
from .run_dir import RunDir
from .state import LoopState

TAG_PREFIX = "step"
CLIENT_KEY = "padnet"  # the loop state's key in DeepSpeed's client state
FOOTPRINT_KEY = "padnet_footprint"  # layout and sizes (engine/footprint.py), for inspect
RNG_FILE = "padnet_rng_rank{}.pt"


def tag_of(step: int) -> str:
    return f"{TAG_PREFIX}{step}"


def rng_state() -> Dict[str, Any]:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: Dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def seeded_rng_state(seed: int) -> Dict[str, Any]:
    """The RNG states ``seed`` gives every generator (this process's own states are left as they were)."""
    saved = rng_state()
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
    state = rng_state()
    set_rng_state(saved)
    return state


def new_rank_rng_state(seed: int, rank_: int, step: int) -> Dict[str, Any]:
    """RNG states for a rank the checkpoint was not written by (resumed on more ranks): its own stream,
    fixed by the run's seed, the rank and the step."""
    return seeded_rng_state(((seed * 1_000_003 + rank_) * 1_000_033 + step) % 2**63)


def save(engine, partitioner, run_dir: RunDir, state: LoopState, keep: int,
         footprint: Optional[Dict[str, Any]] = None) -> str:
    """Collective: every rank writes its files, then rank 0 prunes old tags. Returns the tag.
    DeepSpeed's client state carries the loop state, the layout record (engine/layout.py) and
    ``footprint`` (engine/footprint.py, for ``inspect``)."""
    tag = tag_of(state.step)
    ckpt = run_dir.checkpoints
    # RNG first: DeepSpeed writes `latest` last, so a crash mid-save never points at a partial tag.
    atomic_torch_save(rng_state(), ckpt / tag / RNG_FILE.format(rank()))
    if partitioner is not None:
        partitioner.save(str(ckpt), tag)
    client = {CLIENT_KEY: state.state_dict(), LAYOUT_KEY: of_engine(engine).to_record()}
    if footprint is not None:
        client[FOOTPRINT_KEY] = footprint
    engine.save_checkpoint(str(ckpt), tag=tag, client_state=client)
    barrier()
    if rank() == 0:
        prune(ckpt, keep, protect=tag)
    return tag


def prune(ckpt: Path, keep: int, protect: str) -> None:
    if keep <= 0:
        return
    tags = sorted((p for p in ckpt.iterdir() if p.is_dir() and p.name.startswith(TAG_PREFIX)
                   and p.name[len(TAG_PREFIX):].isdigit()), key=lambda p: int(p.name[len(TAG_PREFIX):]))
    for old in tags[:-keep]:
        if old.name != protect:
            shutil.rmtree(old, ignore_errors=True)


def latest_tag(ckpt: Path) -> Optional[str]:
    latest = ckpt / "latest"
    return latest.read_text().strip() if latest.is_file() else None


def load(engine, partitioner, run_dir: RunDir, state: LoopState) -> str:
    """Restore the latest checkpoint into ``engine``, ``partitioner``, this rank's RNG and ``state``; its tag."""
    ckpt = run_dir.checkpoints
    tag = latest_tag(ckpt)
    path, client = engine.load_checkpoint(str(ckpt), tag=tag)
    if path is None:
        raise RuntimeError(f"could not load checkpoint {ckpt / str(tag)}: DeepSpeed found no model states there")
    rng_file = ckpt / tag / RNG_FILE.format(rank())
    if rng_file.is_file():
        set_rng_state(torch.load(rng_file, weights_only=False))
    if partitioner is not None:
        partitioner.load(str(ckpt), tag)
    state.load_state_dict(client.get(CLIENT_KEY, {}))
    return tag
