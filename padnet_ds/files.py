"""Files we write atomically, the one way a checkpoint file we did not just write is read, and text input.

Writes go to a temporary file in the destination folder, then ``os.replace`` renames it over
the destination (atomic on POSIX within one file system): a reader, or a rerun after a crash,
sees the old file or the new one, never half of one. Used for ``config.yaml``,
``summary.json``, ``latest``, manifests, the study's outputs and our per-rank checkpoint files.

:func:`safe_load` is ``torch.load(weights_only=True)``: tensors, containers and plain values
load; any other object in the pickle is refused *before* it is built, so a checkpoint from
someone else cannot run code. The only classes allowed beyond torch's own are the three value
records DeepSpeed's ZeRO optimizer files hold (found by reading real files: the loss scaler,
the ZeRO stage enum, a parameter's fragment address; ``DEEPSPEED_GLOBALS``).

:func:`read_text` reads a config or data file as UTF-8 and names the file and line of a bad byte.
"""
from __future__ import annotations

import os
import re
import tempfile
from pathlib import Path
from typing import Any, List, Union

from .errors import CheckpointError, DataError

PathLike = Union[str, os.PathLike]

# module -> names: plain attribute holders / an IntEnum, nothing that runs code on load
DEEPSPEED_GLOBALS = {
    "deepspeed.runtime.fp16.loss_scaler": ("LossScaler", "DynamicLossScaler"),
    "deepspeed.runtime.zero.config": ("ZeroStageEnum",),
    "deepspeed.utils.tensor_fragment": ("fragment_address",),
}
_UNPICKLER = re.compile(r"WeightsUnpickler error:\s*(.*?)\s*(?:Check the documentation|$)", re.S)
_GLOBAL = re.compile(r"Unsupported global: GLOBAL (\S+)")  # torch's advice to allow-list it is not for users


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


def _allowed_globals() -> List[Any]:
    import importlib

    from . import _env  # noqa: F401  (accelerator defaults before DeepSpeed is imported)

    return [getattr(importlib.import_module(module), name)
            for module, names in DEEPSPEED_GLOBALS.items() for name in names]


def safe_load(path: PathLike, map_location: Any = "cpu") -> Any:
    """``torch.load`` with ``weights_only=True``; a file that is not a plain torch checkpoint is a
    :class:`~padnet_ds.errors.CheckpointError` naming it, raised before anything in it runs."""
    import torch

    try:
        with torch.serialization.safe_globals(_allowed_globals()):
            return torch.load(path, map_location=map_location, weights_only=True)
    except FileNotFoundError:
        raise CheckpointError(f"checkpoint file {path} is missing") from None
    except Exception as err:  # noqa: BLE001 - whatever torch says, the user needs the file's name
        refused = _GLOBAL.search(" ".join(str(err).split()))
        if refused:  # the weights-only unpickler stopped at an object it does not allow (not a damaged file)
            raise CheckpointError(
                f"checkpoint file {path} holds pickled content a checkpoint never contains (it references "
                f"{refused.group(1)}): it was not written by padnet-ds / DeepSpeed, or it was altered. It was not "
                "loaded (nothing in it ran); use a checkpoint you trust") from None
        detail = _UNPICKLER.search(str(err))  # e.g. an opcode of random bytes
        first = " ".join(detail.group(1).split()) if detail else (str(err).strip().splitlines() or [repr(err)])[0]
        raise CheckpointError(f"checkpoint file {path} is damaged or not a torch checkpoint ({first}); "
                              "resume from an earlier checkpoint or retrain") from None


def read_text(path: PathLike) -> str:
    """A text file decoded as UTF-8 (a byte-order mark allowed); bad bytes are a
    :class:`~padnet_ds.errors.DataError` naming the file and line."""
    raw = Path(path).read_bytes()
    try:
        return raw.decode("utf-8-sig")
    except UnicodeDecodeError as err:
        line = raw[:err.start].count(b"\n") + 1
        raise DataError(f"{path}, line {line}: not UTF-8 text (byte {raw[err.start]:#04x} at offset {err.start}); "
                        "save the file as UTF-8") from None
