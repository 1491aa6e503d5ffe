"""``TextDataConfig``: where a text run's rows come from (the ``data`` section of a run config)."""
from __future__ import annotations

from typing import Any, Literal, Optional, Tuple

from pydantic import Field, field_validator

from ..settings import Bool, Float, Int, Settings

SOURCES = ("glue", "files", "rotten_tomatoes")


class TextDataConfig(Settings):
    section = "data"

    source: Literal["glue", "files", "rotten_tomatoes"] = "glue"
    task: str = "sst2"  # glue task; case/dash-insensitive ("SST-2" works)
    glue_dir: Optional[str] = None  # local glue_data folder; None = load from the hub by name
    hub_path: str = "nyu-mll/glue"  # hub dataset (or a local folder with the same layout)
    train_file: Optional[str] = None
    eval_file: Optional[str] = None  # None = hold out eval_fraction of train_file
    text_columns: Tuple[str, ...] = Field(("text",), min_length=1, max_length=2,
                                          description="one or two columns (two for sentence pairs)")
    label_column: str = "label"
    labels: Optional[Tuple[str, ...]] = None  # explicit label order; None = numeric or sorted
    regression: Bool = False
    eval_fraction: Float = Field(0.1, gt=0, lt=1, description="the share of rows held out when there is no "
                                 "eval file")
    max_train_examples: Optional[Int] = Field(None, ge=1)
    max_eval_examples: Optional[Int] = Field(None, ge=1)
    seed: Int = 0

    @field_validator("text_columns", "labels", mode="before")
    @classmethod
    def _one_name_is_a_list(cls, value: Any) -> Any:
        return (value,) if isinstance(value, str) else value  # text_columns=sentence
