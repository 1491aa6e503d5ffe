"""Packed storage in a run (``partition.pack``; the layout is pad/packed.py's).

When a run packs (``auto`` or ``true``): once its masks are final. That is after the last
``in_training`` partition step, right after ``before_training`` IMP (before the first optimizer
step), or at the start when a resumed or ``init_from`` checkpoint already has final masks.

- A packed checkpoint is loaded into a model packed like it (:func:`pack_like`): its positions
  become the model's masks, the model is packed, and every tensor must then have the
  checkpoint's shape; :func:`check_packed_checkpoint` reads the files alone, before anything is
  written, so a damaged checkpoint fails on every rank with the key named.
- A live engine is switched by :func:`switch_to_packed`: every parameter's fp32 master and
  optimizer moments are read whole (engine/optim_state.py), the engine is released, the model
  packed in place and a new engine built; the state is then written back at the kept positions
  (exact: the other entries no longer exist), and the optimizer's step count, the learning-rate
  schedule, DeepSpeed's step counters and the RNG continue. The data loader is the caller's.
"""
from __future__ import annotations

import gc
from typing import Callable, Dict, Optional

import torch
from torch import Tensor, nn

from ..moe.expert import unit_key
from ..moe.layer import pad_moe_layers
from ..moe.upcycle import global_expert_ids
from ..pad.packed import dense_sources, mask_of, pack_model
from ..settings import ConfigError
from . import optim_state
from .checkpoint import rng_state, set_rng_state
from .checkpoint_reader import CheckpointState, read_checkpoint
from .layout import EXPERT_PREFIX
from .config import RunConfig
from .run_dir import RunDir
from .setup import release_engine

COUNTERS = ("global_steps", "global_samples", "micro_steps", "skipped_steps")  # DeepSpeed's step counters


def is_packed_state(keys) -> bool:
    """Whether state keys are those of a packed model (packed units keep int32 positions)."""
    return any(k.endswith(".positions") for k in keys)


def check_packed_checkpoint(ckpt: CheckpointState) -> None:
    """Every packed tensor of ``ckpt`` must hold as many values as its mask's dynamic (or static) entries."""
    rep = ckpt.replicated

    def fail(key: str, got: int, want: int, what: str, positions: str) -> None:
        raise ConfigError(f"checkpoint {ckpt.tag_dir}: {key} holds {got} packed values but its mask ({positions}) "
                          f"has {want} {what} entries: the values do not belong to this mask (a damaged "
                          "checkpoint, or one of another model); nothing was changed")

    for key, t in rep.items():
        prefix = key[: -len("static_values")]
        if key.endswith(".static_values") and prefix + "positions" in rep:
            numel = int(torch.Size(rep[prefix + "dense_shape"].tolist()).numel())
            n = rep[prefix + "positions"].numel()
            if t.numel() != numel - n:
                fail(key, t.numel(), numel - n, "static", prefix + "positions")
        elif key.endswith(".values") and key[: -len("values")] + "pad.positions" in rep:  # DY-Conv kernels [K, n]
            pos = key[: -len("values")] + "pad.positions"
            if t.ndim != 2 or t.shape[1] != rep[pos].numel():
                fail(key, t.shape[-1], rep[pos].numel(), "dynamic", pos)
    for layer, by_id in ckpt.experts.items():
        for gid, state in by_id.items():
            for name, t in state.items():
                if not name.endswith("values"):
                    continue
                path = name[: -len("values")].rstrip(".")
                own = f"{path}.positions" if path else "positions"
                shared = f"{layer}.pad.{unit_key(path)}.positions"
                positions = state.get(own, rep.get(shared))
                where = (EXPERT_PREFIX.format(layer=layer, expert=gid) + own) if own in state else shared
                if positions is None or t.numel() != positions.numel():
                    fail(EXPERT_PREFIX.format(layer=layer, expert=gid) + name, t.numel(),
                         -1 if positions is None else positions.numel(), "dynamic", where)


def starting_checkpoint(cfg: RunConfig, run_dir: RunDir, resume_tag: Optional[str]) -> Optional[CheckpointState]:
    """The checkpoint a run starts from (``init_from``, or ``resume_tag``, the verified tag resume chose),
    read from its files and checked against ``partition.pack`` on every rank, before anything is written;
    None for a fresh run."""
    if cfg.init_from is not None:
        ckpt, how = read_checkpoint(cfg.init_from), f"init_from={cfg.init_from}"
    elif resume_tag is not None:
        ckpt, how = read_checkpoint(str(run_dir.checkpoints / resume_tag), verified=True), "resume=true"
    else:
        return None
    packed = is_packed_state(ckpt.replicated) or any(is_packed_state(state) for by_id in ckpt.experts.values()
                                                     for state in by_id.values())
    if packed and not cfg.partition.packs:
        raise ConfigError(f"partition.pack=false, but the checkpoint {ckpt.tag_dir} ({how}) is packed: its masks are "
                          "final and it holds only their dynamic values, so training cannot go on dense; set "
                          "partition.pack=auto (nothing was changed)")
    if cfg.partition.pack is True and cfg.init_from is not None and not final_masks(ckpt):
        raise ConfigError(f"partition.pack=true, but every mask of {ckpt.tag_dir} (init_from) is fully dynamic: "
                          "there is nothing to pack; start from a partitioned run, or leave partition.pack at auto")
    check_packed_checkpoint(ckpt)
    return ckpt


def final_masks(ckpt: CheckpointState) -> bool:
    """Whether the checkpoint is partitioned: packed, or some mask has a static entry (the same on every rank)."""
    states = [ckpt.replicated] + [state for by_id in ckpt.experts.values() for state in by_id.values()]
    return any(k.endswith(".positions") or (k.endswith(".mask") and not bool(t.all()))
               for state in states for k, t in state.items())


def local_state(model: nn.Module, ckpt: CheckpointState) -> Dict[str, Tensor]:
    """``ckpt``'s tensors under ``model``'s own names on this rank (its local experts by global id)."""
    state = dict(ckpt.replicated)
    for name, layer in pad_moe_layers(model).items():
        by_id = ckpt.experts.get(name, {})
        for i, gid in enumerate(global_expert_ids(layer)):
            if gid not in by_id:
                raise ConfigError(f"checkpoint {ckpt.tag_dir} has no expert {gid} of MoE layer {name} (it holds "
                                  f"{sorted(by_id)}): it is from a model with other moe settings")
            for key, t in by_id[gid].items():
                state[EXPERT_PREFIX.format(layer=name, expert=i) + key] = t
    return state


def load_weights(model: nn.Module, state: Dict[str, Tensor], origin: str) -> None:
    """``init_from``: the checkpoint's weights and masks into ``model`` (packed like it first, if it is)."""
    if is_packed_state(state):
        pack_like(model, state, origin)
    check_shapes(model, state, origin)
    missing, unexpected = model.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise ConfigError(f"{origin} does not fit this model: missing {sorted(missing)[:5]}, unexpected "
                          f"{sorted(unexpected)[:5]} (a checkpoint of a model with other model/moe settings)")


def pack_like(model: nn.Module, state: Dict[str, Tensor], origin: str) -> None:
    """Pack ``model`` with the masks of a packed ``state``; its tensors then have ``state``'s shapes."""
    buffers = dict(model.named_buffers())
    with torch.no_grad():
        for key, positions in state.items():
            if key.endswith(".positions"):
                mask = buffers.get(key[: -len("positions")] + "mask")
                if mask is None:
                    raise ConfigError(f"{origin}: {key} has no mask in this model: the checkpoint is of another model")
                mask.copy_(mask_of(positions, mask.shape))
    pack_model(model)
    check_shapes(model, state, origin)


def check_shapes(model: nn.Module, state: Dict[str, Tensor], origin: str) -> None:
    own = model.state_dict()
    for key, t in own.items():
        if key in state and tuple(state[key].shape) != tuple(t.shape):
            raise ConfigError(f"{origin}: {key} has shape {tuple(state[key].shape)}, this model's {tuple(t.shape)}: "
                              "the checkpoint is from a model with other settings")


def switch_to_packed(engine, build: Callable[[], object]):
    """Pack ``engine``'s model in place and return the engine ``build()`` makes for it, carrying every
    parameter's optimizer state at the kept positions. Collective (every rank, same point)."""
    model = engine.module
    keys, step = optim_state.moment_keys(engine), optim_state.step_count(engine)
    states = optim_state.read_all(engine, dict(model.named_parameters()), keys)
    schedule = engine.lr_scheduler.state_dict() if engine.lr_scheduler is not None else None
    lrs = [group["lr"] for group in engine.optimizer.param_groups]
    counters = {k: getattr(engine, k) for k in COUNTERS}
    rng = rng_state()
    release_engine(engine)
    del engine
    gc.collect()  # the old engine's flat buffers, before the new engine allocates its own
    pack_model(model)
    sources = dense_sources(model)
    new = build()
    if keys:  # before the first optimizer step there is no state to carry but the weights
        optim_state.prime(new, keys, step)
    for name, p in model.named_parameters():
        src = sources.get(name)
        optim_state.write(new, p, states[src.name].mapped(src.take) if src else states[name])
    if schedule is not None:
        new.lr_scheduler.load_state_dict(schedule)
    if len(lrs) != len(new.optimizer.param_groups):
        raise RuntimeError(f"the packed engine has {len(new.optimizer.param_groups)} parameter groups, the dense one "
                           f"had {len(lrs)}: the learning rates cannot be carried over")
    for group, lr in zip(new.optimizer.param_groups, lrs):
        group["lr"] = lr
    for k, v in counters.items():
        setattr(new, k, v)
    set_rng_state(rng)
    return new
