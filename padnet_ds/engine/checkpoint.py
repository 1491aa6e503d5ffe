"""Checkpoints: DeepSpeed's own (model, ZeRO optimizer, scheduler, one file per expert)
plus what it leaves out: each rank's RNG state, the partitioner's state, the loop position.

A checkpoint is a tag ``checkpoints/stepN/`` committed by :func:`padnet_ds.commit.write_tag`:
every rank writes into ``stepN.partial/``, and the folder is renamed (manifest inside, then
``latest``) only once every rank's files are complete, so a crash mid-save leaves the previous
checkpoints as they were. Resume picks the newest tag that verifies against its manifest
(:func:`resume_tag`) and says why it skipped newer ones. Every file is read back with
``weights_only=True`` (DeepSpeed's through ``checkpoint_engine.SafeCheckpointEngine``), so the
RNG state is stored as tensors and plain values.

Masks are module buffers, so DeepSpeed saves them (shared masks with the replicated
weights, per-expert masks in the per-expert files). Reading a checkpoint without a process
group (inspect, export) is ``checkpoint_reader.py``'s job.
"""
from __future__ import annotations

import logging
import random
from typing import Any, Dict, Optional

import numpy as np
import torch

from ..comm import rank, world_size
from ..commit import choose_tag, prune_tags, write_tag
from ..errors import CheckpointError
from ..files import atomic_torch_save, safe_load
from .layout import LAYOUT_KEY, of_engine
from .run_dir import RunDir
from .state import LoopState

log = logging.getLogger("padnet_ds")

TAG_PREFIX = "step"
CLIENT_KEY = "padnet"  # the loop state's key in DeepSpeed's client state
FOOTPRINT_KEY = "padnet_footprint"  # layout and sizes (engine/footprint.py), for inspect
RNG_FILE = "padnet_rng_rank{}.pt"


def tag_of(step: int) -> str:
    return f"{TAG_PREFIX}{step}"


def rng_state() -> Dict[str, Any]:
    """This process's RNG states as tensors and plain values (what ``weights_only=True`` loads)."""
    version, internal, gauss_next = random.getstate()
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    state = {"python": {"version": version, "state": torch.tensor(internal, dtype=torch.int64),
                        "gauss_next": gauss_next},
             "numpy": {"kind": kind, "keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                       "has_gauss": int(has_gauss), "cached_gaussian": float(cached)},
             "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: Dict[str, Any]) -> None:
    py, npy = state["python"], state["numpy"]
    random.setstate((py["version"], tuple(py["state"].tolist()), py["gauss_next"]))
    np.random.set_state((npy["kind"], npy["keys"].numpy().astype(np.uint32), npy["pos"], npy["has_gauss"],
                         npy["cached_gaussian"]))
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
    """Collective: every rank writes its files into the staged tag, which is committed once all are
    complete; then rank 0 prunes old tags. Returns the tag. ``footprint`` (engine/footprint.py) is
    recorded beside the loop state, for ``inspect``, and the layout record
    (engine/layout.py) for resuming at another one."""
    tag, ckpt = tag_of(state.step), run_dir.checkpoints
    client = {CLIENT_KEY: state.state_dict(), LAYOUT_KEY: of_engine(engine).to_record()}
    if footprint is not None:
        client[FOOTPRINT_KEY] = footprint
    with write_tag(ckpt, tag, meta={"step": state.step, "world_size": world_size()}) as stage:
        stage.claim(atomic_torch_save(rng_state(), stage.dir / RNG_FILE.format(rank())))
        if partitioner is not None:
            stage.claim(partitioner.save(str(ckpt), stage.dir.name))
        # save_latest=False: DeepSpeed would write `latest` from rank 0 before the other ranks are done
        engine.save_checkpoint(str(ckpt), tag=stage.dir.name, client_state=client, save_latest=False)
        stage.claim(*engine.checkpoint_engine.take_written())
    if rank() == 0:
        prune_tags(ckpt, keep, protect=(tag,))
    return tag


def resume_tag(run_dir: RunDir) -> str:
    """Collective: the newest checkpoint of ``run_dir`` that verifies (every rank hashes a share of
    its files and all agree). One written at another world size or ``ep_size`` is converted on
    load (engine/reshard.py)."""
    tag, skipped = choose_tag(run_dir.checkpoints, collective=True)
    for why in skipped:
        log.warning("checkpoint %s; resuming from the older %s", why, tag)
    return tag


def load(engine, partitioner, run_dir: RunDir, state: LoopState, tag: str) -> None:
    """Restore checkpoint ``tag`` (:func:`resume_tag`) into ``engine``, ``partitioner``, this rank's RNG, ``state``."""
    ckpt = run_dir.checkpoints
    path, client = engine.load_checkpoint(str(ckpt), tag=tag)
    if path is None:
        raise CheckpointError(f"could not load checkpoint {ckpt / tag}: DeepSpeed found no model states there")
    rng_file = ckpt / tag / RNG_FILE.format(rank())
    try:
        set_rng_state(safe_load(rng_file))
    except (KeyError, TypeError, ValueError, AttributeError) as err:
        if isinstance(err, CheckpointError):
            raise
        raise CheckpointError(f"checkpoint file {rng_file} does not hold padnet-ds RNG states ({err!r})") from None
    if partitioner is not None:
        partitioner.load(str(ckpt), tag)
    state.load_state_dict(client.get(CLIENT_KEY, {}))
