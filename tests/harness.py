"""Run a test function on N real ranks (gloo on CPU), the way DeepSpeed's DistributedTest does.

``run_ranks(fn, 2, *args)`` spawns one process per rank, starts the process group through
the project's own ``init_distributed`` and returns each rank's result in rank order. A rank
that raises ends the whole group at once (no waiting on a collective that will never
finish) and the failure is re-raised here with the rank's traceback.
"""
from __future__ import annotations

import io
import multiprocessing as mp
import os
import queue
import time
import traceback
from typing import Any, Callable, List

DEFAULT_TIMEOUT_S = float(os.environ.get("PADNET_TEST_RANK_TIMEOUT", "300"))


def _rank_main(fn, rank, world, port, args, results):
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port), OMP_NUM_THREADS="1")
    try:
        import torch

        torch.set_num_threads(1)
        from padnet_ds.engine.distributed import init_distributed

        init_distributed()
        out = fn(*args)
        # Plain bytes: tensors put on a queue travel as shared-memory handles that die with the rank.
        buf = io.BytesIO()
        torch.save(out, buf)
        results.put((rank, "ok", buf.getvalue()))
    except BaseException:  # noqa: BLE001 - every failure must reach the parent
        results.put((rank, "error", traceback.format_exc()))
    finally:
        try:
            import torch.distributed as dist

            if dist.is_initialized():
                dist.destroy_process_group()
        except Exception:  # noqa: BLE001
            pass


def run_ranks(fn: Callable[..., Any], world: int = 2, *args: Any, timeout: float = DEFAULT_TIMEOUT_S) -> List[Any]:
    from padnet_ds.engine.distributed import free_port

    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    port = free_port()
    procs = [ctx.Process(target=_rank_main, args=(fn, r, world, port, args, results), daemon=True) for r in range(world)]
    for p in procs:
        p.start()
    outs: dict = {}
    deadline = time.monotonic() + timeout
    try:
        while len(outs) < world:
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError(f"ranks {sorted(set(range(world)) - set(outs))} did not finish in {timeout:.0f} s")
            try:
                rank, status, value = results.get(timeout=min(left, 1.0))
            except queue.Empty:
                dead = [r for r, p in enumerate(procs) if not p.is_alive() and p.exitcode not in (0, None)
                        and r not in outs]
                if dead:
                    raise RuntimeError(f"rank {dead[0]} died with exit code {procs[dead[0]].exitcode}")
                continue
            if status == "error":
                raise RuntimeError(f"rank {rank} failed:\n{value}")
            import torch

            outs[rank] = torch.load(io.BytesIO(value), weights_only=False)
    finally:
        for p in procs:
            if p.is_alive():
                p.join(timeout=5 if len(outs) == world else 0)
            if p.is_alive():
                p.kill()
                p.join()
    return [outs[r] for r in range(world)]
