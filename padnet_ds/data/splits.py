"""What every text source hands back: the task's description (:class:`TaskSpec`), its rows
(:class:`TextSplit`), and the seeded row selections the sources share (a held-out split for
sources without an eval file, and row limits). The sources (glue, text_files, rotten_tomatoes)
and the entry point (text.py) import from here; nothing here imports them.
"""
from __future__ import annotations

import random
from dataclasses import dataclass

from ..errors import DataError


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
        raise DataError(f"cannot hold out {fraction:.0%} of {len(split)} rows and keep any for training")
    return split.select(sorted(order[n_eval:])), split.select(sorted(order[:n_eval]))
