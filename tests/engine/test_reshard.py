"""Resuming on another cluster shape: a run stopped at one layout (world size, ep_size, ZeRO stage) and resumed at
another, converted on the fly (``resume=true``) or by ``padnet-ds reshard``, has the uninterrupted run's per-step
losses (to 1e-5, fp32), partition steps and masks, in the configuration where that can hold (no dropout, no gate
noise, nothing dropped by capacity, the same micro-batches). Bad input: clear errors before anything is written."""
import hashlib
import json
import logging
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from padnet_ds.commit import complete_tags, verify_tag
from padnet_ds.engine.checkpoint_reader import read_checkpoint
from padnet_ds.engine.inspect import inspect_checkpoint
from padnet_ds.engine.optim_files import zero_file
from padnet_ds.engine.reshard import reshard
import padnet_ds.engine.reshard as reshard_module
from padnet_ds.errors import CheckpointError
from padnet_ds.export.writer import export_run
from padnet_ds.pad.packed import mask_of
from padnet_ds.settings import ConfigError
from padnet_ds.testing import run_ranks

REPO = Path(__file__).resolve().parents[2]
# The smoke model, tiny, with nothing random that depends on the rank: no dropout, no gate noise, no capacity.
EXACT = ["model.random_init={hidden_size: 32, num_hidden_layers: 2, num_attention_heads: 2, intermediate_size: 64, "
         "hidden_dropout_prob: 0.0, attention_probs_dropout_prob: 0.0}", "model.max_length=32",
         "moe.top2_2nd_expert_sampling=false", "moe.drop_tokens=false", "data.max_train_examples=256",
         "partition.warmup_steps=4", "partition.interval=2", "partition.steps=2", "train.log_every=1",
         "train.steps=10", "train.eval_every=0", "train.checkpoint_every=0", "train.micro_batch_size=4",
         "ds_config=ds_configs/zero2_fp32.json"]
STOP = 5  # mid-schedule: partition step 1 scores steps 5-6, so scores are accumulated at the cut


def train_in_ranks(config, args):
    """One run on these ranks; what the comparison needs, and the log lines about the checkpoint's layout."""
    from padnet_ds.engine.config import load_config
    from padnet_ds.engine.trainer import train

    lines = []
    handler = logging.Handler()
    handler.emit = lambda record: lines.append(record.getMessage())
    logger = logging.getLogger("padnet_ds")
    level = logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    try:
        summary = train(load_config(config, args))
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)
    return {"losses": {h["step"]: h["loss"] for h in summary["history"]}, "log": lines,
            "partitions": [{k: e[k] for k in ("step", "global_step", "ratio", "achieved", "layers")}
                           for e in summary["partition_log"]]}


def runs_in_ranks(*runs):
    return [train_in_ranks(*run) for run in runs]


def final_masks(run):
    """{unit: bool mask} of the run's latest checkpoint: its masks, or a packed one's positions as masks."""
    state = read_checkpoint(str(run)).replicated
    masks = {k[: -len(".mask")]: t for k, t in state.items() if k.endswith(".mask")}
    masks.update({k[: -len(".positions")]: mask_of(t, state[k[: -len("positions")] + "dense_shape"].tolist())
                  for k, t in state.items() if k.endswith(".positions")})
    return masks


def digest(folder):
    return {p.relative_to(folder).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(Path(folder).rglob("*")) if p.is_file()}


def assert_same_run(got, full, what):
    assert sorted(got["losses"]) == list(range(1, 11)), what
    torch.testing.assert_close([got["losses"][s] for s in range(1, 11)], [full["losses"][s] for s in range(1, 11)],
                               rtol=0, atol=1e-5, msg=lambda m: f"{what}: {m}")
    assert [p["global_step"] for p in full["partitions"]] == [6, 8]
    assert got["partitions"] == full["partitions"], what


@pytest.fixture(scope="module")
def stopped(tmp_path_factory, pool):
    """The uninterrupted 2-rank run (ep_size 2, ZeRO 2) and the same run stopped at step 5, on one rank pool."""
    root = tmp_path_factory.mktemp("reshard")
    full, cut = pool.run(runs_in_ranks, ("configs/smoke.yaml", [f"output_dir={root}/full", *EXACT]),
                         ("configs/smoke.yaml", [f"output_dir={root}/cut", *EXACT, f"train.stop_at={STOP}"]))[0]
    assert sorted(cut["losses"]) == list(range(1, STOP + 1)) and cut["partitions"] == []
    return root, full


def test_a_2_rank_ep2_zero2_run_resumes_on_1_rank_ep1_exactly_on_the_fly_and_resharded(stopped):
    root, full = stopped
    source = digest(root / "cut")
    out = root / "out1"
    done = reshard(str(root / "cut"), str(out), world=1, ep_size=1)
    assert "train.grad_accum=2" in done["batch"]
    assert digest(root / "cut") == source, "reshard modified the source checkpoint"
    report = inspect_checkpoint(str(out))
    assert (report["world_size"], report["ep_size"], report["zero_stage"]) == (1, 1, 2)
    assert report["optimizer_files"] == "padnet-ds portable" and report["resharded_from"]["world_size"] == 2
    before, after = read_checkpoint(str(root / "cut")), read_checkpoint(str(out))  # what export reads
    assert sorted(before.replicated) == sorted(after.replicated) and before.experts.keys() == after.experts.keys()
    assert all(torch.equal(before.replicated[k], after.replicated[k]) for k in before.replicated)
    assert inspect_checkpoint(str(root / "cut"))["world_size"] == 2
    for run in ("cut", "out1"):  # export reads both layouts, to the same served weights
        export_run(str(root / run), str(root / f"export-{run}"))
    assert (root / "export-cut" / "model.safetensors").read_bytes() == \
        (root / "export-out1" / "model.safetensors").read_bytes()

    shutil.copytree(root / "cut", root / "fly")
    fly, resharded = run_ranks(runs_in_ranks, 1,
                               ("configs/smoke.yaml", [f"output_dir={root}/fly", *EXACT, "resume=true", "moe.ep_size=1",
                                                       "train.grad_accum=2"]),
                               (str(out / "config.yaml"), ["resume=true"]))[0]
    for got, what in ((fly, "resumed on the fly"), (resharded, "resumed from padnet-ds reshard")):
        assert_same_run(got, full, what)
        assert any("converting its optimizer and partitioner state on the fly" in line for line in got["log"]), what
    reference = final_masks(root / "full")
    for run in ("fly", "out1"):
        masks = final_masks(root / run)
        assert masks.keys() == reference.keys() and all(torch.equal(masks[k], reference[k]) for k in masks), run
    assert any(not m.all() for m in reference.values())


LAYOUTS = {  # the stopped 2-rank run resumed on the same 2 ranks with
    "ep_size 2 -> 1": ["moe.ep_size=1"],
    "ZeRO 2 -> 1": ["ds_config=ds_configs/zero1_fp32.json"],
    "ZeRO 2 -> 0, ep_size 2 -> 1": ["ds_config=ds_configs/zero0_fp32.json", "moe.ep_size=1"],
}


@pytest.mark.slow
@pytest.mark.parametrize("layout", sorted(LAYOUTS))
def test_resume_on_the_fly_at_another_ep_size_or_zero_stage(stopped, pool, layout):
    root, full = stopped
    run = root / layout.replace(" ", "_").replace(">", "").replace(",", "")
    shutil.copytree(root / "cut", run)
    got = pool.run(train_in_ranks, "configs/smoke.yaml", [f"output_dir={run}", *EXACT, "resume=true",
                                                          *LAYOUTS[layout]])[0]
    assert_same_run(got, full, layout)


@pytest.mark.slow
def test_one_rank_resumes_on_two_and_two_on_four_with_zero1_resharded(stopped, pool, tmp_path):
    root, full = stopped
    one = [*EXACT, "moe.ep_size=1", "train.grad_accum=2"]
    run_ranks(train_in_ranks, 1, "configs/smoke.yaml", [f"output_dir={tmp_path}/one", *one, f"train.stop_at={STOP}"])
    got = pool.run(train_in_ranks, "configs/smoke.yaml", [f"output_dir={tmp_path}/one", *EXACT, "resume=true"])[0]
    assert_same_run(got, full, "1 rank ep_size 1 -> 2 ranks ep_size 2")
    # 2 -> 4 ranks: the 2-rank run with grad_accum 2 (micro-batches of 2), resharded for 4 ranks, ep_size 4, ZeRO 1
    two = [*EXACT, "train.micro_batch_size=2", "train.grad_accum=2"]
    ref, _ = pool.run(runs_in_ranks, ("configs/smoke.yaml", [f"output_dir={tmp_path}/ref", *two]),
                      ("configs/smoke.yaml", [f"output_dir={tmp_path}/two", *two, f"train.stop_at={STOP}"]))[0]
    reshard(str(tmp_path / "two"), str(tmp_path / "four"), world=4, ep_size=4, zero_stage=1)
    got = run_ranks(train_in_ranks, 4, str(tmp_path / "four" / "config.yaml"), ["resume=true"])[0]
    assert_same_run(got, ref, "2 ranks ep_size 2 ZeRO 2 -> 4 ranks ep_size 4 ZeRO 1")


@pytest.mark.slow
def test_a_packed_checkpoint_resumes_at_another_layout_on_the_fly_and_resharded(stopped, pool, tmp_path):
    """Cut right after the last partition step packed the experts (partition.pack auto): the packed
    values go by global expert id with their positions, to 1 rank (reshard, ZeRO 1) and to ep_size 1
    on 2 ranks (on the fly)."""
    root, full = stopped
    pool.run(train_in_ranks, "configs/smoke.yaml", [f"output_dir={tmp_path}/cut", *EXACT, "train.stop_at=8"])
    assert inspect_checkpoint(str(tmp_path / "cut"))["packed"] and inspect_checkpoint(str(root / "full"))["packed"]
    source = digest(tmp_path / "cut")
    reshard(str(tmp_path / "cut"), str(tmp_path / "one"), world=1, ep_size=1, zero_stage=1)
    assert digest(tmp_path / "cut") == source and inspect_checkpoint(str(tmp_path / "one"))["packed"]
    one = run_ranks(train_in_ranks, 1, str(tmp_path / "one" / "config.yaml"), ["resume=true"])[0]
    fly = pool.run(train_in_ranks, "configs/smoke.yaml", [f"output_dir={tmp_path}/cut", *EXACT, "resume=true",
                                                          "moe.ep_size=1"])[0]
    reference = final_masks(root / "full")
    for got, run, what in ((one, "one", "packed, resharded to 1 rank ZeRO 1"), (fly, "cut", "packed, ep_size 2 -> 1")):
        assert_same_run(got, full, what)
        masks = final_masks(tmp_path / run)
        assert masks.keys() == reference.keys() and all(torch.equal(masks[k], reference[k]) for k in masks), what


# -- bad input ------------------------------------------------------------------------------------
def toy_checkpoint(root):
    """A DeepSpeed checkpoint of the toy PAD-MoE model (2 ranks, ep_size 2, ZeRO 2), written by padnet-ds's save."""
    import torch.distributed as dist

    from padnet_ds.engine import checkpoint
    from padnet_ds.engine.run_dir import RunDir
    from padnet_ds.engine.setup import build_engine
    from padnet_ds.engine.state import LoopState
    from padnet_ds.partition import PartitionConfig, Partitioner
    from tests.distributed.toy import Toy, batches, ds_config

    engine = build_engine(Toy(ep_size=2, dynamic=0.5), ds_config(2, 4),
                          optimizer=lambda p: torch.optim.AdamW(p, lr=1e-2))
    x, y = batches(2, 4, seed=dist.get_rank())
    for xb, yb in zip(x, y):
        pred, aux = engine(xb)
        engine.backward(torch.nn.functional.mse_loss(pred, yb) + 0.01 * aux)
        engine.step()
    part = Partitioner(engine.module, PartitionConfig(ratio=1.0), engine)
    checkpoint.save(engine, part, RunDir(root), LoopState(step=2), keep=0)


@pytest.fixture(scope="module")
def toy(tmp_path_factory, pool):
    root = tmp_path_factory.mktemp("toy")
    pool.run(toy_checkpoint, str(root))
    return root


def test_bad_layouts_and_an_existing_out_are_refused_before_anything_is_written(toy, tmp_path):
    source = digest(toy)
    cases = [((6, 3), ConfigError, "--ep-size 3 does not divide the 4 experts of MoE layer moe"),
             ((3, 2), ConfigError, "--world-size 3 is not divisible by --ep-size 2"),
             ((2, 2, 3), ConfigError, "--zero-stage 3")]
    for args, error, message in cases:
        with pytest.raises(error, match=message):
            reshard(str(toy), str(tmp_path / "out"), *args)
        assert not (tmp_path / "out").exists() and list(tmp_path.iterdir()) == []
    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "keep.txt").write_text("mine")
    with pytest.raises(ConfigError, match="OUT .*taken already exists"):
        reshard(str(toy), str(tmp_path / "taken"), 1, 1)
    assert [p.name for p in (tmp_path / "taken").iterdir()] == ["keep.txt"]
    assert digest(toy) == source
    done = reshard(str(toy), str(tmp_path / "ok"), 4, 2, 1)  # the same checkpoint, a good layout
    assert done["to"] == "4 ranks, ep_size 2, ZeRO 1, fp32"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ok", "taken"], "no staging folder left behind"


def test_out_is_committed_whole_with_a_manifest_or_not_at_all(toy, tmp_path, monkeypatch):
    """A reshard that fails while writing (here: the disk fills up at the optimizer files) leaves no OUT
    and no staging folder; one that finishes holds a committed tag whose manifest verifies."""
    source = digest(toy)

    def disk_full(*args):
        raise OSError(28, "No space left on device")

    with monkeypatch.context() as patch:
        patch.setattr(reshard_module, "write_portable", disk_full)
        with pytest.raises(OSError, match="No space left"):
            reshard(str(toy), str(tmp_path / "out"), 1, 1)
    assert list(tmp_path.iterdir()) == [] and digest(toy) == source
    reshard(str(toy), str(tmp_path / "out"), 1, 1)
    ckpt = tmp_path / "out" / "checkpoints"
    assert complete_tags(ckpt) == ["step2"] and (ckpt / "latest").read_text() == "step2"
    manifest = verify_tag(ckpt / "step2")
    assert manifest["meta"]["world_size"] == 1
    assert manifest["meta"]["resharded_from"] == str(toy / "checkpoints" / "step2")
    written = sorted(p.name for p in (ckpt / "step2").iterdir() if p.name != "padnet_manifest.json")
    assert sorted(manifest["files"]) == written and any(n.startswith("padnet_optim_") for n in written)


def test_a_missing_or_truncated_shard_is_named_and_nothing_is_written(toy, tmp_path):
    damaged = tmp_path / "damaged"
    shutil.copytree(toy, damaged)
    tag = damaged / "checkpoints" / "step2"
    shard = zero_file(tag, 1, False)
    shard.write_bytes(shard.read_bytes()[:1000])
    truncated = digest(damaged)
    with pytest.raises(CheckpointError, match="zero_pp_rank_1_mp_rank_00_optim_states.pt has 1000 bytes, its "
                                              "manifest says"):
        reshard(str(damaged), str(tmp_path / "out"), 1, 1)
    assert digest(damaged) == truncated
    shard.unlink()
    missing = digest(damaged)
    env = dict(os.environ, OMP_NUM_THREADS="1")
    res = subprocess.run([sys.executable, "-m", "padnet_ds.cli", "reshard", str(damaged), str(tmp_path / "out"),
                          "--world-size", "1", "--ep-size", "1"], cwd=REPO, capture_output=True, text=True,
                         timeout=300, env=env)
    assert res.returncode == 2, res.stderr[-2000:]
    assert "zero_pp_rank_1_mp_rank_00_optim_states.pt is missing" in res.stderr and "Traceback" not in res.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["damaged"] and digest(damaged) == missing


def test_the_cli_reshards_and_inspect_reports_the_new_layout(toy, tmp_path):
    out = tmp_path / "out"
    env = dict(os.environ, OMP_NUM_THREADS="1")
    res = subprocess.run([sys.executable, "-m", "padnet_ds.cli", "reshard", str(toy), str(out), "--world-size", "1",
                          "--ep-size", "1", "--zero-stage", "0"], cwd=REPO, capture_output=True, text=True,
                         timeout=300, env=env)
    assert res.returncode == 0, res.stderr[-3000:]
    assert "-> " + str(out) in res.stdout and "1 rank, ep_size 1, ZeRO 0, fp32" in res.stdout
    info = subprocess.run([sys.executable, "-m", "padnet_ds.cli", "inspect", str(out), "--json"], cwd=REPO,
                          capture_output=True, text=True, timeout=300, env=env)
    assert info.returncode == 0, info.stderr[-3000:]
    report = json.loads(info.stdout)
    assert (report["world_size"], report["ep_size"], report["zero_stage"]) == (1, 1, 0)
    assert json.loads((out / "ds_config.json").read_text())["zero_optimization"]["stage"] == 0


@pytest.mark.slow
def test_a_2_rank_ep1_zero1_run_resumes_at_ep2_zero2_on_the_same_ranks(stopped, pool, tmp_path):
    """ep_size 1 -> 2 and ZeRO 1 -> 2 at a fixed world size (the way back of the 2 -> 1 cases above)."""
    root, full = stopped
    cut = [*EXACT, "moe.ep_size=1", "ds_config=ds_configs/zero1_fp32.json"]
    pool.run(train_in_ranks, "configs/smoke.yaml", [f"output_dir={tmp_path}/run", *cut, f"train.stop_at={STOP}"])
    assert inspect_checkpoint(str(tmp_path / "run"))["ep_size"] == 1
    got = pool.run(train_in_ranks, "configs/smoke.yaml", [f"output_dir={tmp_path}/run", *EXACT, "resume=true"])[0]
    assert_same_run(got, full, "2 ranks: ep_size 1 ZeRO 1 -> ep_size 2 ZeRO 2")
    assert any("converting its optimizer and partitioner state on the fly" in line for line in got["log"])


# -- through the CLI and the deepspeed launcher: the smoke config with nothing random per rank ---------------------
SMOKE = ["train", "configs/smoke.yaml", "model.random_init={hidden_size: 64, num_hidden_layers: 2, "
         "num_attention_heads: 2, intermediate_size: 128, hidden_dropout_prob: 0.0, attention_probs_dropout_prob: 0.0}",
         "moe.top2_2nd_expert_sampling=false", "moe.drop_tokens=false", "train.log_every=1"]
SMOKE_STOP = 12  # partition steps after steps 15, 20 and 25: none has happened at the cut


def launch(nproc, out, *args):
    """``launch/deepspeed.sh`` (the deepspeed launcher) with ``nproc`` local ranks; the run's summary.json and log."""
    from tests.launch.launchers import LAUNCH, check_run, launch_env

    log = Path(f"{out}-{len(list(Path(out).parent.glob('*.log')))}.log")
    with open(log, "w") as f:
        p = subprocess.Popen([str(LAUNCH / "deepspeed.sh"), *SMOKE, f"output_dir={out}", *args], cwd=REPO,
                             env=launch_env(NPROC=str(nproc)), stdout=f, stderr=subprocess.STDOUT)
    return check_run([p], Path(out), log), log.read_text()


@pytest.mark.slow
def test_the_smoke_config_stopped_on_2_ranks_resumes_on_1_through_the_cli(tmp_path):
    full, _ = launch(2, tmp_path / "full")
    cut, _ = launch(2, tmp_path / "run", f"train.stop_at={SMOKE_STOP}")
    assert [h["step"] for h in cut["history"]] == list(range(1, SMOKE_STOP + 1)) and cut["partition_log"] == []
    got, log = launch(1, tmp_path / "run", "resume=true", "moe.ep_size=1", "train.grad_accum=2")
    assert "converting its optimizer and partitioner state on the fly" in log
    steps = list(range(1, 41))
    assert [h["step"] for h in got["history"]] == steps == [h["step"] for h in full["history"]]
    torch.testing.assert_close([h["loss"] for h in got["history"]], [h["loss"] for h in full["history"]],
                               rtol=0, atol=1e-5)
    # The same partition steps. Masks: the same at partition steps 1 and 2; at step 3 the score sums,
    # added in another order across the cut (s_0 + s_1 before it, then the rest), differ in their last
    # bits, and a weight tied to them at the global threshold may change sides (here 2 of 32768; an
    # uninterrupted 1-rank run has the 2-rank run's masks exactly).
    assert [p["global_step"] for p in full["partition_log"]] == [15, 20, 25]
    keys = ("step", "global_step", "ratio", "achieved")
    assert [{k: p[k] for k in keys} for p in got["partition_log"]] == [{k: p[k] for k in keys}
                                                                     for p in full["partition_log"]]
    assert [p["mask_digests"][0] for p in got["partition_log"][:2]] == [p["mask_digests"][0]
                                                                       for p in full["partition_log"][:2]]
    reference, masks = final_masks(tmp_path / "full"), final_masks(tmp_path / "run")
    assert masks.keys() == reference.keys()
    changed = sum(int((masks[k] != reference[k]).sum()) for k in masks)
    assert changed <= 4, f"{changed} of {sum(m.numel() for m in masks.values())} mask entries differ"
    assert inspect_checkpoint(str(tmp_path / "run"))["world_size"] == 1
