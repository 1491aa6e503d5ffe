"""Faults on real ranks: a job killed mid-save, damaged and crafted checkpoint files.

The reference is one uninterrupted 2-rank run (module fixture); every faulty run is compared
with it. Runs that must be killed are real ``padnet-ds`` processes (two ranks started the way
torchrun starts them); the rest run on the module's rank pool.
"""
from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from padnet_ds.comm import free_port
from padnet_ds.commit import LATEST, complete_tags, read_manifest
from padnet_ds.errors import CheckpointError
from tests.checkpoints import resign

REPO = Path(__file__).resolve().parents[2]
STEPS = 6
RUN = ["model.random_init={hidden_size: 32, num_hidden_layers: 2, num_attention_heads: 2, intermediate_size: 64}",
       "model.max_length=32", "moe.num_experts=4", "moe.ep_size=2", "partition.ratio=0.5",
       "partition.warmup_steps=2", "partition.interval=1", "partition.steps=2", "train.micro_batch_size=8",
       "train.log_every=1", "train.eval_every=0", "train.checkpoint_every=2", "train.keep_checkpoints=2",
       f"train.steps={STEPS}", "data.max_train_examples=192", "data.max_eval_examples=32",
       "ds_config=ds_configs/zero2_fp32.json"]


def train_in_ranks(args, record_loads=False):
    from padnet_ds.engine.checkpoint_engine import SafeCheckpointEngine
    from padnet_ds.engine.config import load_config
    from padnet_ds.engine.trainer import train

    loaded = []
    if record_loads:  # which files DeepSpeed reads, all through the safe engine
        load = SafeCheckpointEngine.load
        SafeCheckpointEngine.load = lambda self, path, map_location=None: (
            loaded.append(Path(path).name), load(self, path, map_location))[1]
    try:
        summary = train(load_config("configs/smoke.yaml", args))
    finally:
        if record_loads:
            SafeCheckpointEngine.load = load
    history = [(h["step"], h["loss"], h["l_aux"]) for h in summary["history"]]  # not the timings
    return {"history": history, "partition_log": summary["partition_log"], "loaded": loaded}


@pytest.fixture(scope="module")
def reference(pool, tmp_path_factory):
    out = tmp_path_factory.mktemp("faults") / "reference"
    first, _ = pool.run(train_in_ranks, [f"output_dir={out}", *RUN])
    return out, first


def spawn_ranks(args, log_dir: Path, env_extra: dict, world: int = 2):
    """``padnet-ds`` ranks started as torchrun starts them, through the test-only stall wrapper."""
    port, procs = free_port(), []
    for r in range(world):
        env = dict(os.environ, RANK=str(r), WORLD_SIZE=str(world), LOCAL_RANK=str(r), MASTER_ADDR="127.0.0.1",
                   MASTER_PORT=str(port), OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1", **env_extra)
        with open(log_dir / f"rank{r}.log", "w") as log:
            procs.append(subprocess.Popen([sys.executable, "-m", "tests.engine.stall_save", *args], cwd=REPO,
                                          env=env, stdout=log, stderr=subprocess.STDOUT))
    return procs


def loads(path: Path) -> bool:
    from padnet_ds.files import safe_load

    try:
        safe_load(path)
    except CheckpointError:
        return False
    return True


def wait_for(condition, procs, logs: Path, timeout=420.0):
    deadline = time.monotonic() + timeout
    while not condition():
        dead = [p.returncode for p in procs if p.poll() is not None]
        if dead or time.monotonic() > deadline:
            for p in procs:
                p.kill()
            text = "\n".join(f.read_text()[-3000:] for f in sorted(logs.glob("rank*.log")))
            pytest.fail(f"ranks exited ({dead}) or timed out before the stall was reached:\n{text}")
        time.sleep(0.2)


def test_a_kill_during_a_save_resumes_from_the_last_complete_checkpoint_exactly(pool, reference, tmp_path):
    ref_out, ref = reference
    out, marker = tmp_path / "run", tmp_path / "rank1-stalled"
    staging = out / "checkpoints" / "step4.partial"
    procs = spawn_ranks(["train", "configs/smoke.yaml", f"output_dir={out}", *RUN], tmp_path,
                        {"PADNET_TEST_STALL": f"1:step4:{marker}"})
    # rank 1 stalls before its optimizer shard of step4; rank 0 has written all of its files (its
    # shard is its last, and a torch file loads only once complete) and waits in DeepSpeed's barrier
    wait_for(lambda: marker.exists() and loads(staging / "zero_pp_rank_0_mp_rank_00_optim_states.pt"), procs,
             tmp_path)
    for p in procs:
        p.send_signal(signal.SIGKILL)
        p.wait(timeout=30)
    ckpt = out / "checkpoints"
    assert complete_tags(ckpt) == ["step2"] and (ckpt / LATEST).read_text() == "step2"
    assert not (ckpt / "step4").exists() and (staging / "mp_rank_00_model_states.pt").is_file()

    from padnet_ds.engine.eval_checkpoint import evaluate_run

    evals = pool.run(evaluate_run, str(out))
    assert [e["checkpoint"] for e in evals] == [str(ckpt / "step2")] * 2

    ds_files = {n for n in read_manifest(ckpt / "step2")["files"] if not n.startswith("padnet_")}
    resumed = pool.run(train_in_ranks, [f"output_dir={out}", *RUN, "resume=true"], True)
    for r in range(2):  # fp32 on the same ranks: bit for bit, losses and partition steps (mask digests)
        assert resumed[r]["history"] == ref["history"], f"rank {r}"
        assert resumed[r]["partition_log"] == ref["partition_log"]
    assert set(resumed[0]["loaded"]) | set(resumed[1]["loaded"]) == ds_files, "a DeepSpeed file bypassed safe_load"
    assert complete_tags(ckpt) == ["step4", "step6"] and not staging.exists()

    from tensorboard.backend.event_processing.event_file_loader import EventFileLoader

    from tests.engine.test_train import read_events

    files = sorted((out / "tensorboard").glob("events.out.tfevents.*"))
    assert len(files) == 2, files  # the killed run's and the resumed run's
    starts = [(e.step, e.session_log.status) for e in EventFileLoader(str(files[1])).Load()
              if e.HasField("session_log")]
    assert starts == [(3, 1)], "the resumed run's events must begin with a purge of steps >= 3 (SessionLog.START)"
    killed = [e.step for e in EventFileLoader(str(files[0])).Load()
              if any(v.tag == "train/loss" for v in e.summary.value)]
    assert killed == [1, 2, 3, 4], "the killed run logged steps 3-4, which the resumed run replays"
    events = read_events(out / "tensorboard").Scalars("train/loss")
    assert [e.step for e in events] == list(range(1, STEPS + 1))
    assert [e.value for e in events] == [float(torch.tensor(loss, dtype=torch.float32))
                                         for _, loss, _ in ref["history"]]


def resume_tag_in_ranks(out):
    from padnet_ds.engine.checkpoint import resume_tag
    from padnet_ds.engine.run_dir import RunDir

    try:
        return resume_tag(RunDir(out))
    except CheckpointError as err:
        return f"error: {err}"


def test_random_bytes_in_any_file_of_a_checkpoint_fall_back_to_the_older_one_or_fail_naming_it(
        pool, reference, tmp_path):
    ref_out, _ = reference
    out = tmp_path / "run"
    shutil.copytree(ref_out, out)
    newest, older = out / "checkpoints" / "step6", out / "checkpoints" / "step4"
    names = sorted(read_manifest(newest)["files"])
    kinds = {n.split("_rank")[0].split("_expert")[0] for n in names}
    assert {"mp", "layer_0", "layer_1", "zero_pp", "padnet_rng", "padnet_partition"} <= kinds, names
    for name in names:  # every file: a rank's share, another rank's share, DeepSpeed's and ours
        data = (newest / name).read_bytes()
        (newest / name).write_bytes(os.urandom(len(data)))
        assert pool.run(resume_tag_in_ranks, str(out)) == ["step4", "step4"], name
        (older / name).write_bytes(os.urandom(len((older / name).read_bytes())))
        got = pool.run(resume_tag_in_ranks, str(out))
        assert all(g.startswith("error: no checkpoint in") and "step6" in g and "step4" in g for g in got), got
        assert any(f"step6/{name} does not match the sha256" in g for g in got), (name, got)
        shutil.copy2(ref_out / "checkpoints" / "step4" / name, older / name)
        (newest / name).write_bytes(data)
    assert pool.run(resume_tag_in_ranks, str(out)) == ["step6", "step6"]


def forge(tag_dir: Path, name: str, marker: Path) -> None:
    """``name`` replaced by a torch file whose pickle opens ``marker`` when unpickled, and the manifest
    rewritten to match, as a folder from someone else would be."""
    from tests.test_files import crafted

    crafted(tag_dir / name, marker, inside_torch_file=True)
    resign(tag_dir, name)


def resume_refused(args):
    from padnet_ds.engine.config import load_config
    from padnet_ds.engine.trainer import Trainer

    try:
        Trainer(load_config("configs/smoke.yaml", args)).begin()
    except CheckpointError as err:
        return str(err)
    return "no error"


def test_a_crafted_pickle_with_a_forged_manifest_is_refused_on_resume_and_in_inspect(pool, reference, tmp_path):
    ref_out, _ = reference
    out, marker = tmp_path / "run", tmp_path / "payload-ran"
    shutil.copytree(ref_out, out)
    tag = out / "checkpoints" / "step6"
    forge(tag, "mp_rank_00_model_states.pt", marker)  # read by every rank, through DeepSpeed's loader
    got = pool.run(resume_refused, [f"output_dir={out}", *RUN, "resume=true"])
    assert all(f"checkpoint file {tag}/mp_rank_00_model_states.pt holds pickled content" in g for g in got), got
    out = tmp_path / "other"
    shutil.copytree(ref_out, out)
    tag = out / "checkpoints" / "step6"
    forge(tag, "layer_1_expert_2_mp_rank_00_model_states.pt", marker)  # read by the offline reader

    from padnet_ds.engine.inspect import inspect_checkpoint

    with pytest.raises(CheckpointError, match=f"{tag}/layer_1_expert_2_mp_rank_00_model_states.pt holds pickled"):
        inspect_checkpoint(str(out))
    assert not marker.exists(), "the crafted payload ran"


def deepspeed_cmd(port, *args):
    return [str(Path(sys.executable).parent / "deepspeed"), "--num_accelerators", "2", "--master_port", str(port),
            "--module", "padnet_ds.cli", *args]


@pytest.mark.slow
def test_sigkill_of_one_rank_under_the_deepspeed_launcher_ends_the_job_cleanly_and_the_folder_resumes(tmp_path):
    import psutil

    from padnet_ds.testing import deepspeed_shm_files

    out, port, log = tmp_path / "run", free_port(), tmp_path / "launcher.log"
    train = ["train", "configs/smoke.yaml", f"output_dir={out}", *RUN, "train.steps=400"]
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    with open(log, "w") as f:
        launcher = subprocess.Popen(deepspeed_cmd(port, *train), cwd=REPO, env=env, stdout=f, stderr=subprocess.STDOUT)
    wait_for(lambda: len(complete_tags(out / "checkpoints")) >= 2, [launcher], tmp_path, timeout=600)
    tree = psutil.Process(launcher.pid).children(recursive=True)
    rank1 = [p for p in tree if "--local_rank=1" in " ".join(p.cmdline())]
    assert len(rank1) == 1, [p.cmdline() for p in tree]
    rank1[0].send_signal(signal.SIGKILL)
    t0 = time.monotonic()
    rc = launcher.wait(timeout=120)
    assert rc != 0 and time.monotonic() - t0 < 30, (rc, log.read_text()[-3000:])
    alive = [p for p in tree if p.is_running() and p.status() != psutil.STATUS_ZOMBIE]
    assert alive == [], f"processes of the job left running: {[p.cmdline() for p in alive]}"
    assert deepspeed_shm_files(port) == []
    last = complete_tags(out / "checkpoints")[-1]

    port = free_port()
    res = subprocess.run(deepspeed_cmd(port, *train, "resume=true", f"train.stop_at={int(last[4:]) + 4}"), cwd=REPO,
                         env=env, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    assert f"resumed from {last}" in res.stdout + res.stderr
    summary = json.loads((out / "summary.json").read_text())
    assert [h["step"] for h in summary["history"]] == list(range(1, int(last[4:]) + 5))
    assert deepspeed_shm_files(port) == []


@pytest.mark.slow
@pytest.mark.parametrize("name", ["zero_pp_rank_1_mp_rank_00_optim_states.pt", "padnet_rng_rank1.pt",
                                  "padnet_partition_rank1.pt", "layer_0_expert_3_mp_rank_00_model_states.pt"])
def test_a_crafted_file_that_only_rank_1_reads_ends_the_job_with_rank_1s_message(reference, tmp_path, name):
    ref_out, _ = reference
    out, marker, port = tmp_path / "run", tmp_path / "payload-ran", free_port()
    shutil.copytree(ref_out, out)
    forge(out / "checkpoints" / "step6", name, marker)
    t0 = time.monotonic()
    res = subprocess.run(deepspeed_cmd(port, "train", "configs/smoke.yaml", f"output_dir={out}", *RUN, "resume=true"),
                         cwd=REPO, env=dict(os.environ, OMP_NUM_THREADS="1"), capture_output=True, text=True,
                         timeout=600)
    text = res.stdout + res.stderr
    assert res.returncode == 2, text[-4000:]
    assert f"padnet-ds (rank 1): error: checkpoint file {out}/checkpoints/step6/{name} holds pickled" in text
    assert "Traceback" not in text, text[-4000:]
    assert "(rank 0): error" not in text
    assert not marker.exists()
    assert time.monotonic() - t0 < 300
