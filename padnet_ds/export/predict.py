"""``padnet-ds predict OUT_DIR INPUT [--output FILE]``: classify every row of a CSV/TSV/JSONL file with an export.

Rows are read by the training data's rules (``data/text_files.py``: the formats, TSV without
quoting, one or two text columns, errors naming the file and line; no label column is needed),
tokenized with the export's tokenizer and cut at the run's ``max_length``, and classified in
batches of similar length (so a batch pads little; the results do not depend on the batching:
routing is per token with no capacity limit). The output has one row per input row, in input
order: its line in INPUT, the label (argmax class) and its score (softmax probability; for a
regression model the label is empty and the score is the prediction). ``--output`` picks CSV, TSV
or JSONL by its extension; without it, JSON lines go to stdout.
"""
from __future__ import annotations

import csv
import io
import json
import os
import sys
from typing import Any, Dict, List, Optional, Sequence

import torch

from ..data.text_files import FORMATS, read_rows
from ..errors import DataError
from ..files import atomic_write_text
from ..settings import ConfigError

COLUMNS = ("line", "label", "score")


def load_export(export_dir: str, compose: Optional[str] = None, device: Optional[str] = None):
    """(model in eval mode on ``device``, tokenizer, config) of a text export, without remote code."""
    from transformers import AutoConfig, AutoTokenizer

    from .configuration_padnet import PADNetConfig
    from .modeling_padnet import PADNetForSequenceClassification, check_export_folder

    check_export_folder(export_dir)
    # The tokenizer reads config.json too: registering the config class spares it the remote code.
    AutoConfig.register(PADNetConfig.model_type, PADNetConfig, exist_ok=True)
    kwargs = {} if compose is None else {"compose": compose}
    model = PADNetForSequenceClassification.from_pretrained(export_dir, **kwargs)
    model.to(device or ("cuda" if torch.cuda.is_available() else "cpu")).eval()
    return model, AutoTokenizer.from_pretrained(export_dir), model.config


def predict_file(export_dir: str, input_path: str, output: Optional[str] = None,
                 text_columns: Optional[Sequence[str]] = None, batch_size: int = 32,
                 compose: Optional[str] = None, device: Optional[str] = None,
                 progress: bool = True) -> List[Dict[str, Any]]:
    """Predictions for every row of ``input_path`` (written to ``output`` when given); returns them."""
    if batch_size < 1:
        raise ConfigError(f"--batch-size {batch_size} must be >= 1")
    if output is not None and os.path.splitext(output)[1].lower() not in FORMATS:
        raise ConfigError(f"--output {output!r}: use a .csv, .tsv or .jsonl file name")
    model, tokenizer, config = load_export(export_dir, compose, device)
    columns = tuple(text_columns or config.padnet.get("text_columns") or ("text",))
    if len(columns) > 2:
        raise ConfigError(f"--text-columns {','.join(columns)}: give one column, or two for sentence pairs")
    try:
        rows = read_rows(input_path, columns, None)
    except DataError as err:  # the file's own problem, named with its line
        raise DataError(f"{err} (predict --text-columns names the columns)") from None
    texts_b = rows.texts[1] if len(columns) > 1 else None
    enc = tokenizer(rows.texts[0], texts_b, truncation=True, max_length=config.padnet.get("max_length") or 512)
    order = sorted(range(len(rows.lines)), key=lambda i: len(enc["input_ids"][i]))
    scores: List[Optional[torch.Tensor]] = [None] * len(order)
    from tqdm import tqdm

    with torch.no_grad():
        for start in tqdm(range(0, len(order), batch_size), desc="predict", unit="batch", file=sys.stderr,
                          disable=not progress):
            picked = order[start:start + batch_size]
            batch = tokenizer.pad({k: [enc[k][i] for i in picked] for k in enc}, return_tensors="pt")
            logits = model(**{k: v.to(model.device) for k, v in batch.items()}).logits.float().cpu()
            for i, row in zip(picked, logits):
                scores[i] = row
    out = [prediction(line, s, config) for line, s in zip(rows.lines, scores)]
    if output is not None:
        atomic_write_text(output, render(out, FORMATS[os.path.splitext(output)[1].lower()]))
    return out


def prediction(line: int, logits: torch.Tensor, config) -> Dict[str, Any]:
    if config.problem_type == "regression" or logits.numel() == 1:
        return {"line": line, "label": None, "score": float(logits.reshape(-1)[0])}
    probs = logits.softmax(-1)
    best = int(probs.argmax())
    return {"line": line, "label": config.id2label[best], "score": float(probs[best])}


def render(rows: List[Dict[str, Any]], fmt: str) -> str:
    if fmt == "jsonl":
        return "".join(json.dumps(r) + "\n" for r in rows)
    buf = io.StringIO()
    writer = csv.DictWriter(buf, COLUMNS, delimiter="\t" if fmt == "tsv" else ",", lineterminator="\n",
                            quoting=csv.QUOTE_NONE if fmt == "tsv" else csv.QUOTE_MINIMAL, escapechar="\\")
    writer.writeheader()
    writer.writerows({**r, "label": "" if r["label"] is None else r["label"]} for r in rows)
    return buf.getvalue()



