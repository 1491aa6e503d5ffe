"""Text to model inputs: tokenize once up front, pad per batch (batches then pad only to
their own longest row, not to max_length)."""
from __future__ import annotations

from functools import partial

import torch
from torch.nn.utils.rnn import pad_sequence
from torch.utils.data import Dataset

from .text import TextSplit

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
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        item = {k: torch.tensor(v[i], dtype=torch.long) for k, v in self.columns.items()}
        item["labels"] = self.labels[i]
        return item

    @property
    def collate_fn(self):
        """`collate` padding input_ids with this tokenizer's pad id."""
        return partial(collate, pad_id=self.pad_id)


def collate(batch, pad_id: int = 0) -> dict[str, torch.Tensor]:
    """Pad a list of items to the batch's longest row. Padded positions have attention_mask 0, so
    the pad id only matters to models that read it (the default 0 is BERT's)."""
    out = {k: pad_sequence([b[k] for b in batch], batch_first=True, padding_value=pad_id if k == "input_ids" else 0)
           for k in KEYS if k in batch[0]}
    out["labels"] = torch.stack([b["labels"] for b in batch])
    return out
