"""Test-only entry point: ``python -m tests.engine.stall_save train ...`` is ``padnet-ds`` with one
rank's checkpoint save stalled, so that a test can kill the job while the other rank has finished.

``PADNET_TEST_STALL=<rank>:<tag>:<marker>``: rank ``<rank>``, about to save its ZeRO optimizer
shard of checkpoint ``<tag>``, creates the file ``<marker>`` and sleeps until it is killed. The
package itself has no such hook: this module wraps its checkpoint engine from outside.
"""
from __future__ import annotations

import os
import sys
import time
from pathlib import Path


def install() -> None:
    spec = os.environ.get("PADNET_TEST_STALL")
    if not spec:
        return
    stall_rank, tag, marker = spec.split(":", 2)
    from padnet_ds.engine.checkpoint_engine import SafeCheckpointEngine

    save = SafeCheckpointEngine.save

    def stalled_save(self, state_dict, path):
        if os.environ.get("RANK") == stall_rank and f"/{tag}.partial/" in path and "optim_states" in path:
            Path(marker).touch()
            time.sleep(3600)
        return save(self, state_dict, path)

    SafeCheckpointEngine.save = stalled_save


if __name__ == "__main__":
    install()
    from padnet_ds.cli import main

    sys.exit(main())
