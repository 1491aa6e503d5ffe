"""Entry point for text classification data: one config in, (spec, train, eval) out.

The sources (glue, text_files, rotten_tomatoes) only read rows; everything they share lives
here: the types, the seeded held-out split and the seeded row limits.
"""
from __future__ import annotations

import random
from dataclasses import dataclass

SOURCES = ("glue", "files", "rotten_tomatoes")


@dataclass(frozen=True)
class TaskSpec:
    name: str
    num_labels: int  # 1 for regression
    is_regression: bool
    metrics: tuple[str, ...]  # names understood by metrics.compute_metrics
    main_metric: str  # the one used to pick the best checkpoint
    label_names: tuple[str, ...]  # index = label id; empty for regression


@dataclass
class TextSplit:
    texts_a: list[str]
    texts_b: list[str] | None  # second sentence of a pair task, else None
    labels: list  # int ids, or floats for regression

    def __post_init__(self):
        n = len(self.texts_a)
        if len(self.labels) != n or (self.texts_b is not None and len(self.texts_b) != n):
            raise ValueError(
                f"TextSplit columns differ in length: texts_a={n}, labels={len(self.labels)}"
                + ("" if self.texts_b is None else f", texts_b={len(self.texts_b)}")
            )

    def __len__(self) -> int:
        return len(self.texts_a)

    def select(self, indices) -> TextSplit:
        pick = lambda xs: [xs[i] for i in indices]  # noqa: E731
        return TextSplit(pick(self.texts_a), None if self.texts_b is None else pick(self.texts_b),
                         pick(self.labels))


@dataclass
class TextDataConfig:
    source: str = "glue"  # "glue" | "files" | "rotten_tomatoes"
    task: str = "sst2"  # glue task; case/dash-insensitive ("SST-2" works)
    glue_dir: str | None = None  # local glue_data folder; None = load from the hub by name
    hub_path: str = "nyu-mll/glue"  # hub dataset (or a local folder with the same layout)
    train_file: str | None = None
    eval_file: str | None = None  # None = hold out eval_fraction of train_file
    text_columns: tuple[str, ...] = ("text",)
    label_column: str = "label"
    labels: tuple[str, ...] | None = None  # explicit label order; None = numeric or sorted
    regression: bool = False
    eval_fraction: float = 0.1
    max_train_examples: int | None = None
    max_eval_examples: int | None = None
    seed: int = 0


def load_text_task(cfg: TextDataConfig) -> tuple[TaskSpec, TextSplit, TextSplit]:
    """Load (spec, train, eval) for `cfg.source`, then apply the row limits."""
    # Imported here: the sources import the types above from this module.
    if cfg.source == "glue":
        from . import glue
        spec, train, evals = glue.load(cfg.task, glue_dir=cfg.glue_dir, hub_path=cfg.hub_path)
    elif cfg.source == "files":
        from . import text_files
        spec, train, evals = text_files.load(cfg)
    elif cfg.source == "rotten_tomatoes":
        from . import rotten_tomatoes
        spec, train, evals = rotten_tomatoes.load(eval_fraction=cfg.eval_fraction, seed=cfg.seed)
    else:
        raise ValueError(f"unknown text data source {cfg.source!r}; choose one of {', '.join(SOURCES)}")
    train = subsample(train, cfg.max_train_examples, cfg.seed)
    evals = subsample(evals, cfg.max_eval_examples, cfg.seed)
    return spec, train, evals


def subsample(split: TextSplit, limit: int | None, seed: int) -> TextSplit:
    """A seeded subset of `limit` rows, kept in file order; the whole split if limit is None or larger."""
    if limit is not None and limit < 1:
        raise ValueError(f"row limit must be a positive number of examples or None, got {limit}")
    if limit is None or limit >= len(split):
        return split
    return split.select(sorted(random.Random(seed).sample(range(len(split)), limit)))


def holdout(split: TextSplit, fraction: float, seed: int) -> tuple[TextSplit, TextSplit]:
    """Seeded (train, eval) split of one set of rows, for sources that ship no eval file."""
    if not 0.0 < fraction < 1.0:
        raise ValueError(f"eval_fraction must be strictly between 0 and 1, got {fraction}")
    order = list(range(len(split)))
    random.Random(seed).shuffle(order)
    n_eval = max(1, round(len(split) * fraction))
    if n_eval >= len(split):
        raise ValueError(f"cannot hold out {fraction:.0%} of {len(split)} rows and keep any for training")
    return split.select(sorted(order[n_eval:])), split.select(sorted(order[:n_eval]))
