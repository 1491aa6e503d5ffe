"""Run a function on N real ranks (gloo on CPU): the multi-rank harness of the tests and benchmarks.

Modelled on DeepSpeed's ``DistributedTest``: ``run_ranks(fn, 2, *args)`` spawns one process per
rank, starts the process group through the project's own ``init_distributed``, runs
``fn(*args)`` on every rank and returns the results in rank order. :class:`RankPool` keeps the
ranks (and their process group) alive across calls, so tests can run one layout per call,
each reported on its own, without paying the start-up for every layout.

The ranks pass or fail together:

- a rank that raises fails the call with its traceback; the other ranks get ``GRACE_S``
  seconds to finish or report their own errors (all are shown), then the pool is killed, so
  nothing waits on a collective that cannot finish, and the next call starts fresh ranks;
- ``pytest.skip`` inside a rank skips the calling test (unless another rank failed);
- a rank that dies without a word (killed, segfault) fails the call with its exit code.
"""
from __future__ import annotations

import io
import multiprocessing as mp
import os
import queue
import re
import sys
import time
import traceback
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Tuple

DEFAULT_TIMEOUT_S = float(os.environ.get("PADNET_TEST_RANK_TIMEOUT", "300"))
GRACE_S = 5.0


def _is_skip(err: BaseException) -> bool:
    pytest = sys.modules.get("pytest")  # without pytest loaded nothing could have called pytest.skip
    return pytest is not None and isinstance(err, pytest.skip.Exception)


def _rank_main(rank: int, world: int, port: int, jobs, results) -> None:
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port), OMP_NUM_THREADS="1")
    import torch

    try:
        torch.set_num_threads(1)
        from .engine.distributed import init_distributed

        init_distributed()
        while (job := jobs.get()) is not None:
            fn, args = job
            out = fn(*args)
            # Plain bytes: tensors put on a queue travel as shared-memory handles that die with the rank.
            buf = io.BytesIO()
            torch.save(out, buf)
            results.put((rank, "ok", buf.getvalue()))
    except BaseException as err:  # noqa: BLE001 - every failure must reach the parent
        skip = _is_skip(err)
        results.put((rank, "skip" if skip else "error", getattr(err, "msg", str(err)) if skip
                     else traceback.format_exc()))
    finally:
        import torch.distributed as dist

        if dist.is_initialized():
            try:
                dist.destroy_process_group()
            except Exception:  # noqa: BLE001
                pass


class RankPool:
    """``world`` ranks that run one function after another (``pool.run(fn, *args)``)."""

    def __init__(self, world: int = 2, timeout: float = DEFAULT_TIMEOUT_S) -> None:
        self.world, self.timeout = world, timeout
        self.procs: List[Any] = []
        self.jobs: List[Any] = []
        self.results: Optional[Any] = None

    def __enter__(self) -> "RankPool":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _start(self) -> None:
        from .comm import free_port

        ctx = mp.get_context("spawn")
        self.results = ctx.Queue()
        self.jobs = [ctx.Queue() for _ in range(self.world)]
        port = free_port()
        self.procs = [ctx.Process(target=_rank_main, args=(r, self.world, port, self.jobs[r], self.results),
                                  daemon=True) for r in range(self.world)]
        for p in self.procs:
            p.start()

    def run(self, fn: Callable[..., Any], *args: Any, timeout: Optional[float] = None) -> List[Any]:
        """``fn(*args)`` on every rank; the results in rank order (see the module docstring for failures)."""
        if not self.procs:
            self._start()
        for q in self.jobs:
            q.put((fn, args))
        outcomes = self._collect(self.timeout if timeout is None else timeout)
        if any(kind != "ok" for kind, _ in outcomes.values()) or len(outcomes) < self.world:
            self.close(kill=True)
            self._raise(outcomes)
        import torch

        return [torch.load(io.BytesIO(outcomes[r][1]), weights_only=False) for r in range(self.world)]

    def _collect(self, timeout: float) -> Dict[int, Tuple[str, Any]]:
        outcomes: Dict[int, Tuple[str, Any]] = {}
        deadline = time.monotonic() + timeout
        while len(outcomes) < self.world and time.monotonic() < deadline:
            try:
                rank, kind, value = self.results.get(timeout=0.5)
                outcomes[rank] = (kind, value)
                if kind != "ok":  # the others get a short grace to finish or say what went wrong
                    deadline = min(deadline, time.monotonic() + GRACE_S)
            except queue.Empty:
                for r, p in enumerate(self.procs):
                    if r not in outcomes and not p.is_alive():
                        time.sleep(0.2)  # its last message may still be in the pipe
                        if self.results.empty():
                            outcomes[r] = ("error", f"rank {r} died with exit code {p.exitcode}")
                            deadline = min(deadline, time.monotonic() + GRACE_S)
        return outcomes

    def _raise(self, outcomes: Dict[int, Tuple[str, Any]]) -> None:
        missing = sorted(set(range(self.world)) - set(outcomes))
        errors = [f"rank {r} failed:\n{value}" for r, (kind, value) in sorted(outcomes.items()) if kind == "error"]
        if errors:
            stopped = f"\n(ranks {missing} did not finish and were stopped)" if missing else ""
            raise RuntimeError("\n".join(errors) + stopped)
        skips = [value for kind, value in outcomes.values() if kind == "skip"]
        if skips:
            import pytest

            pytest.skip(skips[0])
        raise TimeoutError(f"ranks {missing} did not finish in time")

    def close(self, kill: bool = False) -> None:
        for q in self.jobs if not kill else ():
            q.put(None)
        for p in self.procs:
            p.join(timeout=0 if kill else 10)
            if p.is_alive():
                p.kill()
                p.join()
        self.procs, self.jobs, self.results = [], [], None


def run_ranks(fn: Callable[..., Any], world: int = 2, *args: Any, timeout: float = DEFAULT_TIMEOUT_S) -> List[Any]:
    """``fn(*args)`` on ``world`` fresh ranks; each rank's result, in rank order."""
    with RankPool(world, timeout) as pool:
        return pool.run(fn, *args)


SHM_FILE = re.compile(r"deepspeed_allreduce_buffer_\d+_(?P<addr>[^_]*)_(?P<port>\d+)_(?P<rank>\d+)")


def deepspeed_shm_files(port: int, root: str = "/dev/shm") -> List[str]:
    """The shared-memory buffers DeepSpeed's CPU all-reduce made for the job on master port ``port``.

    Named ``deepspeed_allreduce_buffer_<uid>_<MASTER_ADDR>_<MASTER_PORT>_<rank>``
    (deepspeed/ops/csrc/cpu/comm/shm.cpp), so other jobs' buffers on the same machine never match.
    """
    folder = Path(root)
    if not folder.is_dir():
        return []
    return sorted(p.name for p in folder.iterdir() if (m := SHM_FILE.fullmatch(p.name)) and int(m["port"]) == port)
