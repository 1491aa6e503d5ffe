"""``padnet-ds eval``: rebuild a run's model from its saved config, load a checkpoint's weights, evaluate.

Experts are stored one file per global expert, so a run can be evaluated on any number of
ranks: ``moe.ep_size`` is lowered to fit the world when needed. A run folder is evaluated at
its newest checkpoint that verifies against its manifest (a newer damaged or unfinished one is
skipped, with a warning); DeepSpeed loads the files with ``weights_only=True``.
"""
from __future__ import annotations

import json
import logging
import math
from typing import Any, Dict, List, Optional, Sequence

from ..comm import rank
from ..commit import choose_tag
from ..files import atomic_write_text
from ..settings import ConfigError
from .checkpoint_reader import locate, read_checkpoint
from .config import config_from_dict, merge, parse_overrides
from .distributed import init_distributed, launch_world
from .evaluate import evaluate
from .packing import check_packed_checkpoint, is_packed_state, local_state, pack_like
from .run_dir import RunDir
from .setup import build_engine, seed_everything
from .tasks import build_task
from .validate import validate_run

log = logging.getLogger("padnet_ds")


def evaluate_run(path: str, overrides: Sequence[str] = (), predictions: Optional[str] = None) -> Dict[str, Any]:
    """Metrics of the checkpoint ``path`` names; ``predictions``: also write every eval row's logits
    there (JSON lines, rank 0: index, label, prediction, logits)."""
    run, folder, named = locate(path)
    saved = RunDir(str(run)).saved_config()
    if not saved:
        raise ConfigError(f"{run} has no config.yaml: padnet-ds eval needs a run folder written by padnet-ds train")
    cfg = config_from_dict(merge(saved, parse_overrides(overrides)))
    world = launch_world()
    if world % cfg.moe.ep_size:
        cfg.moe.ep_size = math.gcd(world, cfg.moe.ep_size)
    ds = validate_run(cfg, run_folder=False)  # every rank, before the process group exists
    init_distributed()
    tag, skipped = choose_tag(folder, named, collective=True)
    for why in skipped:
        log.warning("checkpoint %s; evaluating the older %s", why, tag)
    tag_dir = folder / tag
    seed_everything(cfg.seed)
    task = build_task(cfg)
    saved_state = read_checkpoint(str(tag_dir), verified=True)  # chosen just above, on every rank
    check_packed_checkpoint(saved_state)
    state = local_state(task.model, saved_state)
    if is_packed_state(state):  # a packed checkpoint loads into a model packed like it
        pack_like(task.model, state, f"checkpoint {tag_dir}")
    for key in ("optimizer", "scheduler"):
        ds.pop(key, None)
    ds["zero_optimization"] = {"stage": 0}  # inference: ZeRO's partitioned optimizer has nothing to do
    engine = build_engine(task.model, ds)
    loaded, _ = engine.load_checkpoint(str(folder), tag=tag, load_module_only=True,
                                       load_optimizer_states=False, load_lr_scheduler_states=False)
    if loaded is None:
        raise FileNotFoundError(f"could not load {tag_dir}")
    rows: Optional[List[Dict[str, Any]]] = [] if predictions else None
    metrics = evaluate(engine, task, cfg.train.eval_batch_size, rows)
    if predictions and rank() == 0:
        atomic_write_text(predictions, "".join(json.dumps(row) + "\n" for row in rows))
    return dict(metrics, checkpoint=str(tag_dir), rows=len(task.eval_set))
