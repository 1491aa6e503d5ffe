"""When partition steps run and what ratio each one targets.

Global steps count *completed* optimizer steps (the trainer's ``step`` after ``engine.step``).
In ``in_training`` mode partition step ``t`` (1..T) runs right after optimizer step

    g_t = warmup_steps + t * interval

and uses the scores of optimizer steps ``g_t - interval + 1 .. g_t`` (its scoring window).
Scoring is therefore on exactly for optimizer steps ``warmup_steps + 1 .. warmup_steps + T*interval``
and off before and after, so training outside the windows pays nothing.
"""
from __future__ import annotations

from typing import Optional

from .config import PartitionConfig


def target_ratio(cfg: PartitionConfig, t: int) -> float:
    """Dynamic fraction after partition step ``t`` (0 = fully dynamic, T = ``cfg.ratio``)."""
    frac = min(max(t, 0), cfg.steps) / cfg.steps
    if cfg.schedule == "linear":
        return 1.0 - (1.0 - cfg.ratio) * frac
    return cfg.ratio ** frac


def step_due(cfg: PartitionConfig, global_step: int) -> Optional[int]:
    """The partition step index ``t`` that runs after ``global_step`` completed steps, or None."""
    since = global_step - cfg.warmup_steps
    if since <= 0 or since % cfg.interval:
        return None
    t = since // cfg.interval
    return t if t <= cfg.steps else None


def scores_upcoming(cfg: PartitionConfig, global_step: int) -> bool:
    """Whether the optimizer step that will complete as step ``global_step + 1`` is scored."""
    return cfg.warmup_steps < global_step + 1 <= cfg.warmup_steps + cfg.steps * cfg.interval
