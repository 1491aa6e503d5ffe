"""Process-group start-up for every launcher: deepspeed, torchrun, mpirun (mpi4py), tests.

The launchers disagree on how a rank learns who it is; this module turns each into the
``RANK / WORLD_SIZE / LOCAL_RANK / MASTER_ADDR / MASTER_PORT`` contract torch expects,
then starts DeepSpeed's comm layer on NCCL (GPUs) or gloo (CPU).
"""
from __future__ import annotations

import datetime
import os
from typing import NamedTuple, Optional

import torch

from .. import _env  # noqa: F401
from ..comm import dist_on, free_port, world_size
from ..settings import ConfigError


class Layout(NamedTuple):
    rank: int
    world: int
    local_rank: int


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


def launch_layout() -> Layout:
    """This process's place in the job, read from the launcher's environment (no process group needed),
    so that every check that depends on it runs before ``init_distributed``. One process: (0, 1, 0)."""
    adopt_mpi_env()
    values = {}
    for key, low in (("RANK", 0), ("WORLD_SIZE", 1), ("LOCAL_RANK", 0), ("MASTER_PORT", 1)):
        raw = os.environ.get(key)
        if raw is None:
            continue
        try:
            values[key] = int(raw)
        except ValueError:
            raise ConfigError(f"environment variable {key}={raw!r} is not an integer (set by the launcher: "
                              "deepspeed, torchrun or mpirun)") from None
        if values[key] < low or (key == "MASTER_PORT" and values[key] > 65535):
            raise ConfigError(f"environment variable {key}={raw} is out of range")
    world = values.get("WORLD_SIZE", 1)
    if values.get("RANK", 0) >= world:
        raise ConfigError(f"environment variable RANK={values['RANK']} must be below WORLD_SIZE={world}")
    if ("RANK" in values) != ("WORLD_SIZE" in values):
        raise ConfigError("the environment sets only one of RANK and WORLD_SIZE: launch with deepspeed, torchrun "
                          "or mpirun, or set both")
    return Layout(values.get("RANK", 0), world, values.get("LOCAL_RANK", 0))


def launch_world() -> int:
    """The world size: the process group's if it exists, else the launcher's (:func:`launch_layout`)."""
    return world_size() if dist_on() else launch_layout().world


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
