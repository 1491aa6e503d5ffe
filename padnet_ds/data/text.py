"""Entry point for text classification data: one config in, (spec, train, eval) out.

The sources (glue, text_files, rotten_tomatoes) only read rows; what they share (the types,
the seeded held-out split and row limits) lives in splits.py, their config in config.py.
"""
from __future__ import annotations

from . import glue, rotten_tomatoes, text_files
from .config import SOURCES, TextDataConfig
from .splits import TaskSpec, TextSplit, subsample

__all__ = ["SOURCES", "TaskSpec", "TextDataConfig", "TextSplit", "check_text_files", "load_text_task"]


def check_text_files(cfg: TextDataConfig) -> None:
    """What can be checked about ``cfg``'s data without reading it: the GLUE task, files and folders exist."""
    if cfg.source == "glue":
        task = glue.task(cfg.task)
        if cfg.glue_dir is not None:
            glue.local_files(task, cfg.glue_dir)
    elif cfg.source == "files":
        text_files.check_files(cfg)


def load_text_task(cfg: TextDataConfig) -> tuple[TaskSpec, TextSplit, TextSplit]:
    """Load (spec, train, eval) for `cfg.source`, then apply the row limits."""
    if cfg.source == "glue":
        spec, train, evals = glue.load(cfg.task, glue_dir=cfg.glue_dir, hub_path=cfg.hub_path)
    elif cfg.source == "files":
        spec, train, evals = text_files.load(cfg)
    elif cfg.source == "rotten_tomatoes":
        spec, train, evals = rotten_tomatoes.load(eval_fraction=cfg.eval_fraction, seed=cfg.seed)
    else:
        raise ValueError(f"unknown text data source {cfg.source!r}; choose one of {', '.join(SOURCES)}")
    train = subsample(train, cfg.max_train_examples, cfg.seed)
    evals = subsample(evals, cfg.max_eval_examples, cfg.seed)
    return spec, train, evals
