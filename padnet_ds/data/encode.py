"""Text to model inputs: tokenize once up front, pad per batch (a batch pads only to its own
longest row, or to a longer one it is told, rounded up to a multiple of 8, not to max_length)."""
from __future__ import annotations

from typing import Any, Dict, List, Optional, Sequence

import torch
from torch.utils.data import Dataset

from .splits import TextSplit

KEYS = ("input_ids", "attention_mask", "token_type_ids")


class EncodedTextDataset(Dataset):
    """Rows of a TextSplit as dicts of 1-D tensors: input_ids, attention_mask, token_type_ids
    (when the tokenizer makes them) and labels (long ids, or float for regression)."""

    def __init__(self, tokenizer, split: TextSplit, max_length: int = 128, regression: bool | None = None):
        enc = tokenizer(split.texts_a, split.texts_b, truncation=True, max_length=max_length, padding=False)
        self.columns = {k: enc[k] for k in KEYS if k in enc}
        if regression is None:  # STS-B style splits carry float labels, classification int ids
            regression = any(isinstance(y, float) for y in split.labels)
        self.labels = torch.tensor(split.labels, dtype=torch.float32 if regression else torch.long)

    def __len__(self) -> int:
        return len(self.labels)

    def padded_length(self, rows: Sequence[int], cap: int) -> int:
        """The length :func:`pad_to_length` pads a batch holding ``rows`` (or more) to: their longest row."""
        return padded_length(max(len(self.columns["input_ids"][i]) for i in rows), cap)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        item = {k: torch.tensor(v[i], dtype=torch.long) for k, v in self.columns.items()}
        item["labels"] = self.labels[i]
        return item


def padded_length(longest: int, cap: int) -> int:
    """``longest`` rounded up to a multiple of 8, at most ``cap``."""
    return min(cap, -(-longest // 8) * 8)


def pad_to_length(items: List[Dict[str, Any]], length: int, pad_id: int,
                  pad_to: Optional[int] = None) -> Dict[str, torch.Tensor]:
    """Stack ``items`` padded to the batch's longest row rounded up to a multiple of 8, at most ``length``;
    or to ``pad_to`` (e.g. the longest row of a larger batch this one is part of).

    Padded positions have attention_mask 0 (and token_type_ids 0), so ``pad_id`` only matters to
    models that read it.
    """
    longest = max(len(it["input_ids"]) for it in items)
    if pad_to is not None and pad_to < min(length, longest):
        raise ValueError(f"pad_to={pad_to} is shorter than the batch's longest row ({longest} tokens)")
    length = padded_length(longest, length) if pad_to is None else pad_to
    out: Dict[str, torch.Tensor] = {}
    for key in items[0]:
        if key == "labels":
            out["labels"] = torch.stack([torch.as_tensor(it["labels"]) for it in items])
            continue
        fill = pad_id if key == "input_ids" else 0
        rows = torch.full((len(items), length), fill, dtype=torch.long)  # [batch, length]
        for i, it in enumerate(items):
            seq = torch.as_tensor(it[key], dtype=torch.long)[:length]
            rows[i, :len(seq)] = seq
        out[key] = rows
    return out
