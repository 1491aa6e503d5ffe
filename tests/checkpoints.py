"""Test helpers for checkpoint folders written through padnet_ds.commit."""
from __future__ import annotations

import json
from pathlib import Path

from padnet_ds.commit import MANIFEST, read_manifest, sha256_of


def resign(tag_dir: Path, name: str) -> None:
    """Rewrite the manifest entry of ``tag_dir/name`` to match the file as it is now: a folder whose
    writer was consistent with itself but wrong (or forged by someone else), which the manifest
    cannot catch and the content checks must."""
    manifest = read_manifest(tag_dir)
    manifest["files"][name] = {"size": (tag_dir / name).stat().st_size, "sha256": sha256_of(tag_dir / name)}
    (tag_dir / MANIFEST).write_text(json.dumps(manifest))
