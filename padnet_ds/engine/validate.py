"""Everything a run config must satisfy, checked on every rank before anything is written.

:func:`validate_run` is the one place: the run folder is prepared, and ``config.yaml`` written,
only after it passed. It checks what :func:`~padnet_ds.engine.config.load_config` could not
from the file alone:

- the task exists, ``extra`` holds only the task's sections, and the task's own check passes
  (``extra.vision`` for images; ``moe.ep_size`` against the world size for text);
- the DeepSpeed JSON exists and parses, runs with native MoE (ZeRO stage <= 2, no fp16 on
  CPU) and agrees with the run config's batch sizes.

Types and ranges of every key were checked when the config was built (pydantic, on load).
"""
from __future__ import annotations

from typing import Any, Dict

from . import image_task, text_task  # noqa: F401  (register the built-in tasks)
from .config import RunConfig
from .setup import load_ds_config
from .tasks import check_task_config


def validate_run(cfg: RunConfig) -> Dict[str, Any]:
    """Raise :class:`~padnet_ds.settings.ConfigError` naming the key, or return the DeepSpeed config to use."""
    check_task_config(cfg)
    return load_ds_config(cfg)
