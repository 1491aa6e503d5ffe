"""Folders that appear complete or not at all: checkpoint tags (and exports) written by several ranks.

A tag ``<root>/<tag>/`` is written in four steps (:func:`write_tag`, every rank):

1. rank 0 empties ``<root>/<tag>.partial/`` (what a crashed save may have left); barrier;
2. every rank writes its files there and claims them (:meth:`Staging.claim`);
3. every rank hashes the files it claimed (sha256, so the reading is spread over the ranks
   that wrote them) into ``.claims-rank<R>.json``; barrier;
4. rank 0 merges the claims, hashes any file nobody claimed, writes ``padnet_manifest.json``
   (atomically), renames the folder to ``<root>/<tag>/`` and rewrites ``<root>/latest``
   (atomically); barrier.

So ``<root>/<tag>/`` exists only once every rank's files are complete, and a process killed at
any point leaves the earlier tags and ``latest`` as they were. DeepSpeed's own
``save_checkpoint`` writes ``latest`` from rank 0, in place and before the other ranks are done;
:mod:`padnet_ds.engine.checkpoint` calls it with ``save_latest=False`` inside :func:`write_tag`.

The manifest lists every file with its size and sha256. :func:`verify_tag` checks a tag against
it and names the first missing, truncated or changed file; :func:`choose_tag` picks the newest
tag that verifies (on every rank alike, each rank hashing its share of the files);
:func:`prune_tags` keeps the newest complete tags and clears what crashed saves left.

A process kill, a node failure or an exception mid-save are covered; the files are not fsynced,
so a power loss of the file server within seconds of a save is not.
"""
from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
from contextlib import contextmanager
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Dict, Iterator, List, Optional, Sequence, Tuple

from .comm import barrier, min_over_ranks, rank, world_size
from .errors import CheckpointError
from .files import PathLike, atomic_write_text

MANIFEST = "padnet_manifest.json"
LATEST = "latest"
PARTIAL = ".partial"  # <tag>.partial: a tag being written
REPLACED = ".replaced"  # .<tag>.replaced: the old copy of a tag being written again, for a moment
CLAIMS = ".claims-rank{}.json"
FORMAT = 1

Entry = Dict[str, Any]  # {"size": bytes, "sha256": hex digest}


def sha256_of(path: PathLike) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def tag_order(name: str) -> List[Any]:
    """Natural order: ``step9`` before ``step10``."""
    return [(0, int(part)) if part.isdigit() else (1, part) for part in re.split(r"(\d+)", name)]


class Staging:
    """The folder a tag is written into (``dir``) and the files this rank claims it wrote there."""

    def __init__(self, root: Path, tag: str, collective: bool) -> None:
        self.root, self.tag, self.collective = root, tag, collective
        self.dir = root / f"{tag}{PARTIAL}"
        self.final = root / tag
        self.claimed: Dict[str, Path] = {}

    def claim(self, *paths: PathLike) -> None:
        """This rank wrote ``paths`` (inside :attr:`dir`): it hashes them, so rank 0 need not."""
        for path in paths:
            p = Path(path)
            rel = p.resolve().relative_to(self.dir.resolve()).as_posix()
            self.claimed[rel] = p

    def entries(self) -> Dict[str, Entry]:
        out = {}
        for rel, path in sorted(self.claimed.items()):
            if not path.is_file():
                raise CheckpointError(f"{path} was claimed for checkpoint {self.tag} but does not exist")
            out[rel] = {"size": path.stat().st_size, "sha256": sha256_of(path)}
        return out


@contextmanager
def write_tag(root: PathLike, tag: str, *, collective: bool = True, latest: bool = True,
              meta: Optional[Dict[str, Any]] = None) -> Iterator[Staging]:
    """Write a tag: ``with write_tag(root, tag) as stage:`` write into ``stage.dir``, ``stage.claim(path)``.

    ``collective=True``: every rank of the process group enters with the same arguments (the
    barriers are collectives). ``collective=False``: this process alone writes the folder (e.g.
    an export on rank 0). If the block raises, nothing is committed and no barrier is entered:
    the error ends this rank and the launcher stops the others.
    """
    stage = Staging(Path(root), str(tag), collective)
    leader = rank() == 0 or not collective
    if leader:
        shutil.rmtree(stage.dir, ignore_errors=True)
        stage.dir.mkdir(parents=True)
    if collective:
        barrier()
    yield stage
    claims = stage.entries()
    if collective:
        atomic_write_text(stage.dir / CLAIMS.format(rank()), json.dumps(claims))
        barrier()
    if leader:
        files = merge_claims(stage, claims)
        manifest = {"format": FORMAT, "tag": stage.tag, "created": datetime.now(timezone.utc).isoformat(),
                    "meta": meta or {}, "files": files}
        atomic_write_text(stage.dir / MANIFEST, json.dumps(manifest, indent=1, sort_keys=True))
        publish(stage.dir, stage.final)
        if latest:
            atomic_write_text(stage.root / LATEST, stage.tag)
    if collective:
        barrier()


def merge_claims(stage: Staging, own: Dict[str, Entry]) -> Dict[str, Entry]:
    """Every rank's claims (their files removed), plus the files nobody claimed, hashed here."""
    files = dict(own)
    if stage.collective:
        for r in range(world_size()):
            path = stage.dir / CLAIMS.format(r)
            files.update(json.loads(path.read_text()))
            path.unlink()
    for path in sorted(stage.dir.rglob("*")):
        rel = path.relative_to(stage.dir).as_posix()
        if path.is_file() and rel not in files and rel != MANIFEST:
            files[rel] = {"size": path.stat().st_size, "sha256": sha256_of(path)}
    return dict(sorted(files.items()))


def publish(staging: Path, final: Path) -> None:
    """Rename ``staging`` to ``final``; an existing ``final`` (a tag written again) is moved aside first."""
    if not final.exists():
        os.replace(staging, final)
        return
    aside = final.with_name(f".{final.name}{REPLACED}")
    shutil.rmtree(aside, ignore_errors=True)
    os.replace(final, aside)
    os.replace(staging, final)
    shutil.rmtree(aside, ignore_errors=True)


def read_manifest(tag_dir: PathLike) -> Dict[str, Any]:
    path = Path(tag_dir) / MANIFEST
    if not path.is_file():
        raise CheckpointError(f"{tag_dir} has no {MANIFEST}: its save did not finish (or an older padnet-ds "
                              "wrote it), so it is not a complete checkpoint")
    try:
        manifest = json.loads(path.read_text())
        files = manifest["files"]
        ok = all(isinstance(e["size"], int) and isinstance(e["sha256"], str) and not Path(n).is_absolute()
                 and ".." not in Path(n).parts for n, e in files.items())
    except (ValueError, KeyError, TypeError, AttributeError, UnicodeDecodeError) as err:
        raise CheckpointError(f"{path} is damaged ({type(err).__name__}: {err})") from None
    if not ok:
        raise CheckpointError(f"{path} is damaged: an entry is not {{size, sha256}} of a file inside the tag")
    return manifest


def verify_tag(tag_dir: PathLike, *, checksums: bool = True, share: Tuple[int, int] = (0, 1)) -> Dict[str, Any]:
    """The tag's manifest, after checking every file's size and (for this rank's ``share`` =
    (index, count) of the files) its sha256; a :class:`CheckpointError` names the first bad file."""
    tag_dir = Path(tag_dir)
    manifest = read_manifest(tag_dir)
    for i, (name, entry) in enumerate(sorted(manifest["files"].items())):
        path = tag_dir / name
        if not path.is_file():
            raise CheckpointError(f"checkpoint file {path} is missing (listed in {tag_dir / MANIFEST})")
        size = path.stat().st_size
        if size != entry["size"]:
            raise CheckpointError(f"checkpoint file {path} has {size} bytes, its manifest says {entry['size']}: "
                                  "truncated or replaced")
        if checksums and i % share[1] == share[0] and sha256_of(path) != entry["sha256"]:
            raise CheckpointError(f"checkpoint file {path} does not match the sha256 in its manifest: "
                                  "damaged or replaced")
    return manifest


def complete_tags(root: PathLike) -> List[str]:
    """The tags under ``root`` that have a manifest (committed), oldest first (not yet verified)."""
    root = Path(root)
    if not root.is_dir():
        return []
    tags = [p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")
            and not p.name.endswith(PARTIAL) and (p / MANIFEST).is_file()]
    return sorted(tags, key=tag_order)


def choose_tag(root: PathLike, tag: Optional[str] = None, *, collective: bool = False) -> Tuple[str, List[str]]:
    """(the newest tag under ``root`` that verifies, or ``tag`` if given and it does; why newer tags were skipped).

    ``collective=True``: every rank calls it, hashes its share of each candidate's files, and all
    ranks agree on the result (one MIN all-reduce per candidate).
    """
    root = Path(root)
    candidates = [tag] if tag is not None else complete_tags(root)[::-1]
    share = (rank(), world_size()) if collective else (0, 1)
    skipped: List[str] = []
    for name in candidates:
        why = ""
        try:
            verify_tag(root / name, share=share)
        except CheckpointError as err:
            why = str(err)
        ok = min_over_ranks(int(not why)) if collective else int(not why)
        if ok:
            return name, skipped
        skipped.append(f"{name}: {why or 'a file that another rank checked is damaged (see its log)'}")
    if skipped:
        raise CheckpointError(f"no checkpoint in {root} is complete and intact: " + "; ".join(skipped))
    partial = sorted(p.name for p in root.glob(f"*{PARTIAL}")) if root.is_dir() else []
    raise CheckpointError(f"{root} holds no complete checkpoint" +
                          (f" (only {', '.join(partial)}, whose save did not finish)" if partial else ""))


def prune_tags(root: PathLike, keep: int, protect: Sequence[str] = ()) -> List[str]:
    """Remove what crashed saves left and all but the newest ``keep`` complete tags (0 = keep all),
    never one in ``protect``. Call it from one process, outside a save. Returns the removed names."""
    root = Path(root)
    removed = [p.name for p in root.iterdir()
               if p.is_dir() and (p.name.endswith(PARTIAL) or (p.name.startswith(".") and p.name.endswith(REPLACED)))]
    if keep > 0:
        removed += [t for t in complete_tags(root)[:-keep] if t not in protect]
    for name in removed:
        shutil.rmtree(root / name, ignore_errors=True)
    return removed
