"""Who am I in the process group, where collectives run, and the flat-buffer collectives every layer uses.

NCCL only reduces CUDA tensors and gloo only CPU ones, so collectives put their buffer on
``comm_device()`` and hand results back on the device the inputs came from. Lists of tensors
travel as one flat buffer (one collective however many tensors): partition scores, expert
loads, BatchNorm statistics and logged metrics all go through :func:`all_reduce_flat`.
Without a process group (one process) every helper returns its input's values unchanged.
"""
from __future__ import annotations

import socket
from typing import List, Optional, Sequence

import torch
import torch.distributed as dist
from torch import Tensor


def dist_on() -> bool:
    return dist.is_available() and dist.is_initialized()


def rank() -> int:
    return dist.get_rank() if dist_on() else 0


def world_size() -> int:
    return dist.get_world_size() if dist_on() else 1


def group_size(group=None) -> int:
    """Members of ``group`` (None = the world); 1 without a process group."""
    return dist.get_world_size(group) if dist_on() else 1


def comm_device() -> torch.device:
    if dist_on() and dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def flatten(tensors: Sequence[Tensor], dtype: Optional[torch.dtype] = None) -> Tensor:
    """One 1-D buffer holding ``tensors`` in order (cast to ``dtype`` if given, else torch's promotion)."""
    if not tensors:
        return torch.zeros(0, dtype=dtype or torch.float32)
    return torch.cat([t.detach().reshape(-1) if dtype is None else t.detach().reshape(-1).to(dtype)
                      for t in tensors])


def unflatten(flat: Tensor, like: Sequence[Tensor]) -> List[Tensor]:
    """Views of ``flat`` shaped like ``like``, the inverse of :func:`flatten`."""
    out, at = [], 0
    for t in like:
        out.append(flat[at:at + t.numel()].view(t.shape))
        at += t.numel()
    return out


def _on_comm_device(flat: Tensor) -> Tensor:
    device = comm_device()
    return flat if flat.device == device else flat.to(device)


def all_reduce_flat(tensors: Sequence[Tensor], op=None, group=None,
                    dtype: Optional[torch.dtype] = None) -> List[Tensor]:
    """``op`` (default SUM) of ``tensors`` over ``group`` (None = world) in one collective.

    Returns new tensors (views of one buffer) shaped like the inputs, on the inputs' device.
    """
    flat = flatten(tensors, dtype)
    if dist_on() and group_size(group) > 1 and flat.numel():
        device = flat.device
        buf = _on_comm_device(flat)
        dist.all_reduce(buf, op=dist.ReduceOp.SUM if op is None else op, group=group)
        flat = buf if buf.device == device else buf.to(device)
    return unflatten(flat, tensors)


def all_gather_flat(tensors: Sequence[Tensor], group=None, dtype: Optional[torch.dtype] = None) -> List[List[Tensor]]:
    """Every member's ``tensors`` (the same shapes on every rank), in group-rank order, in one collective."""
    flat = flatten(tensors, dtype)
    if not dist_on() or group_size(group) == 1:
        return [unflatten(flat, tensors)]
    device = flat.device
    buf = _on_comm_device(flat)
    parts = [torch.empty_like(buf) for _ in range(group_size(group))]
    dist.all_gather(parts, buf, group=group)
    return [unflatten(p if p.device == device else p.to(device), tensors) for p in parts]


def reduce_values(values: Sequence[float], op=None, dtype: torch.dtype = torch.float64) -> list:
    """Element-wise ``op`` (default SUM) of a short list of Python numbers over every rank."""
    if not dist_on() or world_size() == 1 or not values:
        return list(values)
    t = torch.tensor(list(values), dtype=dtype, device=comm_device())
    dist.all_reduce(t, op=dist.ReduceOp.SUM if op is None else op)
    return t.tolist()


def min_over_ranks(value: int) -> int:
    return int(reduce_values([value], dist.ReduceOp.MIN, torch.int64)[0])


def max_over_ranks(values: Sequence[float]) -> List[float]:
    return reduce_values(values, dist.ReduceOp.MAX, torch.float64)


def barrier() -> None:
    if dist_on():
        dist.barrier()


# What a collective reports when another rank went away (gloo's TCP transport; NCCL's abort).
PEER_GONE = ("Connection closed by peer", "Connection reset by peer", "NCCL communicator was aborted")


def peer_failed(err: BaseException) -> bool:
    """True when ``err`` is a collective (or the rendezvous) failing because another rank died."""
    return isinstance(err, getattr(dist, "DistError", ())) or any(s in str(err) for s in PEER_GONE)
