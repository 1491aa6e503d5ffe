import time

import pytest

from padnet_ds.testing import deepspeed_shm_files

from .launchers import launch_env, run


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """The deepspeed launcher, 2 local ranks: the reference run, with its /dev/shm buffers looked up."""
    tmp = tmp_path_factory.mktemp("deepspeed")
    env = launch_env()
    t0 = time.monotonic()
    summary = run("deepspeed.sh", tmp / "run", env, log=tmp / "log.txt")
    summary["_wall_s"] = time.monotonic() - t0
    summary["_shm_left"] = deepspeed_shm_files(int(env["MASTER_PORT"]))  # this run's buffers only
    return summary
