"""``padnet-ds eval``: rebuild a run's model from its saved config, load a checkpoint's weights, evaluate.

Experts are stored one file per global expert, so a run can be evaluated on any number of
ranks: ``moe.ep_size`` is lowered to fit the world when needed.
"""
from __future__ import annotations

import math
from typing import Any, Dict, Sequence

from ..comm import world_size
from ..settings import ConfigError
from .checkpoint_reader import read_checkpoint, resolve
from .config import config_from_dict, merge, parse_overrides
from .distributed import init_distributed
from .evaluate import evaluate
from .packing import check_packed_checkpoint, is_packed_state, local_state, pack_like
from .setup import build_engine, seed_everything
from .tasks import build_task
from .validate import validate_run


def evaluate_run(path: str, overrides: Sequence[str] = ()) -> Dict[str, Any]:
    import yaml

    run, tag_dir = resolve(path)
    if not (run / "config.yaml").is_file():
        raise ConfigError(f"{run} has no config.yaml: padnet-ds eval needs a run folder written by padnet-ds train")
    saved = yaml.safe_load((run / "config.yaml").read_text())
    cfg = config_from_dict(merge(saved, parse_overrides(overrides)))
    init_distributed()
    if world_size() % cfg.moe.ep_size:
        cfg.moe.ep_size = math.gcd(world_size(), cfg.moe.ep_size)
    ds = validate_run(cfg)
    seed_everything(cfg.seed)
    task = build_task(cfg)
    ckpt = read_checkpoint(str(tag_dir))
    check_packed_checkpoint(ckpt)
    state = local_state(task.model, ckpt)
    if is_packed_state(state):  # a packed checkpoint loads into a model packed like it
        pack_like(task.model, state, f"checkpoint {tag_dir}")
    for key in ("optimizer", "scheduler"):
        ds.pop(key, None)
    ds["zero_optimization"] = {"stage": 0}  # inference: ZeRO's partitioned optimizer has nothing to do
    engine = build_engine(task.model, ds)
    loaded, _ = engine.load_checkpoint(str(tag_dir.parent), tag=tag_dir.name, load_module_only=True,
                                       load_optimizer_states=False, load_lr_scheduler_states=False)
    if loaded is None:
        raise FileNotFoundError(f"could not load {tag_dir}")
    metrics = evaluate(engine, task, cfg.train.eval_batch_size)
    return dict(metrics, checkpoint=str(tag_dir), rows=len(task.eval_set))
