"""``PartitionConfig``: the Iterative Mode Partition settings (PAD_SPEC section 4)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

MODES = ("in_training", "before_training")
SCHEDULES = ("exponential", "linear")
SCOPES = ("global", "layer")
METHODS = ("imp", "random", "magnitude")


@dataclass
class PartitionConfig:
    # Target dynamic fraction after the last partition step; 1.0 = fully dynamic, partitioner off.
    ratio: float = 1.0
    mode: str = "in_training"  # | "before_training" (the paper's procedure)
    schedule: str = "exponential"  # ratio_t = ratio ** (t/T) | "linear": 1 - (1 - ratio) * t/T
    steps: int = 4  # T partition steps
    # in_training: optimizer steps trained fully dynamic before scoring starts (breaks the symmetry).
    warmup_steps: int = 100
    interval: int = 50  # in_training: optimizer steps between partition steps (each one's scoring window)
    scope: str = "global"  # one threshold over all PAD masks | "layer": every mask keeps its own ratio
    method: str = "imp"  # | "random" | "magnitude" (|lambda_d W_e - lambda_s W_static| summed over experts)
    scoring_batches: int = 10  # before_training: forward+backward passes per partition step
    # before_training: relative std of the expert perturbation (upcycle.perturb_experts). Must be set
    # explicitly: > 0 for upcycled experts (identical copies give dL/dM = 0), 0 only if they already differ.
    perturb_std: Optional[float] = None
    seed: int = 0  # for method "random"

    def __post_init__(self) -> None:
        check(self)

    @property
    def active(self) -> bool:
        return self.ratio < 1.0


def _fail(field: str, value, why: str) -> None:
    raise ValueError(f"partition.{field}={value!r} {why}")


def check(cfg: PartitionConfig) -> None:
    if isinstance(cfg.ratio, bool) or not isinstance(cfg.ratio, (int, float)) or not 0.0 < cfg.ratio <= 1.0:
        _fail("ratio", cfg.ratio, "must be in (0, 1]: the fraction of mask entries kept dynamic "
              "(e.g. 0.5; 1.0 turns the partitioner off)")
    for field, allowed in (("mode", MODES), ("schedule", SCHEDULES), ("scope", SCOPES), ("method", METHODS)):
        if getattr(cfg, field) not in allowed:
            _fail(field, getattr(cfg, field), f"is not one of {', '.join(allowed)}")
    for field, low in (("steps", 1), ("warmup_steps", 0), ("interval", 1), ("scoring_batches", 1)):
        value = getattr(cfg, field)
        if isinstance(value, bool) or not isinstance(value, int) or value < low:
            _fail(field, value, f"must be an integer >= {low}")
    if isinstance(cfg.seed, bool) or not isinstance(cfg.seed, int):
        _fail("seed", cfg.seed, "must be an integer")
    if cfg.perturb_std is not None and (isinstance(cfg.perturb_std, bool) or not cfg.perturb_std >= 0):
        _fail("perturb_std", cfg.perturb_std, "must be >= 0 (a relative std such as 0.01)")
    if (cfg.mode == "before_training" and cfg.active and cfg.method != "random"
            and cfg.perturb_std is None):
        _fail("perturb_std", None, "must be stated for mode=before_training: upcycled experts are identical "
              "copies of W_static, so dL/dM = 0 until they are perturbed; set partition.perturb_std "
              "(e.g. 0.01), or 0 only if the experts already differ")
