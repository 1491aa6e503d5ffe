"""GLUE: the real local files, every other task shape from small TSVs in the real layout, and the
hub code path run offline on local parquet files laid out like the hub's nyu-mll/glue."""
import os
from pathlib import Path

import pytest

from padnet_ds.data import glue
from padnet_ds.data.splits import subsample
from padnet_ds.data.text import TextDataConfig, load_text_task

REPO = Path(__file__).resolve().parents[2]
GLUE_DIR = Path(os.environ.get("PADNET_SHARED", REPO.parent / "shared")) / "glue"
needs_glue = pytest.mark.skipif(not GLUE_DIR.is_dir(), reason=f"real GLUE files not found at {GLUE_DIR} "
                                "(set PADNET_SHARED to the folder holding glue/)")

# HF glue's text columns, written out here (not taken from the code under test).
HF_COLUMNS = {"cola": ("sentence",), "sst2": ("sentence",), "mrpc": ("sentence1", "sentence2"),
              "stsb": ("sentence1", "sentence2"), "qqp": ("question1", "question2"),
              "mnli": ("premise", "hypothesis"), "qnli": ("question", "sentence"),
              "rte": ("sentence1", "sentence2"), "wnli": ("sentence1", "sentence2")}


def load_local(task, glue_dir=GLUE_DIR, **kw):
    return load_text_task(TextDataConfig(source="glue", task=task, glue_dir=str(glue_dir), **kw))


def write_tsv(path: Path, lines):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join("\t".join(r) + "\n" for r in lines), encoding="utf-8")


# ---- the real files --------------------------------------------------------------------------

@needs_glue
@pytest.mark.parametrize("task,n_train,n_dev,pos_train,pair,metrics", [
    ("SST-2", 67349, 872, 37569, False, ("accuracy",)),
    ("cola", 8551, 1043, 6023, False, ("mcc",)),
    ("MRPC", 3668, 408, 2474, True, ("f1", "accuracy")),
    ("wnli", 635, 71, 312, True, ("accuracy",)),
])
def test_real_glue_counts_labels_metric(task, n_train, n_dev, pos_train, pair, metrics):
    spec, train, dev = load_local(task)
    assert (len(train), len(dev)) == (n_train, n_dev)
    assert sum(train.labels) == pos_train  # label balance as HF's glue reports it
    assert set(train.labels) == set(dev.labels) == {0, 1}
    assert (train.texts_b is not None) == pair and (dev.texts_b is not None) == pair
    assert spec.metrics == metrics and spec.main_metric == metrics[0] and spec.num_labels == 2
    assert all(t.strip() for t in train.texts_a)


@needs_glue
def test_cola_has_no_header_and_reads_the_sentence_column():
    _, train, _ = load_local("cola")
    # The first line of the file is data (gj04, 1, "", sentence), not a header.
    assert train.texts_a[0] == "Our friends won't buy this analysis, let alone the next one we propose."
    assert train.labels[0] == 1


@needs_glue
def test_mrpc_bom_stripped_and_pairs_in_order():
    assert (GLUE_DIR / "MRPC" / "train.tsv").read_bytes().startswith(b"\xef\xbb\xbf")
    _, train, _ = load_local("mrpc")  # would fail on a missing "Quality" column if the BOM stayed
    assert train.texts_a[0].startswith("Amrozi accused his brother")
    assert train.texts_b[0].startswith("Referring to him as only")
    assert train.labels[:2] == [1, 0]


@needs_glue
def test_row_limits_are_seeded_subsets():
    _, full, _ = load_local("sst2")
    _, a, d = load_local("sst2", max_train_examples=100, max_eval_examples=10, seed=3)
    _, b, _ = load_local("sst2", max_train_examples=100, seed=3)
    _, c, _ = load_local("sst2", max_train_examples=100, seed=4)
    assert len(a) == 100 and len(d) == 10 and a == b and a != c
    assert a == subsample(full, 100, seed=3)  # the engine's limit is the plain seeded subsample
    assert set(zip(a.texts_a, a.labels)) <= set(zip(full.texts_a, full.labels))


# ---- the other task shapes, from TSVs in the real layout -------------------------------------

def write_other_tasks(root: Path):
    write_tsv(root / "STS-B" / "train.tsv", [
        ["index", "genre", "filename", "year", "old_index", "source1", "source2", "sentence1", "sentence2", "score"],
        ["0", "main-captions", "MSRvid", "2012test", "0001", "none", "none", "A plane is taking off.", "An air plane is taking off.", "5.000"],
        ["1", "main-captions", "MSRvid", "2012test", "0004", "none", "none", 'A man said "hi.', "A man is playing a flute.", "0.500"],
    ])
    write_tsv(root / "STS-B" / "dev.tsv", [
        ["index", "genre", "filename", "year", "old_index", "source1", "source2", "sentence1", "sentence2", "score"],
        ["0", "main-captions", "MSRvid", "2012test", "0000", "none", "none", "A man with a hard hat is dancing.", "A man wearing a hard hat is dancing.", "5.000"],
    ])
    mnli = ["index", "promptID", "pairID", "genre", "sentence1_binary_parse", "sentence2_binary_parse",
            "sentence1_parse", "sentence2_parse", "sentence1", "sentence2"]
    write_tsv(root / "MNLI" / "train.tsv", [
        mnli + ["label1", "gold_label"],
        ["0", "31193", "31193n", "government", "(", "(", "(", "(", "Conceptually cream skimming has two basic dimensions.", "Product and geography are what make cream skimming work.", "neutral", "neutral"],
        ["1", "101457", "101457e", "telephone", "(", "(", "(", "(", "you know during the season", "You lose the things.", "entailment", "entailment"],
        ["2", "134793", "134793e", "fiction", "(", "(", "(", "(", "One of our number will carry out your instructions.", "We have no one free.", "contradiction", "contradiction"],
    ])
    write_tsv(root / "MNLI" / "dev_matched.tsv", [
        mnli + ["label1", "label2", "label3", "label4", "label5", "gold_label"],
        ["0", "63735", "63735n", "slate", "(", "(", "(", "(", "The new rights are nice enough", "Everyone really likes the newest benefits", "neutral", "entailment", "neutral", "neutral", "neutral", "neutral"],
    ])
    write_tsv(root / "QNLI" / "train.tsv", [
        ["index", "question", "sentence", "label"],
        ["0", "When did the third Digimon series begin?", "Unlike the two seasons before it, ...", "not_entailment"],
        ["1", "Which missile batteries often have individual launchers?", "When MANPADS is operated by specialists, ...", "entailment"],
    ])
    write_tsv(root / "QNLI" / "dev.tsv", [["index", "question", "sentence", "label"], ["0", "q?", "s.", "entailment"]])
    write_tsv(root / "RTE" / "train.tsv", [
        ["index", "sentence1", "sentence2", "label"],
        ["0", "No Weapons of Mass Destruction Found in Iraq Yet.", "Weapons of Mass Destruction Found in Iraq.", "not_entailment"],
    ])
    write_tsv(root / "RTE" / "dev.tsv", [["index", "sentence1", "sentence2", "label"], ["0", "a", "b", "entailment"]])
    write_tsv(root / "QQP" / "train.tsv", [
        ["id", "qid1", "qid2", "question1", "question2", "is_duplicate"],
        ["133273", "213221", "213222", "How is the life of a math student?", "Which level of prepration is enough?", "0"],
        ["402555", "536040", "536041", "How do I control my horny emotions?", "How do you control your horniness?", "1"],
    ])
    write_tsv(root / "QQP" / "dev.tsv", [["id", "qid1", "qid2", "question1", "question2", "is_duplicate"], ["1", "2", "3", "a?", "b?", "1"]])


def test_stsb_is_regression_with_float_labels(tmp_path):
    write_other_tasks(tmp_path)
    spec, train, dev = load_local("STS-B", tmp_path)
    assert spec.is_regression and spec.num_labels == 1 and spec.label_names == ()
    assert spec.metrics == ("pearson", "spearman") and spec.main_metric == "pearson"
    assert train.labels == [5.0, 0.5] and all(isinstance(y, float) for y in train.labels)
    assert train.texts_a[1] == 'A man said "hi.'  # a stray quote does not swallow the line
    assert dev.texts_b == ["A man wearing a hard hat is dancing."]


def test_mnli_uses_gold_label_and_dev_matched_with_hf_ids(tmp_path):
    write_other_tasks(tmp_path)
    spec, train, dev = load_local("mnli", tmp_path)
    assert spec.label_names == ("entailment", "neutral", "contradiction") and spec.num_labels == 3
    assert train.labels == [1, 0, 2] and dev.labels == [1]
    assert train.texts_a[0].startswith("Conceptually") and train.texts_b[0].startswith("Product")


@pytest.mark.parametrize("task,labels,metrics,main", [
    ("qnli", [1, 0], ("accuracy",), "accuracy"),
    ("rte", [1], ("accuracy",), "accuracy"),
    ("qqp", [0, 1], ("f1", "accuracy"), "accuracy"),
])
def test_other_pair_tasks(tmp_path, task, labels, metrics, main):
    write_other_tasks(tmp_path)
    spec, train, dev = load_local(task, tmp_path)
    assert train.labels == labels and train.texts_b is not None and len(dev) == 1
    assert spec.metrics == metrics and spec.main_metric == main


def test_task_names_any_spelling():
    assert glue.task("SST-2").name == "sst2" and glue.task("sts_b").name == "stsb"
    assert glue.task("MNLI").dev_file == "dev_matched.tsv"
    assert set(glue.TASKS) == set(HF_COLUMNS)


# ---- bad input -------------------------------------------------------------------------------

def test_unknown_task_and_source():
    with pytest.raises(ValueError, match=r"data.task='sst3' is not a GLUE task.*cola.*wnli"):
        load_text_task(TextDataConfig(task="sst3", glue_dir="/nowhere"))
    with pytest.raises(ValueError, match=r"data.source='imdb' is not one of glue, files, rotten_tomatoes"):
        load_text_task(TextDataConfig(source="imdb"))


def test_missing_glue_dir_names_path_and_layout(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"no_glue.*does not exist.*<TASK>/train.tsv"):
        load_local("sst2", tmp_path / "no_glue")


def test_missing_task_file_names_path_and_layout(tmp_path):
    write_other_tasks(tmp_path)
    with pytest.raises(FileNotFoundError, match=r"SST-2/train.tsv.*missing.*glue_data layout"):
        load_local("sst2", tmp_path)
    (tmp_path / "MNLI" / "dev_matched.tsv").unlink()
    with pytest.raises(FileNotFoundError, match=r"dev_matched.tsv"):
        load_local("mnli", tmp_path)


def test_missing_column_lists_found_columns(tmp_path):
    write_tsv(tmp_path / "SST-2" / "train.tsv", [["text", "label"], ["good", "1"]])
    write_tsv(tmp_path / "SST-2" / "dev.tsv", [["sentence", "label"], ["fine", "1"]])
    with pytest.raises(ValueError, match=r"missing column\(s\) \['sentence'\].*columns found: \['text', 'label'\]"):
        load_local("sst2", tmp_path)


def test_bad_labels_name_label_line_and_allowed_set(tmp_path):
    write_tsv(tmp_path / "SST-2" / "train.tsv", [["sentence", "label"], ["good", "1"], ["odd", "2"]])
    write_tsv(tmp_path / "SST-2" / "dev.tsv", [["sentence", "label"], ["fine", "1"]])
    with pytest.raises(ValueError, match=r"train.tsv, line 3: label '2' is not a sst2 label; allowed: \['0', '1'\]"):
        load_local("sst2", tmp_path)
    write_other_tasks(tmp_path)
    write_tsv(tmp_path / "RTE" / "dev.tsv", [["index", "sentence1", "sentence2", "label"], ["0", "a", "b", "neutral"]])
    with pytest.raises(ValueError, match=r"line 2: label 'neutral'.*\['entailment', 'not_entailment'\]"):
        load_local("rte", tmp_path)
    write_tsv(tmp_path / "STS-B" / "dev.tsv", [["sentence1", "sentence2", "score"], ["a", "b", "high"]])
    with pytest.raises(ValueError, match=r"stsb score 'high' is not a number"):
        load_local("stsb", tmp_path)


def test_short_row_is_reported(tmp_path):
    write_tsv(tmp_path / "CoLA" / "train.tsv", [["gj04", "1", "", "Fine."], ["gj04", "1 A broken line."]])
    write_tsv(tmp_path / "CoLA" / "dev.tsv", [["gj04", "1", "", "Fine."]])
    with pytest.raises(ValueError, match=r"line 2: 2 tab-separated fields, expected at least 4"):
        load_local("cola", tmp_path)


# ---- the hub path, offline -------------------------------------------------------------------

HUB_SPLITS = {"sst2": ("train", "validation"), "mrpc": ("train", "validation"),
              "stsb": ("train", "validation"), "mnli": ("train", "validation_matched")}


@pytest.fixture
def offline_datasets(tmp_path, monkeypatch):
    """datasets with the network off and its cache under tmp_path (it reads both at import)."""
    datasets = pytest.importorskip("datasets")
    import huggingface_hub.constants as hub_constants

    for var in ("HF_DATASETS_OFFLINE", "HF_HUB_OFFLINE"):
        monkeypatch.setenv(var, "1")
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(datasets.config, "HF_DATASETS_OFFLINE", True)
    monkeypatch.setattr(hub_constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "hf_cache")
    return datasets


def write_hub_folder(datasets, root: Path, tables: dict):
    """A local folder laid out like the hub repo nyu-mll/glue: <task>/<split>-*.parquet plus the
    README's `configs:` block, so load_dataset(root, task) resolves exactly as on the hub."""
    yaml = ["---", "configs:"]
    for task, splits in tables.items():
        yaml += [f"- config_name: {task}", "  data_files:"]
        for split, (columns, features) in splits.items():
            (root / task).mkdir(parents=True, exist_ok=True)
            datasets.Dataset.from_dict(columns, features=datasets.Features(features)).to_parquet(
                str(root / task / f"{split}-00000-of-00001.parquet"))
            yaml += [f"  - split: {split}", f"    path: {task}/{split}-*"]
    (root / "README.md").write_text("\n".join(yaml + ["---", ""]))


def hub_table(datasets, spec, split_rows):
    """HF column layout (names, ClassLabel ids or float scores, idx) from a TextSplit."""
    Value, names = datasets.Value, HF_COLUMNS[spec.name]
    label = Value("float32") if spec.is_regression else datasets.ClassLabel(names=list(spec.label_names))
    columns = {names[0]: split_rows.texts_a}
    if split_rows.texts_b is not None:
        columns[names[1]] = split_rows.texts_b
    columns |= {"label": split_rows.labels, "idx": list(range(len(split_rows)))}
    features = {c: Value("string") for c in names} | {"label": label, "idx": Value("int32")}
    return columns, features


def test_hub_path_matches_local_tsv(tmp_path, offline_datasets):
    """Real rows (the shared GLUE files, or the tmp TSVs) through load_dataset give what the TSV reader gives."""
    sources = {"stsb": tmp_path / "tsv", "mnli": tmp_path / "tsv"}
    write_other_tasks(tmp_path / "tsv")
    if GLUE_DIR.is_dir():
        sources |= {"sst2": GLUE_DIR, "mrpc": GLUE_DIR}
    expected, tables = {}, {}
    for name, src in sources.items():
        expected[name] = spec, train, dev = load_text_task(TextDataConfig(
            task=name, glue_dir=str(src), max_train_examples=40, max_eval_examples=20))
        tables[name] = dict(zip(HUB_SPLITS[name], (hub_table(offline_datasets, spec, s) for s in (train, dev))))
    write_hub_folder(offline_datasets, tmp_path / "hub", tables)

    for name, (spec, train, dev) in expected.items():
        got = load_text_task(TextDataConfig(task=name, hub_path=str(tmp_path / "hub")))  # glue_dir=None: hub
        assert got == (spec, train, dev), name
        if spec.is_regression:
            assert all(isinstance(y, float) for y in got[1].labels + got[2].labels)


def test_hub_missing_column_and_unreachable(tmp_path, offline_datasets):
    feats = {"text": offline_datasets.Value("string"), "label": offline_datasets.Value("int64")}
    write_hub_folder(offline_datasets, tmp_path / "hub", {"sst2": {
        "train": ({"text": ["a"], "label": [0]}, feats), "validation": ({"text": ["b"], "label": [1]}, feats)}})
    with pytest.raises(ValueError,
                       match=r"sst2/train: missing column\(s\) \['sentence'\]; columns found: \['text', 'label'\]"):
        glue.load("sst2", hub_path=str(tmp_path / "hub"))
    with pytest.raises(RuntimeError, match=r"could not load GLUE cola.*glue_dir"):
        glue.load("cola", hub_path=str(tmp_path / "hub"))
