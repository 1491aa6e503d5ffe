"""padnet_ds.commit: a tag is visible only once complete, verified against its manifest, pruned safely."""
import hashlib
import json
import os

import pytest

from padnet_ds.commit import (CLAIMS, LATEST, MANIFEST, choose_tag, complete_tags, prune_tags, read_manifest,
                              verify_tag, write_tag)
from padnet_ds.errors import CheckpointError


def sha(path):
    return hashlib.sha256(path.read_bytes()).hexdigest()


def commit(root, tag, files, **kw):
    with write_tag(root, tag, collective=False, **kw) as stage:
        for name, data in files.items():
            (stage.dir / name).parent.mkdir(parents=True, exist_ok=True)
            (stage.dir / name).write_bytes(data)
    return root / tag


def test_a_committed_tag_lists_every_file_with_its_size_and_sha256_and_latest_names_it(tmp_path):
    tag = commit(tmp_path, "step2", {"a.pt": b"alpha", "sub/b.pt": b"beta" * 100}, meta={"step": 2})
    manifest = json.loads((tag / MANIFEST).read_text())
    assert manifest["files"] == {"a.pt": {"size": 5, "sha256": sha(tag / "a.pt")},
                                 "sub/b.pt": {"size": 400, "sha256": sha(tag / "sub" / "b.pt")}}
    assert manifest["meta"] == {"step": 2} and manifest["tag"] == "step2"
    assert (tmp_path / LATEST).read_text() == "step2"
    assert sorted(p.name for p in tmp_path.iterdir()) == [LATEST, "step2"], "the staging folder is gone"
    assert verify_tag(tag)["files"] == manifest["files"]


def test_a_save_that_raises_commits_nothing_and_the_next_save_of_that_tag_starts_clean(tmp_path):
    commit(tmp_path, "step2", {"a.pt": b"old"})
    with pytest.raises(RuntimeError, match="disk full"):
        with write_tag(tmp_path, "step4", collective=False) as stage:
            (stage.dir / "a.pt").write_bytes(b"half")
            raise RuntimeError("disk full")
    assert complete_tags(tmp_path) == ["step2"] and (tmp_path / LATEST).read_text() == "step2"
    assert (tmp_path / "step4.partial" / "a.pt").is_file() and not (tmp_path / "step4").exists()
    tag = commit(tmp_path, "step4", {"b.pt": b"new"})
    assert sorted(read_manifest(tag)["files"]) == ["b.pt"], "the crashed save's file was cleared"


def test_writing_a_tag_again_replaces_it(tmp_path):
    commit(tmp_path, "step2", {"a.pt": b"first", "old.pt": b"x"})
    tag = commit(tmp_path, "step2", {"a.pt": b"second"})
    assert (tag / "a.pt").read_bytes() == b"second" and not (tag / "old.pt").exists()
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []


@pytest.mark.parametrize("damage, message", [
    (lambda t: (t / "a.pt").unlink(), "a.pt is missing"),
    (lambda t: (t / "a.pt").write_bytes(b"alph"), "a.pt has 4 bytes, its manifest says 5"),
    (lambda t: (t / "a.pt").write_bytes(b"alpHa"), "a.pt does not match the sha256"),
    (lambda t: (t / MANIFEST).write_bytes(os.urandom(64)), "padnet_manifest.json is damaged"),
    (lambda t: (t / MANIFEST).write_text('{"files": {"../../etc/passwd": {"size": 1, "sha256": "0"}}}'),
     "is damaged: an entry is not"),
    (lambda t: (t / MANIFEST).unlink(), "has no padnet_manifest.json"),
])
def test_verify_names_the_damaged_file(tmp_path, damage, message):
    tag = commit(tmp_path, "step2", {"a.pt": b"alpha", "b.pt": b"beta"})
    verify_tag(tag)
    damage(tag)
    with pytest.raises(CheckpointError, match=message.replace(".", r"\.")):
        verify_tag(tag)


def test_choose_tag_falls_back_to_the_newest_intact_tag_and_says_why(tmp_path):
    for step in (2, 10, 20):
        commit(tmp_path, f"step{step}", {"a.pt": f"state {step}".encode()})
    (tmp_path / "step30.partial").mkdir()  # a save that never finished: not a candidate
    assert complete_tags(tmp_path) == ["step2", "step10", "step20"]  # natural order, not text order
    (tmp_path / "step20" / "a.pt").write_bytes(b"state 99")  # same size, other bytes
    tag, skipped = choose_tag(tmp_path)
    assert tag == "step10" and len(skipped) == 1 and skipped[0].startswith("step20: ") and "sha256" in skipped[0]
    with pytest.raises(CheckpointError, match="step20/a.pt does not match"):
        choose_tag(tmp_path, "step20")  # a tag named explicitly must verify itself
    for step in (2, 10):
        (tmp_path / f"step{step}" / "a.pt").unlink()
    with pytest.raises(CheckpointError, match="no checkpoint in .* is complete and intact: step20: .*step10: .*step2"):
        choose_tag(tmp_path)


def test_an_empty_folder_has_no_tag_and_says_what_it_found(tmp_path):
    (tmp_path / "step4.partial").mkdir()
    with pytest.raises(CheckpointError, match=r"holds no complete checkpoint \(only step4.partial, whose save"):
        choose_tag(tmp_path)


def test_prune_keeps_the_newest_complete_tags_and_clears_unfinished_saves(tmp_path):
    for step in (2, 4, 6, 8):
        commit(tmp_path, f"step{step}", {"a.pt": b"x"})
    (tmp_path / "step10.partial").mkdir()
    (tmp_path / ".step6.replaced").mkdir()
    removed = prune_tags(tmp_path, keep=2, protect=("step2",))
    assert sorted(removed) == [".step6.replaced", "step10.partial", "step4"]
    assert complete_tags(tmp_path) == ["step2", "step6", "step8"]
    assert prune_tags(tmp_path, keep=0) == [] and complete_tags(tmp_path) == ["step2", "step6", "step8"]


def write_on_ranks(root, damage_share_of):
    """Each rank writes and claims its own file; then one file of the other rank's share is damaged."""
    from padnet_ds.comm import barrier, rank

    with write_tag(root, "step3", meta={"world_size": 2}) as stage:
        path = stage.dir / f"rank{rank()}.pt"
        path.write_bytes(f"rank {rank()} ".encode() * (rank() + 1))
        stage.claim(path)
        if rank() == 0:
            (stage.dir / "unclaimed.txt").write_text("nobody claimed me")
    tag_dir = root / "step3"
    claims_left = sorted(p.name for p in tag_dir.iterdir() if p.name.startswith(".claims"))
    hashes = {p.name: (p.stat().st_size, sha(p)) for p in tag_dir.iterdir() if p.name != MANIFEST}
    first = choose_tag(root, collective=True)[0]
    barrier()
    if rank() == 0:  # sorted files: rank0.pt (share 0), rank1.pt (share 1), unclaimed.txt (share 0)
        name = "rank0.pt" if damage_share_of == 0 else "rank1.pt"
        data = (root / "step3" / name).read_bytes()
        (root / "step3" / name).write_bytes(data[:-1] + b"#")
    barrier()
    try:
        after = choose_tag(root, collective=True)
    except CheckpointError as err:
        after = str(err)
    return claims_left, hashes, first, after


def test_ranks_claim_and_hash_their_own_files_and_agree_on_a_damaged_tag(pool, tmp_path):
    commit(tmp_path, "step1", {"a.pt": b"older"})
    results = pool.run(write_on_ranks, tmp_path, 1)
    files = read_manifest(tmp_path / "step3")["files"]
    for claims_left, hashes, first, (tag, skipped) in results:
        assert claims_left == [] and first == "step3"
        assert {n: (e["size"], e["sha256"]) for n, e in files.items()} == hashes  # every file, incl. the unclaimed
        assert tag == "step1", "both ranks fall back together although only rank 1 hashed the damaged file"
    assert "rank1.pt does not match" in results[1][3][1][0]
    assert "another rank checked" in results[0][3][1][0]
    assert CLAIMS.format(0) not in os.listdir(tmp_path / "step3")
