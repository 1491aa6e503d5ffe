"""``Partitioner``: Iterative Mode Partition driven by the training loop (docs/PAD.md sections 4-5).

Training loop contract (``g`` counts completed optimizer steps)::

    partitioner = Partitioner(engine.module, cfg.partition, engine)
    partitioner.run_before_training(engine, batches, loss_fn)   # mode before_training only
    for each optimizer step:
        partitioner.before_step(g)          # g = steps completed so far; switches scoring on/off
        grad_accum x (forward, engine.backward, engine.step)
        g += 1
        entry = partitioner.after_step(g)   # a partition step when due; its log entry or None

In ``in_training`` mode partition step t = 1..T runs in ``after_step(warmup_steps + t * interval)``
(see :mod:`.schedule`). Every method (imp, random, magnitude) is collective: all ranks must
call ``after_step``/``run_before_training``/``overall_ratio``/``layer_ratios`` alike.
"""
from __future__ import annotations

import copy
import os
from typing import Any, Callable, Dict, Iterable, Iterator, List, Optional

import torch
import torch.distributed as dist
from torch import Tensor, nn

from ..comm import max_over_ranks, min_over_ranks, rank, world_size as world
from ..errors import CheckpointError
from ..files import atomic_torch_save, safe_load
from .config import PartitionConfig
from .schedule import scores_upcoming, step_due, target_ratio
from .scores import ScoreBook, loss_scale_fn, magnitudes, random_scores
from .portable import local_sums, portable_state, site_shapes
from .select import select_each, select_global
from .sites import Site, find_sites
from .sync import expert_groups, global_counts, global_imp_scores, global_magnitudes, verify

STATE_FILE = "padnet_partition_rank{}.pt"
PORTABLE_FILE = "padnet_partition.pt"  # the layout-independent state (portable.py), written by padnet-ds reshard


class Partitioner:

    def __init__(self, model: nn.Module, cfg: PartitionConfig, engine=None) -> None:
        self.model = model
        self.cfg = cfg
        self.sites: List[Site] = find_sites(model)
        if cfg.active and not self.sites:
            raise ValueError(f"partition.ratio={cfg.ratio} but the model has no PAD layers (PADMoE or DY-Conv) "
                             "to partition: set partition.ratio=1.0 or build the model with PAD layers")
        if cfg.active and cfg.method == "magnitude":
            missing = [s.name for s in self.sites if not s.packed and not all(s.factors)]
            if missing:
                raise ValueError(f"partition.method='magnitude' needs the dynamic factors of every PAD unit; "
                                 f"none found for {missing}: use method 'imp' or 'random'")
        self.book = ScoreBook(self.sites, loss_scale_fn(engine))
        self.step = 0  # partition steps done
        self.ratio = 1.0  # target of the last partition step
        self.log: List[Dict[str, Any]] = []
        self.rng = torch.Generator().manual_seed(cfg.seed)

    # -- state of the schedule ------------------------------------------------------------------
    @property
    def active(self) -> bool:
        return self.cfg.active

    @property
    def done(self) -> bool:
        return not self.active or self.step >= self.cfg.steps

    def attach_engine(self, engine) -> None:
        """Follow ``engine``'s fp16 loss scale (scores are divided by it)."""
        self.book.loss_scale = loss_scale_fn(engine)

    def _scores_needed(self) -> bool:
        return self.active and self.cfg.method == "imp"

    # -- in_training ----------------------------------------------------------------------------
    def before_step(self, global_step: int) -> None:
        """Call before the micro-batches of the optimizer step that will complete as ``global_step + 1``."""
        if self.cfg.mode != "in_training" or not self._scores_needed():
            return
        scoring = not self.done and scores_upcoming(self.cfg, global_step)
        if scoring:
            self._refuse_packed(f"scoring for partition step {self.step + 1} (global step {global_step + 1})")
        self.book.switch(scoring)
        if self.book.on:
            self.book.note_weights()

    def after_step(self, global_step: int) -> Optional[Dict[str, Any]]:
        """Call after ``engine.step()`` completed optimizer step ``global_step``; runs a partition step when due."""
        if self.cfg.mode != "in_training" or self.done:
            return None
        t = step_due(self.cfg, global_step)
        if t is None or t <= self.step:
            return None
        if t != self.step + 1:
            raise RuntimeError(f"partition step {t} is due after global step {global_step}, but only {self.step} "
                               "ran so far: after_step was skipped, or a resumed run did not call partitioner.load")
        entry = self._partition(global_step)
        if self.done:
            self.book.switch(False)
        return entry

    # -- before_training ------------------------------------------------------------------------
    def run_before_training(self, engine, batches: Iterable,
                            loss_fn: Callable[[Any, Any], Tensor]) -> List[Dict[str, Any]]:
        """The paper's procedure: T rounds of ``scoring_batches`` passes in eval mode, a partition after each.

        Parameters are frozen for the passes, so no parameter gradient, optimizer state or weight
        changes; only the masks do. Every rank must see the same number of batches.
        """
        if not self.active or self.step > 0:
            return []
        if self.cfg.mode != "before_training":
            raise RuntimeError("run_before_training called with partition.mode='in_training': the in_training "
                               "schedule runs from before_step/after_step; set partition.mode=before_training")
        self._refuse_packed("before_training partitioning")
        self.attach_engine(engine)
        module = getattr(engine, "module", engine)  # a DeepSpeed engine or a plain module
        frozen = [p for p in module.parameters() if p.requires_grad]
        was_training = module.training
        entries = []
        try:
            for p in frozen:
                p.requires_grad_(False)
            module.eval()
            data = _cycle(batches)
            bare = _BareEngine(engine)
            for _ in range(self.cfg.steps):
                if self._scores_needed():
                    self.book.switch(True)
                    self.book.note_weights()
                    for _ in range(self.cfg.scoring_batches):
                        loss = loss_fn(bare, next(data))
                        if loss.requires_grad:  # False only if no PAD mask is on the loss's path
                            loss.float().backward()
                    self.book.switch(False)
                entries.append(self._partition(0))
        finally:
            self.book.switch(False)
            for p in frozen:
                p.requires_grad_(True)
            module.train(was_training)
        return entries

    # -- one partition step ---------------------------------------------------------------------
    def _refuse_packed(self, what: str) -> None:
        # Same answer on every rank (every rank packs the same layers), before any collective.
        packed = [s.name for s in self.sites if s.packed]
        if packed:
            raise RuntimeError(
                f"{what} refused: the model is packed ({', '.join(packed)}), so its masks are final; a packed PAD "
                "weight stores only the values at its mask's dynamic positions, the entries a new mask could turn "
                "dynamic no longer exist. Partition before packing (partition.pack: auto packs after the last "
                "partition step), or unpack the model first (padnet_ds.pad.packed.unpack_model)")

    def _partition(self, global_step: int) -> Dict[str, Any]:
        t = self.step + 1
        self._refuse_packed(f"partition step {t} (global step {global_step})")
        ratio = target_ratio(self.cfg, t)
        verify(self.sites, f"before partition step {t} (global step {global_step})")
        scores = self._global_scores(t)
        if self.cfg.scope == "global":
            new_masks = select_global(scores, ratio)
        else:
            new_masks = [select_each(s, ratio, 1 if site.replicated else site.num_experts)
                    for s, site in zip(scores, self.sites)]
        flips = []
        with torch.no_grad():
            for site, new in zip(self.sites, new_masks):
                local = [new] if site.replicated else [new[g] for g in site.experts]
                flips.append([int(torch.count_nonzero(m != n)) for m, n in zip(site.masks, local)])
                for m, n in zip(site.masks, local):
                    m.copy_(n)
        self.book.reset()
        self.step, self.ratio = t, ratio
        digests = verify(self.sites, f"after partition step {t} (global step {global_step})")
        flipped = global_counts(self.sites, flips)
        dynamic = [int(torch.count_nonzero(k)) for k in new_masks]  # every rank holds every site's global mask here
        entry = {"step": t, "global_step": int(global_step), "ratio": ratio,
                 "achieved": sum(dynamic) / sum(s.numel for s in self.sites),
                 "layers": {s.name: {"ratio": d / s.numel, "flipped": f}
                            for s, d, f in zip(self.sites, dynamic, flipped)},
                 "mask_digests": digests}
        self.log.append(entry)
        return entry

    def _global_scores(self, t: int) -> List[Tensor]:
        method = self.cfg.method
        if method == "random":
            return random_scores(self.sites, self.rng)
        if method == "magnitude":
            scores = global_magnitudes(self.sites, [magnitudes(s) for s in self.sites])
        else:
            if min_over_ranks(self.book.calls) == 0:
                raise RuntimeError(f"partition step {t}: no backward pass was scored on some rank since the last "
                                   "partition step: call partitioner.before_step(global_step) before each optimizer "
                                   "step's micro-batches (in_training) so the score sinks are switched on")
            # s_j = |sum dL/dM_j| (docs/PAD.md section 4): a large sum of either sign is a large first-order
            # loss change. Ranking the signed sum would keep the entries whose turning static *lowers* the
            # loss most (measured on bench.imp_recovery's planted problem: precision 0.10-0.12 against
            # random's 0.30), so the absolute value is taken after the sum over ranks and steps.
            scores = [s.abs() for s in global_imp_scores(self.sites, self.book.local())]
        self._check_information(scores, t)
        return scores

    def _check_information(self, scores: List[Tensor], t: int) -> None:
        bad = [s.name for s, v in zip(self.sites, scores) if not torch.isfinite(v).all()]
        if bad:
            raise RuntimeError(f"partition step {t}: non-finite {self.cfg.method} scores in {bad}; the loss or "
                               "gradients diverged during the scoring window")
        # Scores of identical experts are 0 only up to rounding (sum_e G_e W_e and W_static sum_e G_e are
        # summed in different orders), so the trap is read off the weights the scored passes used.
        seen = max_over_ranks([float(d) for d in self.book.diverged]) if self.cfg.method == "imp" else None
        empty = [s.name for i, (s, v) in enumerate(zip(self.sites, scores))
                 if float(v.abs().max()) == 0.0 or (seen is not None and seen[i] == 0.0)]
        if empty:
            what = "dL/dM" if self.cfg.method == "imp" else "|lambda_d W_e - lambda_s W_static|"
            fix = (f"set partition.warmup_steps > 0 (now {self.cfg.warmup_steps}) so the experts diverge before "
                   "scoring starts" if self.cfg.mode == "in_training" else
                   f"set partition.perturb_std > 0 (now {self.cfg.perturb_std}), e.g. 0.01, so the expert copies "
                   "differ")
            raise RuntimeError(
                f"partition step {t}: every {self.cfg.method} score is zero for {empty}, so there is no information "
                f"to partition on. Right after upcycling every expert equals W_static and lambda_d = lambda_s = 1, "
                f"so {what} = 0 for every entry (the symmetry trap, docs/PAD.md section 4). Fix the config: {fix}")

    # -- ratios ---------------------------------------------------------------------------------
    def layer_ratios(self) -> Dict[str, float]:
        """{PAD unit path: dynamic fraction}, per-expert masks counted over all EP ranks. Collective."""
        dyn = global_counts(self.sites, [[int(torch.count_nonzero(m)) for m in s.masks] for s in self.sites])
        return {s.name: d / s.numel for s, d in zip(self.sites, dyn)}

    def overall_ratio(self) -> float:
        """Dynamic fraction over every mask entry of the model. Collective."""
        if not self.sites:
            return 1.0
        dyn = global_counts(self.sites, [[int(torch.count_nonzero(m)) for m in s.masks] for s in self.sites])
        return sum(dyn) / sum(s.numel for s in self.sites)

    def verify(self) -> List[str]:
        """Check all copies of every mask agree (collective); one digest string per rank."""
        return verify(self.sites, f"at partition step {self.step}")

    # -- checkpoints ----------------------------------------------------------------------------
    def _layout(self) -> List[list]:
        return [[s.name, list(s.masks[0].shape), s.experts] for s in self.sites]

    def state_dict(self) -> Dict[str, Any]:
        """This rank's state: accumulated scores are per rank (each rank scored its own batches)."""
        return {"version": 1, "rank": rank(), "world": world(), "step": self.step, "ratio": self.ratio,
                "scores": self.book.state_dict(), "rng": self.rng.get_state(), "log": copy.deepcopy(self.log),
                "layout": self._layout(), "config": self.cfg.model_dump()}

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        if state["world"] != world():
            raise CheckpointError(f"partitioner state was saved with {state['world']} ranks, this run has {world()}: "
                                  "accumulated scores are per rank, so resume with the same number of ranks")
        if state["layout"] != self._layout():
            raise CheckpointError("partitioner state does not match this model's PAD masks (saved "
                                  f"{[x[0] for x in state['layout']]}): resume with the same model and ep_size")
        self.step, self.ratio = int(state["step"]), float(state["ratio"])
        self.book.load_state_dict(state["scores"])
        self.rng.set_state(state["rng"])
        self.log = copy.deepcopy(state["log"])

    def save(self, checkpoint_dir: str, tag: str) -> str:
        """Write ``<checkpoint_dir>/<tag>/padnet_partition_rank{R}.pt`` atomically; returns its path."""
        path = os.path.join(checkpoint_dir, str(tag), STATE_FILE.format(rank()))
        atomic_torch_save(self.state_dict(), path)
        return path

    def load_portable(self, state: Dict[str, Any]) -> None:
        """Restore the layout-independent state (portable.py) at this run's ranks."""
        if state["sites"] != site_shapes(self._layout()):
            raise CheckpointError("partitioner state does not match this model's PAD masks (saved "
                                  f"{[x[0] for x in state['sites']]}): resume with the same model")
        self.step, self.ratio = int(state["step"]), float(state["ratio"])
        self.rng.set_state(state["rng"])
        self.log = copy.deepcopy(state["log"])
        sums = [local_sums(score, site.experts, self._holds_first(site), world())
                for score, site in zip(state["scores"], self.sites)]
        self.book.load_state_dict({"sums": sums, "calls": state["calls"],
                                   "skipped": state["skipped"] if rank() == 0 else 0, "diverged": state["diverged"]})

    def _holds_first(self, site: Site) -> bool:
        """Whether this rank is the first of those holding ``site``'s masks (portable.py)."""
        if site.replicated or not dist.is_initialized():
            return rank() == 0
        return dist.get_rank(group=expert_groups(site)[1]) == 0

    def load(self, checkpoint_dir: str, tag: Optional[str] = None) -> None:
        """Read the state of checkpoint ``tag`` (None = DeepSpeed's ``latest``); masks come with the engine's own load.

        Written by as many ranks with the same masks per rank: this rank's own file, exactly. Written
        at another layout (or resharded): the layout-independent state (portable.py).
        """
        if tag is None:
            with open(os.path.join(checkpoint_dir, "latest")) as f:
                tag = f.read().strip()
        folder = os.path.join(checkpoint_dir, str(tag))
        own_path = os.path.join(folder, STATE_FILE.format(rank()))
        own = _read(own_path) if os.path.isfile(own_path) else None
        try:
            if own is not None and own.get("world") == world() and own.get("layout") == self._layout():
                self.load_state_dict(own)
            else:
                self.load_portable(read_portable(folder))
        except (KeyError, TypeError, AttributeError) as err:
            raise CheckpointError(f"checkpoint {folder}: its partitioner files do not hold a partitioner state "
                                  f"({err!r})") from None


def read_portable(folder: str) -> Dict[str, Any]:
    """The layout-independent partitioner state of checkpoint folder ``folder`` (no process group): its
    ``padnet_partition.pt`` (resharded), or every rank's file combined."""
    if os.path.isfile(os.path.join(folder, PORTABLE_FILE)):
        return _read(os.path.join(folder, PORTABLE_FILE))
    first = _read(os.path.join(folder, STATE_FILE.format(0)))
    return portable_state([first] + [_read(os.path.join(folder, STATE_FILE.format(r)))
                                     for r in range(1, int(first["world"]))])


def _read(path: str) -> Dict[str, Any]:
    if not os.path.isfile(path):
        raise CheckpointError(f"{path} not found: the checkpoint was saved without partitioner.save, or is "
                              "incomplete")
    state = safe_load(path)
    if not isinstance(state, dict):
        raise CheckpointError(f"checkpoint file {path} does not hold a partitioner state")
    return state


class _BareEngine:
    """``engine`` whose forward calls the module directly.

    DeepSpeed's forward hooks its outputs so that any backward through them runs the engine's
    gradient reduction epilogue; a scoring pass has no parameter gradients to reduce (and ZeRO
    fails on an empty bucket), so it must not go through that path.
    """

    def __init__(self, engine) -> None:
        self._engine = engine

    def __call__(self, *args, **kwargs):
        module = getattr(self._engine, "module", None)
        if module is None:  # a plain nn.Module
            return self._engine(*args, **kwargs)
        from deepspeed.runtime.torch_autocast import autocast_if_enabled

        with autocast_if_enabled(self._engine):
            return module(*args, **kwargs)

    def __getattr__(self, name):
        return getattr(self._engine, name)


def _cycle(batches: Iterable) -> Iterator:
    while True:
        n = 0
        for b in batches:
            n += 1
            yield b
        if n == 0:
            raise ValueError("run_before_training got no batches: give it a non-empty subset of the training data")
