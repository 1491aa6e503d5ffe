"""The multi-rank harness itself (padnet_ds.testing): ranks fail together, skips reach the test, pools restart."""
import time
from pathlib import Path

import pytest

from padnet_ds.testing import RankPool, deepspeed_shm_files


def rank_and_world():
    import torch.distributed as dist

    return dist.get_rank(), dist.get_world_size()


def rank1_fails_while_rank0_hangs():
    import torch.distributed as dist

    if dist.get_rank() == 1:
        raise ZeroDivisionError("rank 1's own error")
    while True:  # stands for a rank waiting on something that will never come
        time.sleep(1)


def every_rank_skips():
    pytest.skip("needs a GPU")


def test_a_failing_rank_fails_the_call_at_once_and_the_pool_restarts():
    with RankPool(2) as pool:
        assert pool.run(rank_and_world) == [(0, 2), (1, 2)]
        t0 = time.monotonic()
        with pytest.raises(RuntimeError) as err:
            pool.run(rank1_fails_while_rank0_hangs, timeout=120)
        assert time.monotonic() - t0 < 60, "the harness waited on a collective that could not finish"
        msg = str(err.value)
        assert "rank 1 failed" in msg and "ZeroDivisionError: rank 1's own error" in msg
        assert "ranks [0] did not finish and were stopped" in msg
        assert pool.run(rank_and_world) == [(0, 2), (1, 2)]  # fresh ranks after the failure


def test_a_skip_inside_the_ranks_skips_the_test():
    with RankPool(2) as pool:
        with pytest.raises(pytest.skip.Exception, match="needs a GPU"):
            pool.run(every_rank_skips)


def test_shm_files_of_one_job_only(tmp_path: Path):
    names = ["deepspeed_allreduce_buffer_1000_127.0.0.1_29611_0", "deepspeed_allreduce_buffer_1000_127.0.0.1_29611_1",
             "deepspeed_allreduce_buffer_1000_127.0.0.1_29612_0", "deepspeed_allreduce_buffer_1000_10.0.0.1_129611_0",
             "deepspeed_other_29611_0"]
    for name in names:
        (tmp_path / name).write_bytes(b"")
    assert deepspeed_shm_files(29611, str(tmp_path)) == names[:2]
    assert deepspeed_shm_files(29613, str(tmp_path)) == []
