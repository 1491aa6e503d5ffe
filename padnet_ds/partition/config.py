"""``PartitionConfig``: the Iterative Mode Partition settings (docs/PAD.md section 4)."""
from __future__ import annotations

from typing import Any, Literal, Optional

from pydantic import Field, field_validator, model_validator

from ..settings import FieldError, Float, Int, Settings

MODES = ("in_training", "before_training")
SCHEDULES = ("exponential", "linear")
SCOPES = ("global", "layer")
METHODS = ("imp", "random", "magnitude")


class PartitionConfig(Settings):
    section = "partition"

    ratio: Float = Field(1.0, gt=0, le=1, description="the fraction of mask entries kept dynamic (e.g. 0.5; 1.0 "
                         "turns the partitioner off)")
    mode: Literal["in_training", "before_training"] = "in_training"  # before_training: the paper's procedure
    # ratio_t = ratio ** (t/T) | "linear": 1 - (1 - ratio) * t/T
    schedule: Literal["exponential", "linear"] = "exponential"
    steps: Int = Field(4, ge=1, description="the number T of partition steps")
    # in_training: optimizer steps trained fully dynamic before scoring starts (breaks the symmetry).
    warmup_steps: Int = Field(100, ge=0)
    # in_training: optimizer steps between partition steps (each one's scoring window)
    interval: Int = Field(50, ge=1)
    # one threshold over all PAD masks | "layer": every mask keeps its own ratio
    scope: Literal["global", "layer"] = "global"
    # | "random" | "magnitude" (|lambda_d W_e - lambda_s W_static| summed over experts)
    method: Literal["imp", "random", "magnitude"] = "imp"
    scoring_batches: Int = Field(10, ge=1)  # before_training: forward+backward passes per partition step
    # before_training: relative std of the expert perturbation (upcycle.perturb_experts). Must be set
    # explicitly: > 0 for upcycled experts (identical copies give dL/dM = 0), 0 only if they already differ.
    perturb_std: Optional[Float] = Field(None, ge=0, description="a relative std such as 0.01")
    seed: Int = 0  # for method "random"
    # Packed storage once the mask is final (pad/packed.py): experts keep only their dynamic entries.
    # auto: pack after the last partition step (in_training; the engine is rebuilt in process) or right
    # after IMP (before_training); true: the same, and an error if there is nothing to pack; false: never.
    pack: Literal["auto", True, False] = "auto"

    @field_validator("pack", mode="before")
    @classmethod
    def _pack_is_auto_or_a_bool(cls, value: Any) -> Any:
        if value != "auto" and not isinstance(value, bool):  # 1 would pass as true
            raise ValueError("must be auto, true or false")
        return value

    @model_validator(mode="after")
    def _perturbation_is_stated(self) -> "PartitionConfig":
        if self.mode == "before_training" and self.active and self.method != "random" and self.perturb_std is None:
            raise FieldError("perturb_std", None, "must be stated for mode=before_training: upcycled experts are "
                             "identical copies of W_static, so dL/dM = 0 until they are perturbed; set "
                             "partition.perturb_std (e.g. 0.01), or 0 only if the experts already differ")
        return self

    @property
    def active(self) -> bool:
        return self.ratio < 1.0

    @property
    def packs(self) -> bool:
        """Whether final masks are switched to packed storage (``pack`` auto or true)."""
        return self.pack is not False
