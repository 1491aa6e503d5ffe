"""Everything a run config must satisfy, checked on every rank before the process group, the model
or the data exist, and before anything is written.

:func:`validate_run` is the one place. It checks what
:func:`~padnet_ds.engine.config.load_config` could not from the file alone:

- the launcher's environment (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_PORT);
- the task exists, ``extra`` holds only the task's sections, and the task's own check passes
  (``extra.vision`` for images; ``moe.ep_size`` against the world size and the data files for text);
- the DeepSpeed JSON exists and parses, runs with native MoE (ZeRO stage <= 2, no fp16 on
  CPU, DeepSpeed's synchronous checkpoint writer) and agrees with the run config's batch sizes;
- the run folder: a run there is refused unless ``resume=true``, which needs a complete checkpoint
  of the same model.

Because every rank checks the same inputs, a bad one fails every rank with the same message
before any collective could leave a rank waiting.

Types and ranges of every key were checked when the config was built (pydantic, on load).
"""
from __future__ import annotations

from typing import Any, Dict

from . import image_task, text_task  # noqa: F401  (register the built-in tasks)
from .config import RunConfig
from .distributed import launch_layout
from .run_dir import RunDir
from .setup import load_ds_config
from .tasks import check_task_config


def validate_run(cfg: RunConfig, run_folder: bool = True) -> Dict[str, Any]:
    """Raise an :class:`~padnet_ds.errors.InputError` naming the key or file, or return the DeepSpeed
    config to use. ``run_folder=False`` skips the output folder (``padnet-ds eval`` writes none)."""
    launch_layout()
    check_task_config(cfg)
    ds_config = load_ds_config(cfg)
    if run_folder:
        RunDir(cfg.output_dir).check(cfg)
    return ds_config
