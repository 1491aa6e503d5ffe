"""GLUE, from the hub through HF `datasets` or from a local `glue_data` folder of TSV files.

Both paths give the same labels: the local reader maps each task's TSV label strings onto the
ids HF's `glue` uses, so a model trained on one evaluates the same on the other.
"""
from __future__ import annotations

import csv
import io
import os
from dataclasses import dataclass

from ..errors import DataError
from ..files import read_text
from ..settings import ConfigError
from .splits import TaskSpec, TextSplit

_BINARY = {"0": 0, "1": 1}
_NLI3 = {"entailment": 0, "neutral": 1, "contradiction": 2}  # HF glue's mnli ids
_NLI2 = {"entailment": 0, "not_entailment": 1}  # HF glue's qnli/rte ids


@dataclass(frozen=True)
class GlueTask:
    name: str  # HF config name
    folder: str  # task folder inside glue_data
    hub_columns: tuple[str, ...]  # text columns on the hub (one or two)
    tsv_columns: tuple  # header names of the text columns, or indices when there is no header
    tsv_label: str | int
    label_map: dict | None  # TSV label string -> HF id; None = regression (float)
    label_names: tuple[str, ...]
    metrics: tuple[str, ...]
    main_metric: str
    header: bool = True
    dev_file: str = "dev.tsv"
    hub_eval_split: str = "validation"

    @property
    def spec(self) -> TaskSpec:
        regression = self.label_map is None
        return TaskSpec(self.name, 1 if regression else len(self.label_names), regression,
                        self.metrics, self.main_metric, self.label_names)


TASKS = {t.name: t for t in (
    # CoLA ships without a header: source, label, original-label mark, sentence.
    GlueTask("cola", "CoLA", ("sentence",), (3,), 1, _BINARY, ("unacceptable", "acceptable"),
             ("mcc",), "mcc", header=False),
    GlueTask("sst2", "SST-2", ("sentence",), ("sentence",), "label", _BINARY,
             ("negative", "positive"), ("accuracy",), "accuracy"),
    GlueTask("mrpc", "MRPC", ("sentence1", "sentence2"), ("#1 String", "#2 String"), "Quality",
             _BINARY, ("not_equivalent", "equivalent"), ("f1", "accuracy"), "f1"),
    GlueTask("stsb", "STS-B", ("sentence1", "sentence2"), ("sentence1", "sentence2"), "score",
             None, (), ("pearson", "spearman"), "pearson"),
    GlueTask("qqp", "QQP", ("question1", "question2"), ("question1", "question2"), "is_duplicate",
             _BINARY, ("not_duplicate", "duplicate"), ("f1", "accuracy"), "accuracy"),
    GlueTask("mnli", "MNLI", ("premise", "hypothesis"), ("sentence1", "sentence2"), "gold_label",
             _NLI3, tuple(_NLI3), ("accuracy",), "accuracy",
             dev_file="dev_matched.tsv", hub_eval_split="validation_matched"),
    GlueTask("qnli", "QNLI", ("question", "sentence"), ("question", "sentence"), "label", _NLI2,
             tuple(_NLI2), ("accuracy",), "accuracy"),
    GlueTask("rte", "RTE", ("sentence1", "sentence2"), ("sentence1", "sentence2"), "label", _NLI2,
             tuple(_NLI2), ("accuracy",), "accuracy"),
    GlueTask("wnli", "WNLI", ("sentence1", "sentence2"), ("sentence1", "sentence2"), "label",
             _BINARY, ("not_entailment", "entailment"), ("accuracy",), "accuracy"),
)}


def task(name: str) -> GlueTask:
    """Look a task up by any usual spelling: "SST-2", "sst2", "sts_b", "MNLI"."""
    key = name.lower().replace("-", "").replace("_", "")
    if key not in TASKS:
        raise ConfigError(f"data.task={name!r} is not a GLUE task; choose one of {', '.join(TASKS)}")
    return TASKS[key]


def load(name: str, glue_dir: str | None = None, hub_path: str = "nyu-mll/glue"
         ) -> tuple[TaskSpec, TextSplit, TextSplit]:
    """(spec, train, dev) of one GLUE task: local TSVs when `glue_dir` is set, else the hub."""
    t = task(name)
    if glue_dir is not None:
        return t.spec, *read_local(t, glue_dir)
    return t.spec, *read_hub(t, hub_path)


# ---- local glue_data -----------------------------------------------------------------------

def local_files(t: GlueTask, glue_dir: str) -> tuple[str, str]:
    """(train, dev) TSV paths of task ``t`` in ``glue_dir``; missing ones are errors naming the path."""
    if not os.path.isdir(glue_dir):
        raise FileNotFoundError(
            f"data.glue_dir: GLUE data folder {glue_dir!r} does not exist; expected the standard glue_data layout "
            f"<glue_dir>/<TASK>/train.tsv and dev.tsv (e.g. {os.path.join(glue_dir, 'SST-2', 'train.tsv')}), "
            "or leave glue_dir unset to load from the hub")
    paths = tuple(os.path.join(glue_dir, t.folder, f) for f in ("train.tsv", t.dev_file))
    for path in paths:
        if not os.path.isfile(path):
            raise FileNotFoundError(
                f"GLUE {t.name} file {path!r} is missing; expected train.tsv and {t.dev_file} in the task folder "
                f"{os.path.join(glue_dir, t.folder)!r} (standard glue_data layout)")
    return paths


def read_local(t: GlueTask, glue_dir: str) -> tuple[TextSplit, TextSplit]:
    return tuple(_read_tsv(t, path) for path in local_files(t, glue_dir))


def _read_tsv(t: GlueTask, path: str) -> TextSplit:
    # read_text drops MRPC's BOM; QUOTE_NONE because GLUE text has unbalanced quotes.
    with io.StringIO(read_text(path), newline="") as f:
        rows = csv.reader(f, delimiter="\t", quoting=csv.QUOTE_NONE)
        if t.header:
            found = next(rows, [])
            wanted = (*t.tsv_columns, t.tsv_label)
            missing = [c for c in wanted if c not in found]
            if missing:
                raise DataError(f"{path}: missing column(s) {missing} for GLUE {t.name}; "
                                 f"columns found: {found}")
            cols = [found.index(c) for c in wanted]
        else:
            cols = [*t.tsv_columns, t.tsv_label]
        first = 2 if t.header else 1
        texts, labels = [[] for _ in t.tsv_columns], []
        for line, row in enumerate(rows, start=first):
            if not row:
                continue
            if len(row) <= max(cols):
                raise DataError(f"{path}, line {line}: {len(row)} tab-separated fields, expected at "
                                 f"least {max(cols) + 1} (a stray tab or line break in the text?)")
            for out, c in zip(texts, cols):
                out.append(row[c])
            labels.append(_label(t, row[cols[-1]], f"{path}, line {line}"))
    return TextSplit(texts[0], texts[1] if len(texts) > 1 else None, labels)


def _label(t: GlueTask, value, where: str):
    if t.label_map is None:
        try:
            return float(value)
        except (TypeError, ValueError):
            raise DataError(f"{where}: {t.name} score {value!r} is not a number") from None
    if isinstance(value, str):
        if value in t.label_map:
            return t.label_map[value]
    elif isinstance(value, int) and 0 <= value < len(t.label_names):
        return value  # hub rows carry the id already
    allowed = sorted(t.label_map) if isinstance(value, str) else list(range(len(t.label_names)))
    raise DataError(f"{where}: label {value!r} is not a {t.name} label; allowed: {allowed}")


# ---- hub -----------------------------------------------------------------------------------

def read_hub(t: GlueTask, hub_path: str) -> tuple[TextSplit, TextSplit]:
    import datasets  # heavy; only this path needs it

    try:
        dd = datasets.load_dataset(hub_path, t.name)
    except Exception as e:  # network, cache or layout: all end the same way for the user
        raise RuntimeError(
            f"could not load GLUE {t.name} with datasets.load_dataset({hub_path!r}, {t.name!r}): {e}. "
            "Offline? Point glue_dir at a local glue_data folder instead.") from e
    return tuple(_hub_split(t, dd, s, hub_path) for s in ("train", t.hub_eval_split))


def _hub_split(t: GlueTask, dd, split: str, hub_path: str) -> TextSplit:
    if split not in dd:
        raise ValueError(f"{hub_path} {t.name} has no {split!r} split; splits found: {list(dd)}")
    ds = dd[split]
    wanted = [*t.hub_columns, "label"]
    missing = [c for c in wanted if c not in ds.column_names]
    if missing:
        raise ValueError(f"{hub_path} {t.name}/{split}: missing column(s) {missing}; "
                         f"columns found: {ds.column_names}")
    cols = ds.select_columns(wanted).to_dict()
    labels = [_label(t, v, f"{hub_path} {t.name}/{split}, row {i}") for i, v in enumerate(cols["label"])]
    texts = [cols[c] for c in t.hub_columns]
    return TextSplit(texts[0], texts[1] if len(texts) > 1 else None, labels)
