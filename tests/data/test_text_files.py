"""The generic local source (CSV / TSV / JSONL) and the shared split helpers."""
import json

import pytest

from padnet_ds.data.splits import TextSplit, holdout, subsample
from padnet_ds.data.text import TextDataConfig, load_text_task


def cfg(train, eval_file=None, **kw):
    return TextDataConfig(source="files", train_file=str(train), eval_file=eval_file and str(eval_file), **kw)


def test_csv_string_labels_sorted_with_quotes(tmp_path):
    (tmp_path / "train.csv").write_text('text,label\n"good, really",pos\nbad,neg\nfine,neutral\n')
    (tmp_path / "dev.csv").write_text("text,label\nmeh,neg\n")
    spec, train, dev = load_text_task(cfg(tmp_path / "train.csv", tmp_path / "dev.csv"))
    assert spec.label_names == ("neg", "neutral", "pos") and spec.num_labels == 3
    assert spec.name == "train" and spec.metrics == ("accuracy",) and not spec.is_regression
    assert train.texts_a == ["good, really", "bad", "fine"] and train.labels == [2, 0, 1]
    assert train.texts_b is None and dev.labels == [0]


def test_tsv_pair_columns_explicit_labels_and_stray_quotes(tmp_path):
    (tmp_path / "t.tsv").write_text('q\tp\ty\tid\nIs "it?\tIt is.\tyes\t1\nNo?\tYes.\tno\t2\n')
    spec, train, dev = load_text_task(cfg(tmp_path / "t.tsv", tmp_path / "t.tsv", text_columns=("q", "p"),
                                          label_column="y", labels=("yes", "no")))
    assert spec.label_names == ("yes", "no")
    assert train.texts_a == ['Is "it?', "No?"] and train.texts_b == ["It is.", "Yes."]
    assert train.labels == [0, 1]


def test_jsonl_numeric_labels_are_ids(tmp_path):
    rows = [{"sentence": f"s{i}", "target": i % 3} for i in range(6)] + [{"sentence": "s6", "target": "2"}]
    (tmp_path / "d.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n\n")
    spec, train, dev = load_text_task(cfg(tmp_path / "d.jsonl", tmp_path / "d.jsonl",
                                          text_columns=("sentence",), label_column="target"))
    assert spec.label_names == ("0", "1", "2") and train.labels == [0, 1, 2, 0, 1, 2, 2]


def test_regression_and_holdout_when_no_eval_file(tmp_path):
    (tmp_path / "r.csv").write_text("text,score\n" + "".join(f"t{i},{i / 4}\n" for i in range(20)))
    spec, train, dev = load_text_task(cfg(tmp_path / "r.csv", label_column="score", regression=True,
                                          eval_fraction=0.25, seed=1))
    assert spec.is_regression and spec.num_labels == 1 and spec.main_metric == "pearson"
    assert (len(train), len(dev)) == (15, 5)
    assert sorted(train.texts_a + dev.texts_a) == sorted(f"t{i}" for i in range(20))
    assert all(isinstance(y, float) for y in train.labels) and dev.labels == [float(t[1:]) / 4 for t in dev.texts_a]


def test_holdout_and_subsample_are_seeded_and_keep_order():
    split = TextSplit([str(i) for i in range(100)], None, list(range(100)))
    tr, ev = holdout(split, 0.1, seed=0)
    assert (len(tr), len(ev)) == (90, 10) and not set(tr.texts_a) & set(ev.texts_a)
    assert holdout(split, 0.1, seed=0) == (tr, ev) and holdout(split, 0.1, seed=1) != (tr, ev)
    sub = subsample(split, 7, seed=5)
    assert len(sub) == 7 and sub.labels == sorted(sub.labels) and sub == subsample(split, 7, seed=5)
    assert subsample(split, None, 0) is split and subsample(split, 1000, 0) is split
    with pytest.raises(ValueError, match="eval_fraction must be strictly between 0 and 1"):
        holdout(split, 1.0, 0)
    with pytest.raises(ValueError, match="positive number"):
        subsample(split, 0, 0)


def test_missing_column_names_it_and_lists_found(tmp_path):
    (tmp_path / "a.csv").write_text("sentence,label\nx,1\n")
    with pytest.raises(ValueError, match=r"missing column\(s\) \['text'\]; columns found: \['sentence', 'label'\]"):
        load_text_task(cfg(tmp_path / "a.csv"))
    (tmp_path / "b.jsonl").write_text('{"text": "x", "label": 1}\n{"text": "y"}\n')
    with pytest.raises(ValueError, match=r"b.jsonl, line 2: missing column\(s\) \['label'\]"):
        load_text_task(cfg(tmp_path / "b.jsonl"))


def test_eval_label_outside_train_set(tmp_path):
    (tmp_path / "t.csv").write_text("text,label\na,pos\nb,neg\n")
    (tmp_path / "e.csv").write_text("text,label\nc,pos\nd,mixed\n")
    with pytest.raises(ValueError, match=r"e.csv, line 3: label 'mixed' is not in the label set \['neg', 'pos'\]"):
        load_text_task(cfg(tmp_path / "t.csv", tmp_path / "e.csv"))
    with pytest.raises(ValueError, match=r"line 2: label 'pos' is not in the label set \['good', 'bad'\]"):
        load_text_task(cfg(tmp_path / "t.csv", labels=("good", "bad")))


def test_bad_files(tmp_path):
    with pytest.raises(ValueError, match="data.train_file is required with data.source=files"):
        load_text_task(TextDataConfig(source="files"))
    with pytest.raises(FileNotFoundError, match="nope.csv.*does not exist"):
        load_text_task(cfg(tmp_path / "nope.csv"))
    (tmp_path / "x.parquet").write_text("")
    with pytest.raises(ValueError, match=r"unknown file type; use one of .csv, .tsv, .jsonl"):
        load_text_task(cfg(tmp_path / "x.parquet"))
    (tmp_path / "j.jsonl").write_text('{"text": "a", "label": 0}\nnot json\n')
    with pytest.raises(ValueError, match="j.jsonl, line 2: not valid JSON"):
        load_text_task(cfg(tmp_path / "j.jsonl"))
    (tmp_path / "s.csv").write_text("text,label\nonly-text\n")
    with pytest.raises(ValueError, match="s.csv, line 2: too few fields"):
        load_text_task(cfg(tmp_path / "s.csv"))
    (tmp_path / "r.csv").write_text("text,label\na,high\n")
    with pytest.raises(ValueError, match="label 'high' is not a number"):
        load_text_task(cfg(tmp_path / "r.csv", regression=True))
    with pytest.raises(ValueError, match=r"data.text_columns: expected 1 to 2 values.*one or two columns"):
        load_text_task(cfg(tmp_path / "r.csv", text_columns=("a", "b", "c")))
