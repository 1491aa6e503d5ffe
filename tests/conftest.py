import os
from pathlib import Path

import pytest

os.environ.setdefault("OMP_NUM_THREADS", "1")
REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session")
def shared_dir() -> Path:
    """The read-only shared folder (real GLUE files etc.), `PADNET_SHARED` or ../shared."""
    path = Path(os.environ.get("PADNET_SHARED", REPO.parent / "shared"))
    if not path.is_dir():
        pytest.skip(f"shared data folder {path} not found (set PADNET_SHARED)")
    return path


@pytest.fixture(scope="module")
def pool():
    """Two real gloo ranks kept for the module's tests (padnet_ds.testing.RankPool); restarted after a failure."""
    from padnet_ds.testing import RankPool

    with RankPool(2) as ranks:
        yield ranks
