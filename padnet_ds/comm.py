"""Who am I in the process group, and where do collectives run. Used by every layer.

NCCL only reduces CUDA tensors and gloo only CPU ones, so small bookkeeping collectives
(metrics, counts, digests) put their tensors on ``comm_device()``.
"""
from __future__ import annotations

import socket

import torch
import torch.distributed as dist


def dist_on() -> bool:
    return dist.is_available() and dist.is_initialized()


def rank() -> int:
    return dist.get_rank() if dist_on() else 0


def world_size() -> int:
    return dist.get_world_size() if dist_on() else 1


def comm_device() -> torch.device:
    if dist_on() and dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
