"""launch/slurm.sbatch without a cluster: fake `srun` / `scontrol` on PATH run its tasks locally with
the variables Slurm sets (SLURM_PROCID, SLURM_LOCALID, SLURM_NODEID, ...), so both of its modes
(one task per rank; one deepspeed launcher per node) really train, and reach the launchers' losses."""
from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

from padnet_ds.comm import free_port

from .launchers import LAUNCH, REPO, TRAIN, assert_same_losses, check_run, launch_env

FAKE_SRUN = r'''#!/usr/bin/env bash
# fake srun: SLURM_NTASKS tasks on this machine (--ntasks-per-node=1: one task per node of the job)
ntasks=$SLURM_NTASKS
while [ $# -gt 0 ]; do case "$1" in --ntasks-per-node=*) ntasks=$(( ${1#*=} * SLURM_NNODES )); shift ;;
  --*) shift ;; *) break ;; esac; done
pids=()
for ((i = 0; i < ntasks; i++)); do
  SLURM_PROCID=$i SLURM_LOCALID=$i SLURM_NODEID=$(( ntasks == SLURM_NNODES ? i : 0 )) SLURM_NTASKS=$ntasks "$@" &
  pids+=($!)
done
rc=0; for p in "${pids[@]}"; do wait "$p" || rc=1; done; exit $rc
'''
FAKE_SCONTROL = '#!/usr/bin/env bash\n[ "$1 $2" = "show hostnames" ] && echo "$SLURM_JOB_NODELIST" | tr , "\\n"\n'


def fake_slurm(tmp_path: Path) -> Path:
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for name, text in (("srun", FAKE_SRUN), ("scontrol", FAKE_SCONTROL)):
        (bin_dir / name).write_text(text)
        (bin_dir / name).chmod(0o755)
    return bin_dir


def sbatch_env(tmp_path, **extra):
    env = launch_env(**extra)
    env.pop("MASTER_PORT")
    env.update(PATH=f"{fake_slurm(tmp_path)}:{os.environ['PATH']}", SLURM_SUBMIT_DIR=str(REPO),
               SLURM_CPUS_PER_TASK="1",
               SLURM_JOB_ID=str((free_port() - 29500) % 10000 + 10000))  # MASTER_PORT = 29500 + id % 10000
    return env


@pytest.mark.slow
def test_slurm_srun_one_task_per_rank(reference, tmp_path):
    env = sbatch_env(tmp_path, SLURM_NTASKS="2", SLURM_NNODES="1", SLURM_JOB_NODELIST="localhost", LAUNCH_MODE="srun")
    out, log = tmp_path / "run", tmp_path / "log.txt"
    with open(log, "w") as f:
        p = subprocess.Popen(["bash", str(LAUNCH / "slurm.sbatch"), *TRAIN, f"output_dir={out}"], cwd=REPO, env=env,
                             stdout=f, stderr=subprocess.STDOUT)
    assert_same_losses(check_run([p], out, log), reference, "slurm srun")


@pytest.mark.slow
def test_slurm_deepspeed_per_node(reference, tmp_path):
    """Two 'nodes' (localhost, 127.0.0.1), one deepspeed --no_ssh launcher each, one rank per node."""
    env = sbatch_env(tmp_path, SLURM_NTASKS="2", SLURM_NNODES="2", SLURM_JOB_NODELIST="localhost,127.0.0.1",
                     LAUNCH_MODE="deepspeed", GPUS_PER_NODE="1", HOSTFILE=str(tmp_path / "hostfile"))
    out, log = tmp_path / "run", tmp_path / "log.txt"
    with open(log, "w") as f:
        p = subprocess.Popen(["bash", str(LAUNCH / "slurm.sbatch"), *TRAIN, f"output_dir={out}"], cwd=REPO, env=env,
                             stdout=f, stderr=subprocess.STDOUT)
    assert_same_losses(check_run([p], out, log), reference, "slurm deepspeed per node")
