"""The launch/ recipes on localhost: each launcher runs the same short 2-rank PAD-MoE training
and must reach the same losses; a launcher run must leave /dev/shm as it found it."""
from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
LAUNCH = REPO / "launch"
# identical for every launcher: a tiny random-init encoder, 12 steps, partition rounds at 4, 6
TRAIN = ["train", "configs/smoke.yaml", "train.steps=12", "partition.warmup_steps=4", "partition.interval=2",
         "partition.steps=2", "data.max_train_examples=192", "data.max_eval_examples=32", "train.log_every=4",
         "train.eval_every=0", "train.checkpoint_every=0"]
TIMEOUT = 420


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch_env(**extra) -> dict:
    env = dict(os.environ)
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", "HOSTFILE", "NODE_RANK"):
        env.pop(k, None)
    env.update(PYTHON=sys.executable, NPROC="2", OMP_NUM_THREADS="1", DS_ACCELERATOR="cpu",
               MASTER_PORT=str(free_port()), TORCHRUN_ARGS="", PYTHONUNBUFFERED="1")
    env.update(extra)
    return env


def check_run(procs, out: Path, log: Path) -> dict:
    for p in procs:
        try:
            p.wait(timeout=TIMEOUT)
        except subprocess.TimeoutExpired:
            for q in procs:
                q.kill()
            pytest.fail(f"launcher timed out; log {log}:\n{log.read_text()[-4000:]}")
    if any(p.returncode for p in procs) or not (out / "summary.json").is_file():
        pytest.fail(f"launcher failed (rc {[p.returncode for p in procs]}); log {log}:\n{log.read_text()[-6000:]}")
    return json.loads((out / "summary.json").read_text())


def run(script: str, out: Path, env: dict, *, log: Path) -> dict:
    with open(log, "w") as f:
        p = subprocess.Popen([str(LAUNCH / script), *TRAIN, f"output_dir={out}"], cwd=REPO, env=env,
                             stdout=f, stderr=subprocess.STDOUT)
    return check_run([p], out, log)


def shm_buffers() -> set:
    return {p.name for p in Path("/dev/shm").glob("deepspeed_*")} if Path("/dev/shm").is_dir() else set()


def losses(summary: dict):
    return summary["train_loss"], [h["loss"] for h in summary["history"]]


def assert_same_losses(got: dict, ref: dict, launcher: str):
    (final, hist), (rfinal, rhist) = losses(got), losses(ref)
    assert got["world_size"] == ref["world_size"] == 2
    assert got["steps"] == ref["steps"] == 12
    assert final == pytest.approx(rfinal, rel=1e-4, abs=1e-5), f"{launcher}: final loss {final} != {rfinal}"
    assert hist == pytest.approx(rhist, rel=1e-4, abs=1e-5), f"{launcher}: loss history {hist} != {rhist}"


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """The deepspeed launcher, 2 local ranks: the reference run, with /dev/shm watched."""
    tmp = tmp_path_factory.mktemp("deepspeed")
    before = shm_buffers()
    t0 = time.monotonic()
    summary = run("deepspeed.sh", tmp / "run", launch_env(), log=tmp / "log.txt")
    summary["_wall_s"] = time.monotonic() - t0
    summary["_shm_new"] = sorted(shm_buffers() - before)
    return summary


def test_deepspeed_launcher_two_local_ranks(reference):
    assert reference["world_size"] == 2 and reference["steps"] == 12
    assert len(reference["history"]) == 3 and all(h["loss"] > 0 for h in reference["history"])


def test_launcher_run_leaves_dev_shm_clean(reference):
    assert reference["_shm_new"] == [], f"the run left shared-memory files behind: {reference['_shm_new']}"


@pytest.mark.slow
def test_deepspeed_two_nodes_no_ssh(reference, tmp_path):
    """Two simulated nodes (one launcher each, --no_ssh), both names resolving to loopback."""
    for name in ("localhost", "127.0.0.1"):
        assert socket.gethostbyname(name).startswith("127."), f"{name} must resolve to loopback"
    hostfile = tmp_path / "hostfile"
    hostfile.write_text("localhost slots=1\n127.0.0.1 slots=1\n")
    out, log = tmp_path / "run", tmp_path / "log.txt"
    env = launch_env(HOSTFILE=str(hostfile), MASTER_ADDR="127.0.0.1")
    procs = []
    with open(log, "w") as f:
        for node in (0, 1):
            procs.append(subprocess.Popen([str(LAUNCH / "deepspeed-node.sh"), *TRAIN, f"output_dir={out}"], cwd=REPO,
                                          env=dict(env, NODE_RANK=str(node)), stdout=f, stderr=subprocess.STDOUT))
            time.sleep(1.0)  # node 0's preflight checks the master port before node 1 could look busy
    assert_same_losses(check_run(procs, out, log), reference, "deepspeed --no_ssh x2")


@pytest.mark.slow
@pytest.mark.skipif(not shutil.which("mpirun"), reason="mpirun not installed (scripts/install-system-deps.sh)")
def test_mpirun_mpi4py(reference, tmp_path):
    summary = run("mpirun.sh", tmp_path / "run", launch_env(), log=tmp_path / "log.txt")
    assert_same_losses(summary, reference, "mpirun")


@pytest.mark.slow
def test_torchrun(reference, tmp_path):
    summary = run("torchrun.sh", tmp_path / "run", launch_env(), log=tmp_path / "log.txt")
    assert_same_losses(summary, reference, "torchrun")
