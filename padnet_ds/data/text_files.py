"""Any local text classification set: CSV, TSV or JSONL files with named columns.

Labels: an explicit list (`labels`) fixes the ids; otherwise integer labels are used as ids and
string labels get ids in sorted order, taken from the training file so every eval label is one
the model was trained on. `regression` reads floats instead.
"""
from __future__ import annotations

import csv
import io
import json
import os
from typing import NamedTuple

from ..errors import DataError
from ..files import read_text
from ..settings import ConfigError
from .config import TextDataConfig
from .splits import TaskSpec, TextSplit, holdout

FORMATS = {".csv": "csv", ".tsv": "tsv", ".jsonl": "jsonl", ".json": "jsonl"}


class Rows(NamedTuple):
    """One file's raw columns, with line numbers kept for error messages."""
    path: str
    texts: list  # one list per text column
    labels: list  # raw values, mapped later
    lines: list


def check_files(cfg: TextDataConfig) -> None:
    """data.train_file is set, and it and data.eval_file exist with a known extension (before anything is built)."""
    if cfg.train_file is None:
        raise ConfigError("data.train_file is required with data.source=files (a .csv, .tsv or .jsonl file); "
                          "data.eval_file is optional")
    for key, path in (("data.train_file", cfg.train_file), ("data.eval_file", cfg.eval_file)):
        if path is None:
            continue
        if os.path.splitext(path)[1].lower() not in FORMATS:
            raise ConfigError(f"{key}={path!r}: unknown file type; use one of {', '.join(FORMATS)}")
        if not os.path.isfile(path):
            raise FileNotFoundError(f"{key}: text data file {path!r} does not exist")


def load(cfg: TextDataConfig) -> tuple[TaskSpec, TextSplit, TextSplit]:
    check_files(cfg)
    train_raw = read_rows(cfg.train_file, cfg.text_columns, cfg.label_column)
    eval_raw = None if cfg.eval_file is None else read_rows(cfg.eval_file, cfg.text_columns, cfg.label_column)

    names, to_label = _labeler(cfg, train_raw.labels)
    train = _split(train_raw, to_label)
    evals = None if eval_raw is None else _split(eval_raw, to_label)
    if evals is None:
        train, evals = holdout(train, cfg.eval_fraction, cfg.seed)

    name = os.path.splitext(os.path.basename(cfg.train_file))[0]
    if cfg.regression:
        spec = TaskSpec(name, 1, True, ("pearson", "spearman"), "pearson", ())
    else:
        spec = TaskSpec(name, len(names), False, ("accuracy",), "accuracy", names)
    return spec, train, evals


def read_rows(path: str, text_columns, label_column) -> Rows:
    fmt = FORMATS.get(os.path.splitext(path)[1].lower())
    if fmt is None:
        raise DataError(f"{path!r}: unknown file type; use one of {', '.join(FORMATS)}")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"text data file {path!r} does not exist")
    wanted = [*text_columns, label_column]
    texts, labels, lines = [[] for _ in text_columns], [], []
    with io.StringIO(read_text(path), newline="") as f:
        if fmt == "jsonl":
            records = ((n, _json(path, n, s)) for n, s in enumerate(f, start=1) if s.strip())
        else:
            # TSV has no quoting convention (and often stray quotes); CSV quotes as usual.
            kw = {"delimiter": "\t", "quoting": csv.QUOTE_NONE} if fmt == "tsv" else {}
            reader = csv.DictReader(f, **kw)
            _check_columns(path, wanted, reader.fieldnames or [])
            records = ((reader.line_num, r) for r in reader)
        for line, rec in records:
            _check_columns(f"{path}, line {line}", wanted, list(rec))
            if any(rec[c] is None for c in wanted):
                raise DataError(f"{path}, line {line}: too few fields for columns {wanted}")
            for out, c in zip(texts, text_columns):
                out.append(str(rec[c]))
            labels.append(rec[label_column])
            lines.append(line)
    if not labels:
        raise DataError(f"{path}: no rows")
    return Rows(path, texts, labels, lines)


def _json(path: str, line: int, s: str) -> dict:
    try:
        rec = json.loads(s)
    except json.JSONDecodeError as e:
        raise DataError(f"{path}, line {line}: not valid JSON ({e}); expected one object per line") from None
    if not isinstance(rec, dict):
        raise DataError(f"{path}, line {line}: expected a JSON object per line, got {type(rec).__name__}")
    return rec


def _check_columns(where: str, wanted, found) -> None:
    missing = [c for c in wanted if c not in found]
    if missing:
        raise DataError(f"{where}: missing column(s) {missing}; columns found: {list(found)}. "
                         "Set text_columns / label_column to the file's column names.")


def _is_int(v) -> bool:
    if isinstance(v, bool):
        return False
    if isinstance(v, int):
        return True
    return isinstance(v, str) and v.strip().lstrip("-").isdigit()


def _labeler(cfg: TextDataConfig, train_labels: list):
    """(label names, function (value, where) -> label) for this config and training labels."""
    if cfg.regression:
        def to_float(v, where):
            try:
                return float(v)
            except (TypeError, ValueError):
                raise DataError(f"{where}: label {v!r} is not a number (regression=True)") from None
        return (), to_float

    if cfg.labels is None and all(_is_int(v) for v in train_labels):
        ids = [int(v) for v in train_labels]
        if min(ids) < 0:
            raise DataError(f"{cfg.train_file}: integer labels must be >= 0 (found {min(ids)}); "
                             "pass labels=(...) to map them explicitly")
        names = tuple(str(i) for i in range(max(ids) + 1))
    else:
        names = tuple(cfg.labels) if cfg.labels is not None else tuple(sorted({str(v) for v in train_labels}))
    ids = {n: i for i, n in enumerate(names)}

    def to_id(v, where):
        key = str(int(v)) if cfg.labels is None and _is_int(v) else str(v)
        if key not in ids:
            raise DataError(f"{where}: label {v!r} is not in the label set {list(names)}; "
                             "pass labels=(...) listing every label, or fix the row")
        return ids[key]
    return names, to_id


def _split(raw: Rows, to_label) -> TextSplit:
    ys = [to_label(v, f"{raw.path}, line {n}") for v, n in zip(raw.labels, raw.lines)]
    return TextSplit(raw.texts[0], raw.texts[1] if len(raw.texts) > 1 else None, ys)
