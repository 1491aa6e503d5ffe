"""End to end: 2-rank ep_size-2 runs exported and served without DeepSpeed, against `padnet-ds eval`.

The runs use 4 experts, top-2 and eval_capacity_factor 2.0: DeepSpeed's eval capacity is then
ceil(tokens / 4 * 2.0 * 2) = every token, so `padnet-ds eval` drops nothing and its logits can be
compared exactly with the export, which never drops a token.
"""
import csv
import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from padnet_ds.cli import main
from padnet_ds.testing import run_ranks

REPO = Path(__file__).resolve().parents[2]
CHECK = Path(__file__).with_name("check_export.py")
EVAL_ROWS = 47  # odd: one rank's eval shard carries a flagged duplicate
COMMON = ["model.random_init={hidden_size: 32, num_hidden_layers: 2, num_attention_heads: 2, intermediate_size: 64}",
          "model.max_length=32", "moe.num_experts=4", "moe.k=2", "moe.ep_size=2", "moe.eval_capacity_factor=2.0",
          "partition.warmup_steps=6", "partition.interval=2", "partition.steps=2", "optim.lr=5e-3",
          "train.steps=12", "train.micro_batch_size=8", "train.eval_every=0", "train.checkpoint_every=0",
          "train.log_every=6", "train.eval_batch_size=16", "data.source=glue", "data.task=SST-2",
          "data.max_train_examples=256", f"data.max_eval_examples={EVAL_ROWS}"]
RUNS = {"shared": ["moe.mask_scope=shared", "partition.pack=false"],
        "expert": ["moe.mask_scope=expert", "partition.pack=false"],
        "dense": ["model.dense=true", "partition.ratio=1.0"],
        # the training run's own switch to packed storage after its last partition step (step 8 of 12)
        "packed-run": ["moe.mask_scope=shared", "partition.pack=true"]}
PACKED = ("shared", "expert")  # also saved again by a packed model: exported byte for byte alike


def pack_checkpoint(src: str, dst: str) -> None:
    """``src``'s latest checkpoint saved again by a packed model on the same ranks (the engine's own save)."""
    from padnet_ds.comm import barrier, rank
    from padnet_ds.engine.checkpoint import save
    from padnet_ds.engine.checkpoint_reader import read_checkpoint
    from padnet_ds.engine.config import config_from_dict
    from padnet_ds.engine.packing import local_state
    from padnet_ds.engine.run_dir import RunDir
    from padnet_ds.engine.setup import build_engine, load_ds_config
    from padnet_ds.engine.state import LoopState
    from padnet_ds.engine.tasks import build_task
    from padnet_ds.pad.packed import pack_model

    ckpt = read_checkpoint(src)
    cfg = config_from_dict(dict(ckpt.config, output_dir=dst))
    model = build_task(cfg).model
    model.load_state_dict(local_state(model, ckpt), strict=True)
    assert pack_model(model)
    ds = {k: v for k, v in load_ds_config(cfg).items() if k not in ("optimizer", "scheduler")}
    engine = build_engine(model, dict(ds, zero_optimization={"stage": 0}))
    state = LoopState()
    state.load_state_dict(ckpt.loop_state)
    assert save(engine, None, RunDir(dst), state, keep=0) == ckpt.tag
    if rank() == 0:
        (Path(dst) / "config.yaml").write_text(yaml.safe_dump(dict(ckpt.config, output_dir=dst), sort_keys=False))
        shutil.copyfile(Path(src) / "summary.json", Path(dst) / "summary.json")
    barrier()


def make_runs(root: str, glue_dir: str) -> None:
    """Train every variant on the same 2 ranks, pack copies of the PAD ones, `padnet-ds eval --predictions` each."""
    from padnet_ds.engine.config import load_config
    from padnet_ds.engine.trainer import train

    for name, extra in RUNS.items():
        train(load_config("configs/smoke.yaml", [f"output_dir={root}/{name}", f"data.glue_dir={glue_dir}",
                                                 *COMMON, *extra]))
    for name in PACKED:
        pack_checkpoint(f"{root}/{name}", f"{root}/{name}-packed")
    for name in names():
        assert main(["eval", f"{root}/{name}", "--predictions", f"{root}/{name}.predictions.jsonl"]) == 0


def names():
    return [*RUNS, *(f"{n}-packed" for n in PACKED)]


def eval_logits(root: Path, name: str) -> torch.Tensor:
    rows = [json.loads(line) for line in (root / f"{name}.predictions.jsonl").read_text().splitlines()]
    assert [r["index"] for r in rows] == list(range(EVAL_ROWS))
    return torch.tensor([r["logits"] for r in rows])


@pytest.fixture(scope="module")
def runs(tmp_path_factory, shared_dir):
    root = tmp_path_factory.mktemp("export")
    os.chdir(REPO)  # configs/ and ds_configs/ are relative to the repository
    run_ranks(make_runs, 2, str(root), str(shared_dir / "glue"), timeout=900)
    return root


@pytest.fixture(scope="module")
def exports(runs):
    out = {}
    for name in names():
        out[name] = runs / "exports" / name
        assert main(["export", str(runs / name), str(out[name])]) == 0
    return out


@pytest.fixture(scope="module")
def texts(runs):
    from padnet_ds.data.config import TextDataConfig
    from padnet_ds.data.text import load_text_task

    saved = yaml.safe_load((runs / "shared" / "config.yaml").read_text())
    _, _, evals = load_text_task(TextDataConfig.parse(saved["data"]))
    assert len(evals) == EVAL_ROWS
    return {"a": evals.texts_a, "b": evals.texts_b}


def check(mode: str, jobs: dict, cwd: Path) -> dict:
    """check_export.py in a fresh process: ``package`` with padnet-ds on the path, ``remote`` from ``cwd``
    with neither the worktree on sys.path nor padnet_ds / deepspeed importable."""
    (cwd / "jobs.json").write_text(json.dumps(jobs))
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_MODULES_CACHE=str(cwd / "hf_modules"))
    script = CHECK
    if mode == "package":
        env["PYTHONPATH"] = str(REPO)
    else:
        env.pop("PYTHONPATH", None)
        script = Path(shutil.copy(CHECK, cwd / CHECK.name))
    res = subprocess.run([sys.executable, str(script), mode, str(cwd / "jobs.json")], cwd=cwd, env=env,
                         capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-4000:]
    return json.loads(res.stdout.strip().splitlines()[-1])


def test_exports_give_padnet_ds_eval_logits_in_fresh_processes_without_deepspeed(runs, exports, texts, tmp_path):
    jobs = {"texts": texts, "exports": {n: str(p) for n, p in exports.items()}}
    package = check("package", jobs, tmp_path)
    remote = check("remote", jobs, tmp_path)
    assert not any(m.startswith("deepspeed") for m in package["modules"]), package["modules"]
    assert "padnet_ds.export.modeling_padnet" in package["modules"]  # the package's class, not the remote copy
    assert remote["modules"] == []
    for name in names():
        want = eval_logits(runs, name)
        for what, got in [*package[name].items(), *remote[name].items()]:
            diff = (torch.tensor(got) - want).abs().max().item()
            assert diff <= 1e-5, f"{name} via {what}: max |logit - eval logit| = {diff:.2e}"
    # the comparison tells the runs apart
    assert (eval_logits(runs, "shared") - eval_logits(runs, "expert")).abs().max() > 1e-3
    config = json.loads((exports["expert"] / "config.json").read_text())
    assert config["moe"]["mask_scope"] == "expert" and config["auto_map"]
    for spec in config["moe"]["layers"]["bert.encoder.layer.0"].values():
        assert len(set(spec["dynamic"])) > 1, "per-expert masks: each expert keeps its own count"


def test_export_layout_and_sizes(runs, exports):
    from safetensors import safe_open

    summary = json.loads((runs / "shared" / "summary.json").read_text())
    folder = exports["shared"]
    config = json.loads((folder / "config.json").read_text())
    assert config["id2label"] == {"0": "negative", "1": "positive"} and config["model_type"] == "padnet_moe"
    assert {"tokenizer.json", "modeling_padnet.py", "configuration_padnet.py", "README.md"} <= \
        {p.name for p in folder.iterdir()}
    assert (folder / "modeling_padnet.py").read_bytes() == (REPO / "padnet_ds/export/modeling_padnet.py").read_bytes()
    spec = config["moe"]["layers"]["bert.encoder.layer.1"]["fc1"]
    out, inp = spec["shape"]
    with safe_open(str(folder / "model.safetensors"), "pt") as f:
        prefix = "model.bert.encoder.layer.1.output.moe.fc1."
        bits = f.get_tensor(prefix + "mask_bits")
        assert bits.dtype == torch.uint8 and tuple(bits.shape) == (1, math.ceil(out * inp / 8))
        n = f.get_tensor(prefix + "values.0").numel()
        assert n == spec["dynamic"][0] and f.get_tensor(prefix + "static_values").numel() == out * inp - n
        layer = summary["layers"][prefix[6:-5] + ".pad.fc1"]
        assert n / (out * inp) == pytest.approx(layer["dynamic_ratio"])
        assert (spec["lambda_d"], spec["lambda_s"]) == pytest.approx((layer["lambda_d"], layer["lambda_s"]), abs=1e-6)
    from padnet_ds.commit import verify_tag

    manifest = verify_tag(folder)  # committed as checkpoints are: every file listed with its size and sha256
    assert set(manifest["files"]) == {p.name for p in folder.iterdir()} - {"padnet_manifest.json"}
    card = (folder / "README.md").read_text()
    assert f"{summary['eval']['accuracy']:.4f}" in card and "dynamic ratio" in card
    from padnet_ds.engine.checkpoint_reader import read_checkpoint
    from padnet_ds.engine.packing import is_packed_state

    for name in names():  # which checkpoints are packed: the comparison above covers both layouts
        ckpt = read_checkpoint(str(runs / name))
        keys = [*ckpt.replicated, *ckpt.expert_state_dict()]
        assert is_packed_state(keys) == (name.endswith("packed") or name == "packed-run"), name
    assert json.loads((runs / "packed-run" / "summary.json").read_text())["packed"] is True
    packed = json.loads((exports["shared-packed"] / "config.json").read_text())
    assert packed["moe"] == config["moe"], "a packed and an unpacked checkpoint export alike"
    assert (exports["shared-packed"] / "model.safetensors").read_bytes() == (folder / "model.safetensors").read_bytes()
    dense = json.loads((exports["dense"] / "config.json").read_text())
    assert dense["moe"] == {}


def test_predict_classifies_a_file_like_eval(runs, exports, texts, tmp_path, capsys):
    src = tmp_path / "rows.csv"
    with open(src, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["id", "text"])
        w.writerows([i, t] for i, t in enumerate(texts["a"]))
    out = tmp_path / "predictions.tsv"
    assert main(["predict", str(exports["expert"]), str(src), "--output", str(out), "--batch-size", "5",
                 "--compose", "forward"]) == 0
    rows = list(csv.DictReader(open(out), delimiter="\t"))
    probs = eval_logits(runs, "expert").softmax(-1)
    assert [int(r["line"]) for r in rows] == list(range(2, EVAL_ROWS + 2))
    assert [r["label"] for r in rows] == [["negative", "positive"][int(i)] for i in probs.argmax(-1)]
    torch.testing.assert_close(torch.tensor([float(r["score"]) for r in rows]), probs.max(-1).values,
                               rtol=0, atol=1e-5)
    # JSONL in, JSON lines on stdout, composed at load, another batching: the same rows
    src = tmp_path / "rows.jsonl"
    src.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts["a"]))
    capsys.readouterr()
    assert main(["predict", str(exports["expert"]), str(src), "--batch-size", "16"]) == 0
    lines = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [r["line"] for r in lines] == list(range(1, EVAL_ROWS + 1))
    assert [r["label"] for r in lines] == [r["label"] for r in rows]
    torch.testing.assert_close(torch.tensor([r["score"] for r in lines]), probs.max(-1).values, rtol=0, atol=1e-5)


def cli_error(args, capsys) -> str:
    assert main(args) == 2
    return capsys.readouterr().err


def test_bad_input_is_a_clear_error_and_nothing_existing_is_touched(runs, exports, tmp_path, capsys):
    broken = tmp_path / "broken"
    shutil.copytree(runs / "shared", broken)
    tag = (broken / "checkpoints" / "latest").read_text().strip()
    missing = broken / "checkpoints" / tag / "layer_1_expert_2_mp_rank_00_model_states.pt"
    missing.unlink()
    out = tmp_path / "out"
    assert str(missing) in cli_error(["export", str(broken), str(out)], capsys)
    assert not out.exists()

    noconfig = tmp_path / "noconfig"
    shutil.copytree(runs / "shared", noconfig)
    (noconfig / "config.yaml").unlink()
    assert f"{noconfig / 'config.yaml'} does not exist" in cli_error(["export", str(noconfig), str(out)], capsys)

    out.mkdir()
    (out / "keep.txt").write_text("mine")
    err = cli_error(["export", str(runs / "shared"), str(out)], capsys)
    assert "already holds files (keep.txt)" in err and "--overwrite" in err
    assert (out / "keep.txt").read_text() == "mine"

    before = {p.name: p.read_bytes() for p in exports["dense"].iterdir()}
    assert str(missing) in cli_error(["export", str(broken), str(exports["dense"]), "--overwrite"], capsys)
    assert {p.name: p.read_bytes() for p in exports["dense"].iterdir()} == before, "a failed export changed files"
    assert [p.name for p in exports["dense"].parent.iterdir() if p.name.startswith(".")] == []

    assert main(["export", str(runs / "dense"), str(out), "--overwrite"]) == 0
    assert not (out / "keep.txt").exists() and (out / "config.json").is_file()


def test_an_export_that_fails_midway_leaves_no_folder_and_keeps_the_old_one(runs, tmp_path, monkeypatch):
    from padnet_ds.export import writer

    def crash(folder):  # every file is written by now: the failure comes before the commit
        assert (folder / "model.safetensors").is_file()
        raise OSError("disk full")

    monkeypatch.setattr(writer, "export_sizes", crash)
    out = tmp_path / "new"
    with pytest.raises(OSError, match="disk full"):
        writer.export_run(str(runs / "dense"), str(out))
    old = tmp_path / "old"
    old.mkdir()
    (old / "config.json").write_text("{}")
    with pytest.raises(OSError, match="disk full"):
        writer.export_run(str(runs / "dense"), str(old), overwrite=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["old"], "no partial or half-written folder is left"
    assert [p.name for p in old.iterdir()] == ["config.json"] and (old / "config.json").read_text() == "{}"


def test_a_folder_that_is_not_an_export_is_refused_naming_the_file(tmp_path, capsys):
    from padnet_ds.errors import CheckpointError
    from padnet_ds.export import NotAnExportError, PADNetForSequenceClassification
    from padnet_ds.models.pretrained import minilm_path

    assert issubclass(NotAnExportError, CheckpointError)  # an input error: the CLI exits 2
    with pytest.raises(NotAnExportError, match=f"{tmp_path / 'config.json'} does not exist"):
        PADNetForSequenceClassification.from_pretrained(tmp_path)
    bert = minilm_path()
    if bert is None:
        pytest.skip("the MiniLM package is not installed")
    with pytest.raises(NotAnExportError, match=f"{bert / 'config.json'} has model_type 'bert'"):
        PADNetForSequenceClassification.from_pretrained(bert)
    (tmp_path / "rows.csv").write_text("text\nfine\n")
    assert f"{bert / 'config.json'}" in cli_error(["predict", str(bert), str(tmp_path / "rows.csv")], capsys)


def test_bf16_export_and_a_run_whose_summary_predates_label_names(runs, exports, texts, tmp_path):
    from safetensors import safe_open
    from transformers import AutoTokenizer

    from padnet_ds.export import PADNetForSequenceClassification

    old = tmp_path / "old"
    shutil.copytree(runs / "shared", old)
    summary = json.loads((old / "summary.json").read_text())
    del summary["label_names"], summary["is_regression"]  # what runs before export wrote
    (old / "summary.json").write_text(json.dumps(summary))
    out = tmp_path / "bf16"
    assert main(["export", str(old), str(out), "--dtype", "bf16"]) == 0
    config = json.loads((out / "config.json").read_text())
    assert config["id2label"] == {"0": "negative", "1": "positive"}, "labels from the run's data instead"
    assert config["dtype"] == "bfloat16"
    with safe_open(str(out / "model.safetensors"), "pt") as f:
        prefix = "model.bert.encoder.layer.0.output.moe."
        assert f.get_tensor(prefix + "fc1.values.0").dtype == torch.bfloat16
        assert f.get_tensor(prefix + "gate.weight").dtype == torch.float32  # routing stays fp32
        assert f.get_tensor(prefix + "fc1.phi").dtype == torch.float32
    assert (out / "model.safetensors").stat().st_size < 0.6 * (exports["shared"] / "model.safetensors").stat().st_size
    model = PADNetForSequenceClassification.from_pretrained(out)
    assert model.dtype == torch.bfloat16
    enc = AutoTokenizer.from_pretrained(exports["shared"])(texts["a"], truncation=True, max_length=32, padding=True,
                                                          return_tensors="pt")
    with torch.no_grad():
        got = model(**enc).logits.float()
    want = eval_logits(runs, "shared")
    assert (got - want).abs().max() < 0.02 * want.abs().max() + 1e-3  # bf16 rounding, not another model
