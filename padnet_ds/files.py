"""Atomic file writes: a reader (or a rerun after a crash) sees the old file or the new one, never half of one.

Each write goes to a temporary file in the destination folder, then ``os.replace`` renames it
over the destination (atomic on POSIX within one file system). Used for ``config.yaml``,
``summary.json``, the study's outputs, and the per-rank RNG and partitioner files of a
checkpoint.
"""
from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Any, Union

PathLike = Union[str, os.PathLike]


def _replace_from_temp(path: PathLike, write, mode: str) -> Path:
    dest = Path(path)
    dest.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=dest.parent, prefix=f".{dest.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, mode) as f:
            write(f)
        os.replace(tmp, dest)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return dest


def atomic_write_text(path: PathLike, text: str) -> Path:
    return _replace_from_temp(path, lambda f: f.write(text), "w")


def atomic_torch_save(obj: Any, path: PathLike) -> Path:
    import torch

    return _replace_from_temp(path, lambda f: torch.save(obj, f), "wb")
