"""What every launcher test shares: the training command, the environment, running a launcher, comparing losses."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from padnet_ds.comm import free_port

REPO = Path(__file__).resolve().parents[2]
LAUNCH = REPO / "launch"
# identical for every launcher: a tiny random-init encoder, 12 steps, partition steps after steps 6 and 8
TRAIN = ["train", "configs/smoke.yaml", "train.steps=12", "partition.warmup_steps=4", "partition.interval=2",
         "partition.steps=2", "data.max_train_examples=192", "data.max_eval_examples=32", "train.log_every=4",
         "train.eval_every=0", "train.checkpoint_every=0"]
TIMEOUT = 420


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


def losses(summary: dict):
    return summary["train_loss"], [h["loss"] for h in summary["history"]]


def assert_same_losses(got: dict, ref: dict, launcher: str):
    (final, hist), (rfinal, rhist) = losses(got), losses(ref)
    assert got["world_size"] == ref["world_size"] == 2
    assert got["steps"] == ref["steps"] == 12
    assert final == pytest.approx(rfinal, rel=1e-4, abs=1e-5), f"{launcher}: final loss {final} != {rfinal}"
    assert hist == pytest.approx(rhist, rel=1e-4, abs=1e-5), f"{launcher}: loss history {hist} != {rhist}"
