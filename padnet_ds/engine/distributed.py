"""Process-group start-up for every launcher: deepspeed, torchrun, mpirun (mpi4py), tests.

The launchers disagree on how a rank learns who it is; this module turns each into the
``RANK / WORLD_SIZE / LOCAL_RANK / MASTER_ADDR / MASTER_PORT`` contract torch expects,
then starts DeepSpeed's comm layer on NCCL (GPUs) or gloo (CPU).
"""
from __future__ import annotations

import datetime
import os
from typing import Optional

import torch

from .. import _env  # noqa: F401
from ..comm import free_port


def accelerator_is_cpu() -> bool:
    return os.environ.get("DS_ACCELERATOR") == "cpu" or not torch.cuda.is_available()


def adopt_mpi_env() -> bool:
    """Under mpirun, fill the torch variables from Open MPI's.

    DeepSpeed's own MPI discovery takes MASTER_ADDR from ``hostname -I`` (not loopback on
    many machines), so we set it ourselves: rank 0's address must come from the user
    (MASTER_ADDR) on multi-node jobs; single node defaults to 127.0.0.1.
    """
    if "OMPI_COMM_WORLD_RANK" not in os.environ or "RANK" in os.environ:
        return False
    os.environ["RANK"] = os.environ["OMPI_COMM_WORLD_RANK"]
    os.environ["WORLD_SIZE"] = os.environ["OMPI_COMM_WORLD_SIZE"]
    os.environ["LOCAL_RANK"] = os.environ.get("OMPI_COMM_WORLD_LOCAL_RANK", "0")
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", "29500")
    return True


def init_distributed(backend: Optional[str] = None, timeout_s: float = 600.0) -> None:
    """Start the process group once (idempotent); single process runs get a world of one."""
    import deepspeed

    if torch.distributed.is_initialized():
        return
    adopt_mpi_env()
    if "RANK" not in os.environ:
        os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0")
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        os.environ.setdefault("MASTER_PORT", str(free_port()))
    if accelerator_is_cpu():
        # The shared-memory comm op only serves inference all-reduce, JIT-builds for ~35 s and
        # leaves a 66 MiB /dev/shm file per rank behind (measured with DeepSpeed 0.19.8 under its launcher).
        deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False
        if os.environ.get("MASTER_ADDR") in ("127.0.0.1", "localhost"):
            os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
    else:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    backend = backend or ("gloo" if accelerator_is_cpu() else "nccl")
    deepspeed.init_distributed(dist_backend=backend, auto_mpi_discovery=False,
                               timeout=datetime.timedelta(seconds=timeout_s))
