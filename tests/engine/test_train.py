"""End to end: `padnet-ds train` on 2 real ranks, TensorBoard read back, resume, eval, inspect."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from padnet_ds.comm import free_port
from padnet_ds.testing import deepspeed_shm_files, run_ranks

REPO = Path(__file__).resolve().parents[2]
TINY = ["model.name=minilm", "model.random_init={hidden_size: 32, num_hidden_layers: 2, num_attention_heads: 2, "
        "intermediate_size: 64}", "model.max_length=32", "moe.num_experts=4", "moe.ep_size=2",
        "moe.top2_2nd_expert_sampling=false", "partition.ratio=0.5", "partition.warmup_steps=4",
        "partition.interval=2", "partition.steps=2", "optim.lr=2e-3", "train.micro_batch_size=8",
        "train.log_every=1", "train.eval_batch_size=32", "ds_config=ds_configs/zero2_fp32.json"]


def glue(shared_dir, task="SST-2", rows=256):
    return ["data.source=glue", f"data.task={task}", f"data.glue_dir={shared_dir / 'glue'}",
            f"data.max_train_examples={rows}", "data.max_eval_examples=64"]


def launch(args, port, timeout=420):
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    cmd = [str(Path(sys.executable).parent / "deepspeed"), "--num_accelerators", "2", "--master_port", str(port),
           "--module", "padnet_ds.cli", *args]
    return subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)


def read_events(logdir):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(logdir), size_guidance={"scalars": 0, "images": 0})
    acc.Reload()
    return acc


def test_deepspeed_launcher_run_writes_summary_tensorboard_and_a_checkpoint_inspect_and_eval_read(
        tmp_path, shared_dir):
    out, port, rows = tmp_path / "run", free_port(), 63  # an odd count: one rank's shard gets a flagged duplicate
    res = launch(["train", "configs/smoke.yaml", f"output_dir={out}", *TINY, *glue(shared_dir),
                  f"data.max_eval_examples={rows}", "train.steps=12", "train.eval_every=6",
                  "train.checkpoint_every=6"], port)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-5000:]
    assert f"tensorboard --logdir {out}/tensorboard" in res.stdout
    summary = json.loads((out / "summary.json").read_text())
    assert set(summary["eval"]) == {"accuracy"}
    correct = summary["eval"]["accuracy"] * rows
    assert correct == pytest.approx(round(correct), abs=1e-9), "every eval row counted exactly once"
    assert summary["steps"] == 12 and summary["world_size"] == 2
    assert summary["dynamic_ratio"] == pytest.approx(0.5, abs=0.01)
    assert len(summary["partition_log"]) == 2
    assert summary["packed"] is True  # partition.pack: auto, after the last partition step (step 8)
    for what in ("model_state_bytes", "checkpoint_bytes"):
        assert 0 < summary[what]["packed"] < summary[what]["unpacked"], what
    for entry in summary["partition_log"]:
        assert len(entry["mask_digests"]) == 2 and entry["mask_digests"][0] == entry["mask_digests"][1]
    layers = summary["layers"]
    assert len(layers) == 4 and all({"lambda_d", "lambda_s", "dynamic_ratio"} <= set(v) for v in layers.values())

    events = read_events(out / "tensorboard")
    tags = events.Tags()
    scalars = set(tags["scalars"])
    evals = {e.step: e.value for e in events.Scalars("eval/accuracy")}  # the eval at step 6 and the final one
    assert sorted(evals) == [6, 12] and summary["eval"]["accuracy"] == pytest.approx(evals[12], abs=1e-6)
    best = max(evals, key=lambda s: (evals[s], -s))
    assert summary["best_eval"]["step"] == best and summary["best_eval"]["accuracy"] == pytest.approx(evals[best])
    assert [e.step for e in events.Scalars("train/loss")] == list(range(1, 13))
    for tag in ("train/loss", "train/lr", "train/l_aux", "eval/accuracy", "perf/tokens_per_s"):
        assert tag in scalars, tag
    unit = "bert.encoder.layer.0.output.moe.pad.fc1"
    for what in ("lambda_s", "lambda_d", "dynamic_ratio"):
        assert f"pad/{unit}/{what}" in scalars
    assert any(t.startswith("moe/bert.encoder.layer.1.output.moe/expert_3_load") for t in scalars)
    assert "moe/expert_load_heatmap" in tags["images"]
    assert deepspeed_shm_files(port) == [], "the run left DeepSpeed shared-memory buffers in /dev/shm"

    info = subprocess.run([sys.executable, "-m", "padnet_ds.cli", "inspect", str(out), "--json"], cwd=REPO,
                          capture_output=True, text=True, timeout=120)
    assert info.returncode == 0, info.stderr[-3000:]
    report = json.loads(info.stdout)
    assert report["ep_size"] == 2 and report["num_experts"] == 4 and len(report["moe_layers"]) == 2
    assert report["dynamic_ratio"] == pytest.approx(summary["dynamic_ratio"], abs=1e-6)
    assert report["packed"] is True and all(u["packed"] for u in report["units"])
    assert report["checkpoint_bytes"] == summary["checkpoint_bytes"]  # the same final checkpoint, read offline
    assert report["model_state_bytes"] == summary["model_state_bytes"]
    for u in report["units"]:  # 4 experts, r: PAD stores (1-r)P + 4rP of the fully dynamic 4P
        p = u["params_fully_dynamic"] / 4
        assert u["params_pad"] == pytest.approx((1 - u["dynamic_ratio"]) * p + 4 * u["dynamic_ratio"] * p)

    # one process evaluates the 2-rank checkpoint: experts are stored one file per global expert
    ev = subprocess.run([sys.executable, "-m", "padnet_ds.cli", "eval", str(out)], cwd=REPO, capture_output=True,
                        text=True, timeout=180, env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert ev.returncode == 0, ev.stderr[-3000:]
    metrics = json.loads(ev.stdout[ev.stdout.index("{"):])
    assert metrics["accuracy"] == pytest.approx(summary["eval"]["accuracy"], abs=1e-9) and metrics["rows"] == rows

    from padnet_ds.engine.checkpoint_reader import read_checkpoint

    ckpt = read_checkpoint(str(out))  # the offline reader: replicated state + {layer: {global expert: state}}
    assert ckpt.tag == "step12" and ckpt.loop_state["step"] == 12
    assert ckpt.loop_state["history"] == summary["history"]
    assert sorted(ckpt.experts) == [f"bert.encoder.layer.{i}.output.moe" for i in range(2)]
    assert all(sorted(by_id) == [0, 1, 2, 3] for by_id in ckpt.experts.values())
    assert not any(".deepspeed_experts." in k for k in ckpt.replicated)
    files = {k: t for f in ckpt.tag_dir.glob("layer_*_expert_*_model_states.pt")
             for k, t in torch.load(f, map_location="cpu", weights_only=False).items()}
    merged = ckpt.expert_state_dict()  # back under DeepSpeed's key names, every global expert
    assert set(merged) == set(files) and all(torch.equal(merged[k], files[k]) for k in files)


def train_in_ranks(args):
    from padnet_ds.engine.config import load_config
    from padnet_ds.engine.trainer import train

    summary = train(load_config("configs/smoke.yaml", args))
    return {k: summary[k] for k in ("history", "partition_log", "dynamic_ratio", "layers", "steps", "eval")}


def test_resume_from_a_checkpoint_reproduces_the_uninterrupted_run(tmp_path, shared_dir):
    common = [*TINY, *glue(shared_dir, "MRPC", 384), "train.steps=12", "train.checkpoint_every=0",
              "train.eval_every=0", "train.grad_accum=2"]
    full, _ = run_ranks(train_in_ranks, 2, [f"output_dir={tmp_path}/full", *common])
    first, _ = run_ranks(train_in_ranks, 2, [f"output_dir={tmp_path}/cut", *common, "train.stop_at=5"])
    assert first["steps"] == 5 and len(first["partition_log"]) == 0
    resumed, _ = run_ranks(train_in_ranks, 2, [f"output_dir={tmp_path}/cut", *common, "resume=true"])
    losses = {h["step"]: h["loss"] for h in full["history"]}
    got = {h["step"]: h["loss"] for h in resumed["history"]}
    assert sorted(got) == list(range(1, 13))
    torch.testing.assert_close([got[s] for s in range(1, 13)], [losses[s] for s in range(1, 13)],
                               rtol=1e-6, atol=1e-7)
    assert [e["mask_digests"] for e in resumed["partition_log"]] == [e["mask_digests"] for e in full["partition_log"]]
    assert resumed["eval"] == pytest.approx(full["eval"])
