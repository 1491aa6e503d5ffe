"""The partitioner on real gloo ranks inside DeepSpeed engines: sync, checkpoints, verification."""
import os

import pytest
import torch
import torch.nn.functional as F

from padnet_ds.engine.setup import build_engine
from padnet_ds.partition import PartitionConfig, Partitioner
from padnet_ds.testing import run_ranks
from tests.partition.toy import PToy, data, ds_config, masks_by_expert, params

ROWS = 4  # sequences per rank and micro-batch
ACCUM = 2


def frozen_sgd(p):
    return torch.optim.SGD(p, lr=0.0)  # weights stay fixed, so 2 ranks and 1 process score the same model


def score_run(ep, stage, union):
    """Masks, partition log and global scores of 4 optimizer steps (partition steps after 2 and 4)."""
    import padnet_ds.partition.partitioner as pp

    rank = torch.distributed.get_rank()
    steps = 4
    if union:  # one process, each micro-batch the concatenation of both ranks' micro-batches
        parts = [data(steps * ACCUM, ROWS, seed=10 + r) for r in range(2)]
        x, y = torch.cat([p[0] for p in parts], 1), torch.cat([p[1] for p in parts], 1)
    else:
        x, y = data(steps * ACCUM, ROWS, seed=10 + rank)
    recorded = []
    orig = pp.global_imp_scores
    pp.global_imp_scores = lambda sites, local: recorded.append(orig(sites, local)) or recorded[-1]
    try:
        model = PToy(ep_size=ep)
        engine = build_engine(model, ds_config(stage, x.shape[1], ACCUM), optimizer=frozen_sgd)
        part = Partitioner(engine.module, PartitionConfig(ratio=0.5, warmup_steps=0, interval=2, steps=2), engine)
        masks = []
        for g in range(steps):
            part.before_step(g)
            for m in range(ACCUM):
                pred, _ = engine(x[g * ACCUM + m])
                engine.backward(F.mse_loss(pred, y[g * ACCUM + m]))
                engine.step()
            if part.after_step(g + 1) is not None:
                masks.append(masks_by_expert(model))
    finally:
        pp.global_imp_scores = orig
    return dict(masks=masks, log=part.log, scores=[[t.clone() for t in r] for r in recorded],
                ratios=part.layer_ratios(), overall=part.overall_ratio())


@pytest.fixture(scope="module")
def union_reference():
    """One process scoring each step on the union of both ranks' micro-batches (ep_size 1, ZeRO 0)."""
    (ref,) = run_ranks(score_run, 1, 1, 0, True)
    assert len(ref["masks"]) == 2 and len(ref["log"]) == 2
    return ref


@pytest.mark.parametrize("stage", [0, 1, 2], ids=lambda s: f"zero{s}")
@pytest.mark.parametrize("ep", [1, 2], ids=lambda e: f"ep{e}")
def test_two_ranks_different_data_match_one_process_on_the_union(pool, union_reference, ep, stage):
    ref = union_reference
    a, b = pool.run(score_run, ep, stage, False)
    assert a["log"] == b["log"], "partition logs differ between ranks"
    assert a["ratios"] == b["ratios"] == ref["ratios"] and a["overall"] == ref["overall"]
    for got, want in zip(a["scores"], ref["scores"]):
        for s, w in zip(got, want):
            torch.testing.assert_close(s, w, rtol=1e-4, atol=1e-9)
    for step, (m0, m1, want) in enumerate(zip(a["masks"], b["masks"], ref["masks"])):
        merged = {**m0, **m1}
        assert set(merged) == set(want)
        for key, mask in merged.items():
            assert torch.equal(mask, want[key]), f"step {step + 1}: mask {key} differs from one process"
        for key in set(m0) & set(m1):  # copies held by both ranks
            assert torch.equal(m0[key], m1[key])
    for e, w in zip(a["log"], ref["log"]):
        assert {k: v for k, v in e.items() if k != "mask_digests"} == \
            {k: v for k, v in w.items() if k != "mask_digests"}
        assert len(e["mask_digests"]) == 2
    assert any(not m.all() for m in a["masks"][-1].values())


def train(engine, part, x, y, start, stop, record):
    for g in range(start, stop):
        part.before_step(g)
        pred, aux = engine(x[g])
        engine.backward(F.mse_loss(pred, y[g]) + 0.01 * aux)
        engine.step()
        entry = part.after_step(g + 1)
        if entry is not None:
            record.append((entry, masks_by_expert(engine.module)))


def checkpoint_run(ckpt_dir, phase):
    rank = torch.distributed.get_rank()
    x, y = data(8, ROWS, seed=20 + rank)
    cfg = PartitionConfig(ratio=0.4, warmup_steps=2, interval=2, steps=3)
    adamw = lambda p: torch.optim.AdamW(p, lr=1e-2)  # noqa: E731
    model = PToy(ep_size=2, seed=0 if phase == "full" else 99)
    engine = build_engine(model, ds_config(2, ROWS), optimizer=adamw)
    part = Partitioner(engine.module, cfg, engine)
    record = []
    if phase == "full":
        train(engine, part, x, y, 0, 5, record)
        engine.save_checkpoint(ckpt_dir, tag="g5")
        part.save(ckpt_dir, "g5")
        saved = masks_by_expert(model)
        train(engine, part, x, y, 5, 8, record)
        return dict(record=record, saved=saved, log=part.log)
    engine.load_checkpoint(ckpt_dir, tag="g5")
    part.load(ckpt_dir, "g5")
    loaded = masks_by_expert(model)
    train(engine, part, x, y, 5, 8, record)
    files = {f: list(torch.load(os.path.join(ckpt_dir, "g5", f), weights_only=False).get("module", {}).keys())
             if f.startswith("mp_rank") else list(torch.load(os.path.join(ckpt_dir, "g5", f),
                                                             weights_only=False).keys())
             for f in os.listdir(os.path.join(ckpt_dir, "g5")) if f.endswith("model_states.pt")}
    return dict(record=record, loaded=loaded, log=part.log, files=files)


def test_checkpoint_mid_schedule_resumes_identically(pool, tmp_path):
    full = pool.run(checkpoint_run, str(tmp_path), "full")
    resumed = pool.run(checkpoint_run, str(tmp_path), "resume")
    for r in range(2):
        f, res = full[r], resumed[r]
        assert [e["global_step"] for e, _ in f["record"]] == [4, 6, 8]
        for key, mask in f["saved"].items():
            assert torch.equal(mask, res["loaded"][key]), f"rank {r}: mask {key} not restored by DeepSpeed"
        assert any(not m.all() for m in res["loaded"].values())
        assert len(res["record"]) == 2
        for (e1, m1), (e2, m2) in zip(f["record"][1:], res["record"]):
            assert e1 == e2
            for key in m1:
                assert torch.equal(m1[key], m2[key]), f"rank {r} step {e1['step']}: {key}"
        assert f["log"] == res["log"]
    files = resumed[0]["files"]
    # Shared masks travel in the model-states file, per-expert masks in the per-expert files.
    assert "moes.0.pad.fc1.mask" in files["mp_rank_00_model_states.pt"]
    assert not any(k.startswith("moes.1") and k.endswith(".mask") for k in files["mp_rank_00_model_states.pt"])
    expert_files = [f for f in files if "expert" in f and f.startswith("layer_1_")]
    assert len(expert_files) == 4
    assert all(any(k.endswith("fc1.mask") for k in files[f]) for f in expert_files)
    assert sorted(f for f in os.listdir(tmp_path / "g5") if f.startswith("padnet_partition")) == \
        ["padnet_partition_rank0.pt", "padnet_partition_rank1.pt"]


def corrupt_run(ep, layer, who):
    """Mask entry 3 of one copy flipped on rank ``who`` only, then the next partition step's check."""
    rank = torch.distributed.get_rank()
    x, y = data(4, ROWS, seed=30 + rank)
    model = PToy(ep_size=ep)
    engine = build_engine(model, ds_config(1, ROWS), optimizer=lambda p: torch.optim.SGD(p, lr=0.05))
    part = Partitioner(engine.module, PartitionConfig(ratio=0.5, warmup_steps=0, interval=1, steps=3), engine)
    train(engine, part, x, y, 0, 1, [])
    if rank == who:
        moe = model.moes[layer]
        unit = moe.pad_units()[1]
        mask = moe.masks(unit)[-1]
        mask.view(-1)[3] = ~mask.view(-1)[3]
    try:
        train(engine, part, x, y, 1, 2, [])
    except RuntimeError as err:
        return str(err)
    return "no error"


@pytest.mark.parametrize("ep, layer, who, where", [
    (2, 0, 1, "layer moes.0 unit moes.0.pad.fc2:"),  # the shared mask, changed on rank 1
    (1, 1, 0, "layer moes.1 unit moes.1.pad.fc2 expert 3"),  # expert 3's own mask, changed on rank 0
], ids=["shared-mask", "expert-mask"])
def test_mask_corrupted_on_one_rank_is_detected_on_every_rank(pool, ep, layer, who, where):
    results = pool.run(corrupt_run, ep, layer, who, timeout=200)
    for msg in results:
        assert "before partition step 2" in msg and where in msg, msg
    if layer == 0:
        assert "ranks [0] hold" in results[0] and "ranks [1] hold" in results[0]
    assert results[0] == results[1]


def before_training_run():
    rank = torch.distributed.get_rank()
    x, y = data(3, ROWS, seed=40 + rank)
    model = PToy(ep_size=2, perturb=0.05)
    engine = build_engine(model, ds_config(2, ROWS), optimizer=lambda p: torch.optim.AdamW(p, lr=1e-2))
    start = params(model)
    cfg = PartitionConfig(ratio=0.5, mode="before_training", perturb_std=0.05, steps=2, scoring_batches=2)
    part = Partitioner(engine.module, cfg, engine)
    entries = part.run_before_training(engine, [(x[i], y[i]) for i in range(3)],
                                       lambda eng, b: F.mse_loss(eng(b[0])[0], b[1]))
    unchanged = all(torch.equal(p, start[n]) for n, p in model.named_parameters())
    grads = [n for n, p in model.named_parameters() if p.grad is not None and p.grad.abs().sum() > 0]
    pred, aux = engine(x[0])
    engine.backward(F.mse_loss(pred, y[0]))
    engine.step()
    moved = any(not torch.equal(p, start[n]) for n, p in model.named_parameters())
    overall = part.overall_ratio()
    extra = {}
    for method in ("magnitude", "random"):
        p2 = Partitioner(engine.module, PartitionConfig(ratio=0.3, warmup_steps=0, interval=1, steps=1,
                                                        method=method, scope="layer"), engine)
        extra[method] = p2.after_step(1)
    return dict(entries=entries, unchanged=unchanged, grads=grads, moved=moved, training=model.training,
                overall=overall, extra=extra)


def test_before_training_partitions_without_touching_weights(pool):
    r0, r1 = pool.run(before_training_run)
    assert r0["entries"] == r1["entries"] and r0["extra"] == r1["extra"]
    assert [e["step"] for e in r0["entries"]] == [1, 2]
    assert r0["entries"][0]["ratio"] == pytest.approx(0.5 ** 0.5)
    for r in (r0, r1):
        assert r["unchanged"] and not r["grads"] and r["training"] and r["moved"]
        assert abs(r["overall"] - 0.5) < 1e-3
    for method, entry in r0["extra"].items():
        for name, layer in entry["layers"].items():
            assert abs(layer["ratio"] - 0.3) < 0.01, (method, name, layer)
