"""The launch/ recipes on localhost: each launcher runs the same short 2-rank PAD-MoE training
and must reach the same losses; a launcher run must leave /dev/shm as it found it."""
from __future__ import annotations

import shutil
import socket
import subprocess
import time

import pytest

from .launchers import LAUNCH, REPO, TRAIN, assert_same_losses, check_run, launch_env, run


def test_deepspeed_launcher_two_local_ranks(reference):
    assert reference["world_size"] == 2 and reference["steps"] == 12
    assert [h["step"] for h in reference["history"]] == [4, 8, 12]
    # both ranks took part in one process group: every partition step saw two identical mask tables
    assert [e["global_step"] for e in reference["partition_log"]] == [6, 8]
    for entry in reference["partition_log"]:
        assert len(entry["mask_digests"]) == 2 and entry["mask_digests"][0] == entry["mask_digests"][1]


def test_launcher_run_leaves_dev_shm_clean(reference):
    assert reference["_shm_left"] == [], f"the run left shared-memory files behind: {reference['_shm_left']}"


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
