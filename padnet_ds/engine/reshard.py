"""Changing the cluster shape: ``padnet-ds reshard`` (offline) and ``resume=true`` at another layout.

DeepSpeed loads a native MoE checkpoint's optimizer state only at the layout it was written
at, and its universal-checkpoint converter skips native MoE. The pivot here is the
layout-independent state of a run:

- the model files DeepSpeed already writes independently of the layout: the model-states file
  (replicated parameters and buffers, shared masks, LR scheduler, loop state) and one file per
  *global* expert, which DeepSpeed's own loader reads at any ``ep_size``;
- every parameter's fp32 master copy and Adam moments, whole and by name, experts by global id
  (optim_files.py: read from DeepSpeed's shards of layout A, or from padnet-ds's portable files);
- the partitioner's global score sums (partition/portable.py);
- the loop position (rows of the epoch's global order, engine/loader.py), the same at any layout.

:func:`restore` (``resume=true``) builds nothing itself: the engine of the new layout exists,
DeepSpeed loads the model files into it (``load_optimizer_states=False``), then every
parameter's master copy and moments are written into its partitions
(engine/optim_state.py, DeepSpeed's ``safe_set_full_*``) and the learning rate is taken from
the restored schedule. :func:`reshard` writes a new run folder: the model files, the portable
optimizer files, the portable partitioner state, the RNG files, a ``config.yaml`` and
``ds_config.json`` for the new layout. Its optimizer files are padnet-ds's, not DeepSpeed's
flat partitions: those encode DeepSpeed's internal flattening (group order, alignment padding,
partition sizes) of one version, while the portable files are loaded through DeepSpeed's
public per-parameter API at *any* layout. What cannot carry over exactly: the per-rank RNG
streams (dropout, gate noise, random token selection) of ranks the checkpoint does not have.
"""
from __future__ import annotations

import copy
import json
import logging
import os
import shutil
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

import torch
import yaml

from ..comm import rank
from ..commit import write_tag
from ..errors import CheckpointError
from ..files import atomic_torch_save, atomic_write_text, safe_load
from ..partition.partitioner import PORTABLE_FILE, STATE_FILE, read_portable
from ..settings import ConfigError
from . import checkpoint, optim_state
from .checkpoint_reader import EXPERT_FILE, MODEL_STATES, model_states, read_experts, resolve
from .layout import EXPERT_PREFIX, LAYOUT_KEY, Layout, check_target, global_names, of_checkpoint, of_engine
from .optim_files import OptimizerState, read_deepspeed, read_portable as read_portable_optimizer
from .optim_files import write_portable
from .run_dir import RunDir
from .state import LoopState

log = logging.getLogger("padnet_ds")

BATCH_KEYS = ("train_micro_batch_size_per_gpu", "gradient_accumulation_steps", "train_batch_size")


# -- reading a checkpoint at any layout -----------------------------------------------------------
def read_layout(tag_dir: Path, config: Dict[str, Any]) -> Tuple[Layout, Dict[str, Any]]:
    """The layout a checkpoint was written at, and its model-states file."""
    states = model_states(tag_dir)
    return of_checkpoint(states, config), states


def model_weights(tag_dir: Path, states: Dict[str, Any]) -> Dict[str, torch.Tensor]:
    """{global name: tensor} of every parameter and buffer in the model files."""
    weights = dict(states["module"])
    for layer, by_id in read_experts(tag_dir).items():
        for gid, named in by_id.items():
            weights.update({EXPERT_PREFIX.format(layer=layer, expert=gid) + n: t for n, t in named.items()})
    return weights


def read_optimizer(tag_dir: Path, layout: Layout, states: Dict[str, Any], names: Optional[List[str]]) -> OptimizerState:
    """The optimizer state of ``names`` (None: all) from whichever files the checkpoint has."""
    if layout.portable:
        return read_portable_optimizer(tag_dir, names)
    weights = model_weights(tag_dir, states) if not layout.zero_stage and not layout.bf16 else {}
    return read_deepspeed(tag_dir, states, layout, weights, None if names is None else set(names).__contains__)


# -- resume at the launch's layout ----------------------------------------------------------------
def restore(engine, partitioner, run_dir: RunDir, state: LoopState, seed: int, tag: str, saved: Layout) -> None:
    """Restore checkpoint ``tag`` of ``run_dir`` (verified: checkpoint.resume_tag), written at layout
    ``saved`` (its ``CheckpointState.layout``), into this launch's engine.

    DeepSpeed's own load when the checkpoint was written at this layout (bit for bit);
    otherwise converted on the fly (module docstring), saying so in the log.
    """
    ckpt = run_dir.checkpoints
    tag_dir = ckpt / tag
    now = of_engine(engine)
    if not saved.portable and saved.shape() == now.shape():
        checkpoint.load(engine, partitioner, run_dir, state, tag)
        return
    _, states = read_layout(tag_dir, run_dir.saved_config())  # its model states: the optimizer's and the step
    log.info("checkpoint %s was written at %s; this run is %s: converting its optimizer and partitioner state on the "
             "fly (padnet-ds reshard)", tag_dir, saved.describe(), now.describe())
    if saved.global_batch and saved.global_batch != now.global_batch:
        log.warning("the global batch changes from %d to %d rows per step (world size x train.micro_batch_size x "
                    "train.grad_accum): training continues from the same row of the epoch, but not on the "
                    "uninterrupted run's batches", saved.global_batch, now.global_batch)
    names = global_names(engine.module)
    trained = {n: p for n, p in engine.module.named_parameters() if p.requires_grad}
    opt = read_optimizer(tag_dir, saved, states, [names[n] for n in trained])
    path, client = engine.load_checkpoint(str(ckpt), tag=tag, load_optimizer_states=False)
    if path is None:
        raise CheckpointError(f"could not load checkpoint {tag_dir}: DeepSpeed found no model states there")
    write_optimizer(engine, opt, {n: names[n] for n in trained})
    rng_file = tag_dir / checkpoint.RNG_FILE.format(rank())
    checkpoint.set_rng_state(safe_load(rng_file) if rng_file.is_file() else
                             checkpoint.new_rank_rng_state(seed, rank(), int(states.get("global_steps", 0))))
    if partitioner is not None:
        partitioner.load(str(ckpt), tag)
    state.load_state_dict(client.get(checkpoint.CLIENT_KEY, {}))


def write_optimizer(engine, opt: OptimizerState, names: Dict[str, str]) -> None:
    """Every trainable parameter's master copy and moments into ``engine`` (``names``: local -> global),
    then the learning rate the restored schedule holds for the next step."""
    params = dict(engine.module.named_parameters())
    missing = [g for g in names.values() if g not in opt.params]
    if missing:
        raise CheckpointError(f"the checkpoint has no optimizer state for {missing[:3]} ({len(missing)} parameters): "
                              "it is from another model")
    optim_state.prime(engine, opt.keys, opt.step)
    for local, global_name in names.items():
        optim_state.write(engine, params[local], opt.params[global_name])
    # DeepSpeed restored the schedule, but not the optimizer groups' current learning rate (it
    # comes with the optimizer state DeepSpeed did not load).
    scheduler = engine.lr_scheduler
    if scheduler is not None and hasattr(scheduler, "get_last_lr"):
        groups = engine.optimizer.param_groups
        lrs = scheduler.get_last_lr()
        if len(lrs) != len(groups):
            raise CheckpointError(f"the checkpoint's schedule has {len(lrs)} parameter groups, this run's optimizer "
                                  f"{len(groups)}: resume with the same optim settings")
        for group, lr in zip(groups, lrs):
            group["lr"] = lr


# -- padnet-ds reshard ----------------------------------------------------------------------------
def reshard(source: str, out: str, world: int, ep_size: int, zero_stage: Optional[int] = None) -> Dict[str, Any]:
    """Write checkpoint ``source`` as a run folder ``out`` loadable at ``world`` ranks, ``ep_size`` and ZeRO
    ``zero_stage`` (default: the source's); no process group. The source tag is verified against its
    manifest and every file is read before anything is written; ``out`` appears whole or not at
    all (a staging folder renamed), its tag committed with a manifest (commit.write_tag); ``source``
    is only read."""
    dest = Path(out)
    if dest.exists():
        raise ConfigError(f"OUT {dest} already exists: reshard writes a new run folder; remove it or choose another")
    run, tag_dir = resolve(source)
    config = RunDir(str(run)).saved_config()
    saved, states = read_layout(tag_dir, config)
    stage = saved.zero_stage if zero_stage is None else zero_stage
    check_target(saved.num_experts, world, ep_size, stage)
    opt = read_optimizer(tag_dir, saved, states, None)
    parts = read_portable(str(tag_dir)) if _has_partitioner(tag_dir) else None
    experts = sorted(f for f in tag_dir.iterdir() if EXPERT_FILE.fullmatch(f.name))
    for f in experts:
        safe_load(f)  # every expert file loadable before anything is written
    target = Layout(world_size=world, zero_stage=stage, bf16=saved.bf16, ep_size={n: ep_size for n in saved.ep_size},
                    num_experts=dict(saved.num_experts), portable=True, resharded_from=saved.shape())
    new_config, note = target_config(config, dest, saved, target)
    target.micro_batch, target.grad_accum = new_config["train"]["micro_batch_size"], new_config["train"]["grad_accum"]
    stage_dir = dest.parent / f".{dest.name}.partial-{os.getpid()}"
    try:
        _write_run(stage_dir, tag_dir, states, target, new_config, opt, parts, experts,
                   seed=int(config.get("seed", 0)))
        os.rename(stage_dir, dest)
    except BaseException:
        shutil.rmtree(stage_dir, ignore_errors=True)
        raise
    return {"source": str(tag_dir), "out": str(dest), "tag": tag_dir.name, "from": saved.describe(),
            "to": target.describe(), "batch": note, "parameters": len(opt.params)}


def _has_partitioner(tag_dir: Path) -> bool:
    return (tag_dir / PORTABLE_FILE).is_file() or (tag_dir / STATE_FILE.format(0)).is_file()


def target_config(config: Dict[str, Any], dest: Path, saved: Layout, target: Layout) -> Tuple[Dict[str, Any], str]:
    """The source's ``config.yaml`` for the new layout, and what was done to keep the global batch.

    ``grad_accum`` takes up the change of world size when it can (the same micro-batches, the
    exact path), else ``micro_batch_size``; ``train.stop_at`` (one launch's interruption) is cleared."""
    cfg = copy.deepcopy(config)
    train = cfg.setdefault("train", {})
    micro, accum = int(train.get("micro_batch_size", saved.micro_batch or 16)), int(train.get("grad_accum", 1))
    rows = saved.world_size * micro * accum
    if (saved.world_size * accum) % target.world_size == 0:
        accum = saved.world_size * accum // target.world_size
        note = f"global batch {rows} kept: train.grad_accum={accum} (the same micro-batches)"
    elif rows % (target.world_size * accum) == 0:
        micro = rows // (target.world_size * accum)
        note = f"global batch {rows} kept: train.micro_batch_size={micro}"
    else:
        note = (f"global batch {rows} cannot be split over {target.world_size} ranks: it becomes "
                f"{target.world_size * micro * accum} (train.micro_batch_size={micro}, train.grad_accum={accum})")
    train.update(micro_batch_size=micro, grad_accum=accum, stop_at=None)
    cfg.setdefault("moe", {})["ep_size"] = next(iter(target.ep_size.values()), 1)
    cfg["output_dir"] = str(dest)
    cfg["ds_config"] = str(dest.resolve() / "ds_config.json")
    return cfg, note


def _ds_config(states: Dict[str, Any], stage: int) -> Dict[str, Any]:
    """The source run's DeepSpeed JSON at ZeRO ``stage``; batch sizes come from the run config."""
    ds = {k: v for k, v in copy.deepcopy(states.get("ds_config") or {}).items() if k not in BATCH_KEYS}
    ds.setdefault("zero_optimization", {})["stage"] = stage
    return ds


def _write_run(root: Path, tag_dir: Path, states: Dict[str, Any], target: Layout, config: Dict[str, Any],
               opt: OptimizerState, parts: Optional[Dict[str, Any]], experts: List[Path], seed: int) -> None:
    root.mkdir()
    ds = _ds_config(states, target.zero_stage)
    atomic_write_text(root / "ds_config.json", json.dumps(ds, indent=2) + "\n")
    atomic_write_text(root / "config.yaml", yaml.safe_dump(config, sort_keys=False))
    new_states = dict(states)
    new_states.update({LAYOUT_KEY: target.to_record(), "dp_world_size": target.world_size,
                       "ds_config": dict(ds, train_micro_batch_size_per_gpu=target.micro_batch,
                                         gradient_accumulation_steps=target.grad_accum),
                       # the source layout's: DeepSpeed's optimizer state (stage 0) and ZeRO's flat shapes
                       "optimizer": None, "param_shapes": None})
    step = int(states.get("global_steps", 0))
    meta = {"step": step, "world_size": target.world_size, "resharded_from": str(tag_dir)}
    with write_tag(root / "checkpoints", tag_dir.name, collective=False, meta=meta) as stage:
        out = stage.dir
        atomic_torch_save(new_states, out / MODEL_STATES)
        for f in experts:
            shutil.copyfile(f, out / f.name)
        write_portable(out, opt)
        if parts is not None:
            atomic_torch_save(parts, out / PORTABLE_FILE)
        for r in range(target.world_size):
            src = tag_dir / checkpoint.RNG_FILE.format(r)
            if src.is_file():
                shutil.copyfile(src, out / src.name)
            else:
                atomic_torch_save(checkpoint.new_rank_rng_state(seed, r, step), out / src.name)
