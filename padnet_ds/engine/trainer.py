"""The training loop: :class:`Trainer`, whose components are attributes and whose step is cut into stages.

``Trainer(cfg)`` validates the whole config (:func:`~padnet_ds.engine.validate.validate_run`)
on every rank before the process group exists, picks the checkpoint to resume from (verified
against its manifest), builds the task, the DeepSpeed engine and the PAD partitioner, and
only then writes the run folder; ``fit()`` opens TensorBoard and runs :meth:`Trainer.train_step` until ``train.steps``
(or ``train.stop_at``), evaluates, checkpoints and writes ``summary.json``. ``train(cfg)`` is
``Trainer(cfg).fit()``.
"""
from __future__ import annotations

import logging
from typing import Any, Dict, Iterable, Optional, Tuple

from ..comm import all_reduce_flat, barrier, rank, reduce_values, world_size
from ..moe.layer import pad_moe_layers
from ..moe.upcycle import perturb_experts
from ..pad.packed import is_packed, pack_model
from ..partition import Partitioner
from . import checkpoint, reshard
from .config import RunConfig
from .distributed import init_distributed
from .evaluate import evaluate
from .footprint import checkpoint_bytes, footprint
from .loader import optimizer_steps, scoring_batches, train_batches
from .monitor import Monitor, Progress
from .packing import (final_masks, is_packed_state, load_weights, local_state, pack_like, starting_checkpoint,
                      switch_to_packed)
from .run_dir import RunDir
from .setup import build_engine, optimizer_and_schedule, seed_everything
from .state import LogWindow, LoopState
from .stats import local_expert_loads, moe_aux_loss, pad_stats
from .summary import build_summary
from .tasks import Batch, build_task
from .validate import validate_run

log = logging.getLogger("padnet_ds")


class Trainer:
    """One training run. Attributes: ``cfg``, ``run_dir``, ``start`` (the checkpoint a resumed or
    ``init_from`` run starts from, or None), ``task``, ``engine`` (DeepSpeed), ``partitioner``,
    ``monitor``, ``progress``, ``state`` (:class:`LoopState`, checkpointed) and ``window``
    (:class:`LogWindow`, since the last log step).

    The engine and partitioner are built by :meth:`build_engine` / :meth:`build_partitioner`
    around ``task.model``, so a stage can rebuild them in process.
    """

    def __init__(self, cfg: RunConfig) -> None:
        self.cfg = cfg
        self.ds_config = validate_run(cfg)  # on every rank, before the process group and anything is written
        self.run_dir = RunDir(cfg.output_dir)
        init_distributed()
        self.resume_tag = checkpoint.resume_tag(self.run_dir) if cfg.resume else None  # verified, all ranks agree
        # init_from / resume: read and checked on every rank, before anything is written
        self.start = starting_checkpoint(cfg, self.run_dir, self.resume_tag)
        seed_everything(cfg.seed)  # identical model init on every rank
        self.task = build_task(cfg)
        self.perturb_for_scoring()
        self.take_start_weights()
        self.batches = train_batches(self.task, cfg, cfg.seed)
        self.total_steps = cfg.train.steps or max(1, int(cfg.train.epochs * self.batches.steps_per_epoch))
        self.engine = self.build_engine()
        self.partitioner = self.build_partitioner()
        # Only now, with everything built that can fail at start-up, does the folder get written.
        barrier()
        if rank() == 0:
            self.run_dir.create(cfg)
        barrier()
        self.monitor: Optional[Monitor] = None  # opened by begin(), once the step the run starts from is known
        self.progress: Optional[Progress] = None
        self.state = LoopState()
        self.window = LogWindow()
        self.last_eval: Dict[str, float] = {}

    # -- components -----------------------------------------------------------------------------
    def perturb_for_scoring(self) -> None:
        """``before_training`` IMP: break the upcycling symmetry (docs/PAD.md section 4) before the
        engine takes its copies of the weights."""
        part = self.cfg.partition
        if part.mode == "before_training" and (part.perturb_std or 0) > 0 and part.active:
            for layer in pad_moe_layers(self.task.model).values():
                perturb_experts(layer, part.perturb_std, seed=self.cfg.seed)

    def take_start_weights(self) -> None:
        """Before the engine exists: a packed checkpoint to resume needs a model packed like it;
        ``init_from`` loads the checkpoint's weights and masks (and packs final ones right away)."""
        if self.start is None:
            return
        model, origin = self.task.model, f"checkpoint {self.start.tag_dir}"
        state = local_state(model, self.start)
        if self.cfg.init_from is None:
            if is_packed_state(state):
                pack_like(model, state, origin)
            return
        load_weights(model, state, origin)
        if self.cfg.partition.packs and not is_packed(model) and final_masks(self.start):
            pack_model(model)

    def build_engine(self):
        """The DeepSpeed engine around ``task.model`` with the run's optimizer and learning-rate schedule."""
        optimizer, scheduler = optimizer_and_schedule(self.cfg, self.ds_config, self.total_steps)
        return build_engine(self.task.model, self.ds_config, optimizer=optimizer,
                            weight_decay=self.cfg.optim.weight_decay, lr_scheduler=scheduler)

    def build_partitioner(self) -> Partitioner:
        return Partitioner(self.engine.module, self.cfg.partition, self.engine)

    # -- the run --------------------------------------------------------------------------------
    def fit(self) -> Dict[str, Any]:
        """Resume or partition before training, run optimizer steps until done, then finish."""
        self.begin()
        steps = optimizer_steps(self.task, self.batches, self.state)
        while not self.stop_due():
            position, micro_batches = next(steps)
            self.train_step(position, micro_batches)
        return self.finish()

    def begin(self) -> None:
        """Restore the checkpoint chosen at start-up (``resume``), or run the ``before_training`` partition.

        TensorBoard opens here: after a resume from step N, ``purge_step=N+1`` hides what the
        interrupted run logged after its checkpoint, so replayed steps are recorded once.
        """
        if self.resume_tag is not None:
            reshard.restore(self.engine, self.partitioner, self.run_dir, self.state, self.cfg.seed, self.resume_tag,
                            self.start.layout)
            log.info("resumed from %s at step %d", self.resume_tag, self.state.step)
        self.monitor = Monitor(self.run_dir.tensorboard, enabled=rank() == 0,
                               purge_step=self.state.step + 1 if self.resume_tag is not None else None)
        if self.resume_tag is None and self.partitioner.active and self.cfg.partition.mode == "before_training":
            entries = self.partitioner.run_before_training(self.engine, scoring_batches(self.task, self.cfg),
                                                           self.scoring_loss)
            for entry in entries:
                self.monitor.partition(entry, 0)
        self.pack_if_final()
        self.progress = Progress(self.total_steps, self.state.step)
        self.window = LogWindow()

    def scoring_loss(self, engine, batch: Batch):
        return self.task.loss(engine, self.task.prepare(batch, engine.device, train=True))

    def stop_due(self) -> bool:
        stop_at = self.cfg.train.stop_at
        return self.state.step >= self.total_steps or bool(stop_at and self.state.step >= stop_at)

    def train_step(self, position: float, micro_batches: Iterable[Batch]) -> None:
        """One optimizer step, in stages. ``position`` is the fractional epoch at its first micro-batch.

        Every rank runs the same stages in the same order, and whether a stage is due depends
        only on the step number, so every rank enters the same collectives in the same order:

        1. ``before_step``: none (scoring switched on or off; the task's hook, e.g. a temperature).
        2. per micro-batch, ``forward_backward``: the task's ``align`` unless it has ``step_length``
           (text pads to its step's length, known on every rank: no collective); in the forward two
           all-to-alls per MoE layer (dispatch,
           combine) over its expert-parallel group, and (images) one all-reduce of the BatchNorm
           statistics; in the backward the same all-to-alls in reverse, and at the last
           micro-batch ZeRO's gradient reductions (data-parallel group for replicated parameters,
           expert-data-parallel group for expert parameters, in buckets).
        3. per micro-batch, ``optimizer_step``: at the last micro-batch DeepSpeed's MoE-aware
           gradient-norm all-reduces, the optimizer step and ZeRO's all-gather of the updated
           partitions; nothing before it.
        4. ``partition_step`` when one is due (partition/partitioner.py): the mask-digest
           all-gather; for ``imp`` a MIN all-reduce of the scored-pass count, the score
           all-reduce (per-expert masks: over the expert-data-parallel group, then an all-gather
           over the expert-parallel group) and a MAX all-reduce of the symmetry check (``magnitude``:
           the magnitude all-reduce / all-gather; ``random``: none); the digest all-gather again;
           with per-expert masks an all-reduce of the flip counts. After the last one, with
           ``partition.pack`` (engine/packing.py): the ratio all-reduce, then per parameter an
           all-reduce over its data-parallel group (its whole optimizer state) and
           ``deepspeed.initialize``'s own collectives for the packed engine.
        5. ``log_step`` every ``train.log_every`` steps and at the last: one all-reduce of the
           window means, one of the expert loads (MoE only).
        6. ``eval_step`` every ``train.eval_every`` steps: per eval batch the align all-reduce and
           the all-to-alls (every rank forwards the same number of batches), then one
           all-gather of the predictions.
        7. ``checkpoint_step`` every ``train.checkpoint_every`` steps: one all-reduce (the size record
           of engine/footprint.py), a barrier once rank 0 has emptied the staging folder, DeepSpeed's
           save (its own barriers), a barrier once every rank has hashed its files, a barrier once
           rank 0 has committed the tag (``padnet_ds/commit.py``); rank 0 then prunes old checkpoints.
        """
        self.before_step(position)
        for batch in micro_batches:
            self.forward_backward(batch)
            self.optimizer_step()
        self.state.step += 1
        step, train = self.state.step, self.cfg.train
        self.partition_step()
        if step % train.log_every == 0 or step == self.total_steps:
            self.log_step()
        if train.eval_every and step % train.eval_every == 0 and step != self.total_steps:
            self.eval_step()
        if train.checkpoint_every and step % train.checkpoint_every == 0 and step != self.total_steps:
            self.checkpoint_step()

    def finish(self) -> Dict[str, Any]:
        """Final eval (unless stopped early), a checkpoint, ``summary.json`` (rank 0)."""
        self.progress.close()
        stopped = self.state.step < self.total_steps
        if not stopped:
            self.eval_step()
        tag, sizes = self.checkpoint_step()
        sizes = {"packed": sizes["packed"], "model_state_bytes": sizes["model_state_bytes"],
                 "checkpoint_bytes": checkpoint_bytes(self.run_dir.checkpoints / tag, sizes["packed"],
                                                      sizes["checkpoint_delta"])}
        summary = build_summary(self.cfg, self.task, self.engine.module, self.partitioner, self.state,
                                self.last_eval, stopped, sizes)
        if rank() == 0:
            self.run_dir.write_summary(summary)
        self.monitor.close()
        return summary

    # -- stages of one optimizer step (see train_step) ------------------------------------------
    def before_step(self, position: float) -> None:
        self.partitioner.before_step(self.state.step)
        if self.task.before_step is not None:
            self.task.before_step(self.engine.module, self.state.step, position)

    def forward_backward(self, batch: Batch) -> None:
        batch = self.task.prepare(batch, self.engine.device, train=True)
        loss = self.task.loss(self.engine, batch)
        aux = moe_aux_loss(self.engine.module)
        self.engine.backward(loss + self.cfg.moe.aux_loss_coef * aux if aux is not None else loss)
        self.window.add(loss, aux, self.task.tokens(batch), local_expert_loads(self.engine.module))

    def optimizer_step(self) -> None:
        """DeepSpeed's step, after every micro-batch: it counts micro-batches and applies the optimizer
        (clipping, schedule) only at the last one of an optimizer step."""
        self.engine.step()

    def partition_step(self) -> None:
        entry = self.partitioner.after_step(self.state.step)
        if entry is not None:
            self.monitor.partition(entry, self.state.step)
            self.pack_if_final()

    def pack_if_final(self) -> None:
        """``partition.pack``: once the masks are final, switch to packed storage (engine/packing.py),
        rebuilding the engine in process with the optimizer state carried over."""
        if not self.cfg.partition.packs or is_packed(self.engine.module) or not self.partitioner.done:
            return
        if self.partitioner.overall_ratio() >= 1.0:  # (collective) fully dynamic: nothing to pack
            return
        self.engine = switch_to_packed(self.engine, self.build_engine)
        state = self.partitioner.state_dict()
        self.partitioner = self.build_partitioner()
        self.partitioner.load_state_dict(state)
        self.monitor.scalars({"partition/packed": 1.0}, self.state.step)  # TensorBoard: the step it packed at
        log.info("step %d: switched to packed storage (partition.pack=%s)", self.state.step, self.cfg.partition.pack)

    def log_step(self) -> None:
        step, world = self.state.step, world_size()
        local = self.window.means()
        stats = {k: v / world for k, v in zip(local, reduce_values(list(local.values())))}
        stats["tokens_per_s"] *= world
        unit = self.task.throughput_unit
        scalars = {"train/loss": stats["loss"], "train/l_aux": stats["l_aux"],
                   "train/lr": self.engine.get_lr()[0], f"perf/{unit}_per_s": stats["tokens_per_s"]}
        scalars.update(pad_stats(self.engine.module))
        self.monitor.scalars(scalars, step)
        loads = self.window.expert_loads
        self.monitor.expert_load(all_reduce_flat(list(loads.values())) if loads else [], list(loads), step)
        self.state.history.append({"step": step, "loss": stats["loss"], "l_aux": stats["l_aux"],
                                   "tokens_per_s": stats["tokens_per_s"]})
        self.progress.update(step, stats["loss"])
        self.window = LogWindow()

    def eval_step(self) -> None:
        metrics = evaluate(self.engine, self.task, self.cfg.train.eval_batch_size)
        self.monitor.scalars({f"eval/{k}": v for k, v in metrics.items()}, self.state.step)
        self.monitor.flush()
        self.state.record_eval(metrics, self.task.main_metric)
        self.last_eval = metrics

    def checkpoint_step(self) -> Tuple[str, Dict[str, Any]]:
        """A checkpoint, recording the model's layout and sizes (a collective); its tag and that record."""
        sizes = footprint(self.engine.module, self.ds_config, world_size())
        tag = checkpoint.save(self.engine, self.partitioner, self.run_dir, self.state, self.cfg.train.keep_checkpoints,
                              sizes)
        return tag, sizes


def train(cfg: RunConfig) -> Dict[str, Any]:
    return Trainer(cfg).fit()
