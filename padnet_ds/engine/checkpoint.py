"""Checkpoints: DeepSpeed's own (model, ZeRO optimizer, scheduler, one file per expert)
plus what it leaves out: each rank's RNG state, the partitioner's state, the loop position.

Masks are module buffers, so DeepSpeed saves them (shared masks with the replicated
weights, per-expert masks in the per-expert files). Old checkpoints are pruned only after a
new one is complete, and never the one ``latest`` names.
"""
from __future__ import annotations

import random
import shutil
from pathlib import Path
from typing import Any, Dict, Optional

import numpy as np
import torch
import torch.distributed as dist

from .distributed import rank
from .run_dir import RunDir

TAG_PREFIX = "step"


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


def save(engine, partitioner, run_dir: RunDir, step: int, loop_state: Dict[str, Any], keep: int) -> str:
    tag = f"{TAG_PREFIX}{step}"
    ckpt = run_dir.checkpoints
    # RNG first: DeepSpeed writes `latest` last, so a crash mid-save never points at a partial tag.
    (ckpt / tag).mkdir(parents=True, exist_ok=True)
    tmp = ckpt / tag / f".padnet_rng_rank{rank()}.pt.tmp"
    torch.save(rng_state(), tmp)
    tmp.replace(ckpt / tag / f"padnet_rng_rank{rank()}.pt")
    if partitioner is not None:
        partitioner.save(str(ckpt), tag)
    engine.save_checkpoint(str(ckpt), tag=tag, client_state={"padnet": loop_state})
    if dist.is_initialized():
        dist.barrier()
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


def load(engine, partitioner, run_dir: RunDir) -> Dict[str, Any]:
    ckpt = run_dir.checkpoints
    tag = latest_tag(ckpt)
    path, client = engine.load_checkpoint(str(ckpt), tag=tag)
    if path is None:
        raise RuntimeError(f"could not load checkpoint {ckpt / str(tag)}: DeepSpeed found no model states there")
    rng_file = ckpt / tag / f"padnet_rng_rank{rank()}.pt"
    if rng_file.is_file():
        set_rng_state(torch.load(rng_file, weights_only=False))
    if partitioner is not None:
        partitioner.load(str(ckpt), tag)
    return dict(client.get("padnet", {}), tag=tag)
