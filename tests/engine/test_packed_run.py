"""A run that packs after its last partition step (partition.pack), on 2 real ranks: it loses nothing,
resumes exactly from its packed checkpoints, starts others (init_from), and refuses bad input."""
import hashlib

import pytest
import torch

from tests.checkpoints import resign
from tests.engine.test_train import TINY, glue, read_events

STEPS = ["train.steps=12", "train.checkpoint_every=10", "train.eval_every=0", "train.keep_checkpoints=0"]
KEYS = ("history", "partition_log", "dynamic_ratio", "steps", "eval", "packed", "model_state_bytes",
        "checkpoint_bytes", "layers")


def train_in_ranks(args):
    from padnet_ds.engine.config import load_config
    from padnet_ds.engine.trainer import train

    summary = train(load_config("configs/smoke.yaml", args))
    return {k: summary[k] for k in KEYS}


def error_in_ranks(args):
    from padnet_ds.engine.config import load_config
    from padnet_ds.engine.trainer import Trainer
    from padnet_ds.settings import ConfigError

    try:
        Trainer(load_config("configs/smoke.yaml", args))
    except ConfigError as err:
        return str(err)
    return "no error"


def files_of(folder):
    return {p.relative_to(folder).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def runs(pool, tmp_path_factory, shared_dir):
    """The same run twice: packing after its last partition step (step 8 of 12) and never packing."""
    root = tmp_path_factory.mktemp("packed_run")
    common = [*TINY, *glue(shared_dir, "MRPC", 384), *STEPS]
    packed, _ = pool.run(train_in_ranks, [f"output_dir={root}/packed", *common])
    dense, _ = pool.run(train_in_ranks, [f"output_dir={root}/dense", *common, "partition.pack=false"])
    return root, common, packed, dense


def test_packing_after_the_last_partition_step_loses_nothing(runs):
    root, _, packed, dense = runs
    assert packed["packed"] is True and dense["packed"] is False
    assert [e["global_step"] for e in packed["partition_log"]] == [6, 8]
    assert [e.step for e in read_events(root / "packed" / "tensorboard").Scalars("partition/packed")] == [8]
    losses = {run: [h["loss"] for h in r["history"]] for run, r in (("packed", packed), ("dense", dense))}
    assert len(losses["packed"]) == 12
    torch.testing.assert_close(losses["packed"], losses["dense"], rtol=1e-5, atol=1e-6)
    assert [e["mask_digests"] for e in packed["partition_log"]] == [e["mask_digests"] for e in dense["partition_log"]]
    assert packed["dynamic_ratio"] == dense["dynamic_ratio"] and packed["layers"].keys() == dense["layers"].keys()
    for unit, values in packed["layers"].items():
        assert values == pytest.approx(dense["layers"][unit], abs=1e-6), unit
    assert packed["eval"] == pytest.approx(dense["eval"], abs=1e-6)
    # the same model in either layout: both runs report the same sizes, the packed one measured on disk
    assert packed["model_state_bytes"] == dense["model_state_bytes"]
    # per rank (ZeRO 2, fp32, 2 ranks, ep 2: 2 local experts per layer, their data-parallel size 1): each
    # shared-mask unit of P = 32 x 64 entries drops (1-r)P values of 2 experts at 4+4+12 bytes (weight, grad,
    # fp32 master + 2 Adam moments), rP static values at 4 + 4/2 + 12/2 bytes, and trades a P-byte mask for 4rP
    # bytes of int32 positions and its 16-byte dense shape
    p = 32 * 64
    saved = sum(2 * (p - round(u["dynamic_ratio"] * p)) * 20 + round(u["dynamic_ratio"] * p) * 12
                + p - 4 * round(u["dynamic_ratio"] * p) - 16 for u in packed["layers"].values())
    state = packed["model_state_bytes"]
    assert state["unpacked"] - state["packed"] == saved
    on_disk_packed, on_disk_dense = packed["checkpoint_bytes"], dense["checkpoint_bytes"]
    assert on_disk_packed["packed"] < on_disk_dense["unpacked"] - saved  # the checkpoint keeps the moments too
    assert on_disk_packed["packed"] == pytest.approx(on_disk_dense["packed"], rel=0.02)  # measured vs estimated
    assert on_disk_packed["unpacked"] == pytest.approx(on_disk_dense["unpacked"], rel=0.02)


def test_a_packed_checkpoint_resumes_exactly(pool, runs):
    root, common, packed, _ = runs
    cut = [f"output_dir={root}/cut", *common]
    first, _ = pool.run(train_in_ranks, [*cut, "train.stop_at=10"])
    assert first["packed"] and first["steps"] == 10
    resumed, _ = pool.run(train_in_ranks, [*cut, "resume=true"])
    got, want = ([h["loss"] for h in r["history"]] for r in (resumed, packed))
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-7)
    assert resumed["eval"] == pytest.approx(packed["eval"])


def test_init_from_starts_a_packed_fine_tune_from_either_layout(pool, runs):
    root, common, packed, dense = runs
    for source in ("packed", "dense"):
        # one step at a learning rate too small to move anything: the eval is the source run's
        args = [f"output_dir={root}/from_{source}", f"init_from={root}/{source}", *common, "partition.ratio=1.0",
                "train.steps=1", "optim.lr=1e-12"]
        run, _ = pool.run(train_in_ranks, args)
        assert run["packed"] is True and run["partition_log"] == [] and run["steps"] == 1
        assert run["dynamic_ratio"] == pytest.approx(packed["dynamic_ratio"])
        assert run["eval"] == pytest.approx((packed if source == "packed" else dense)["eval"], abs=1e-6)


def test_before_training_imp_packs_before_the_first_optimizer_step(pool, runs):
    root, common, _, _ = runs
    before = [*common, "partition.mode=before_training", "partition.perturb_std=0.05", "partition.scoring_batches=2",
              "train.steps=6", "train.checkpoint_every=0"]
    packed, _ = pool.run(train_in_ranks, [f"output_dir={root}/bt_packed", *before])
    dense, _ = pool.run(train_in_ranks, [f"output_dir={root}/bt_dense", *before, "partition.pack=false"])
    assert packed["packed"] and [e["global_step"] for e in packed["partition_log"]] == [0, 0]
    assert [e.step for e in read_events(root / "bt_packed" / "tensorboard").Scalars("partition/packed")] == [0]
    torch.testing.assert_close([h["loss"] for h in packed["history"]], [h["loss"] for h in dense["history"]],
                               rtol=1e-5, atol=1e-6)
    assert [e["mask_digests"] for e in packed["partition_log"]] == [e["mask_digests"] for e in dense["partition_log"]]


def test_bad_packing_input_fails_on_every_rank_and_changes_nothing(pool, runs):
    import shutil

    root, common, _, _ = runs
    before = files_of(root / "packed")
    msgs = pool.run(error_in_ranks, [f"output_dir={root}/packed", *common, "resume=true", "partition.pack=false"])
    assert all("partition.pack=false, but the checkpoint" in m and "is packed" in m for m in msgs), msgs
    fresh = root / "from_bad"
    msgs = pool.run(error_in_ranks, [f"output_dir={fresh}", f"init_from={root}/packed", *common, "partition.ratio=1.0",
                                     "partition.pack=false"])
    assert all("is packed" in m for m in msgs), msgs
    assert not fresh.exists(), "nothing may be written before the checks"
    assert files_of(root / "packed") == before
    damaged = root / "damaged"
    shutil.copytree(root / "packed", damaged)
    tag = (damaged / "checkpoints" / "latest").read_text().strip()
    expert_file = damaged / "checkpoints" / tag / "layer_1_expert_3_mp_rank_00_model_states.pt"
    state = torch.load(expert_file, weights_only=False)
    key = next(k for k in state if k.endswith("fc2.values"))
    state[key] = state[key][1:]
    torch.save(state, expert_file)
    resign(expert_file.parent, expert_file.name)
    before = files_of(damaged)
    msgs = pool.run(error_in_ranks, [f"output_dir={damaged}", *common, "resume=true"])
    assert all(f"{key} holds {state[key].numel()} packed values but its mask" in m for m in msgs), msgs
    assert files_of(damaged) == before


@pytest.mark.parametrize("values, match", [
    (dict(partition=dict(pack=True)), r"partition.pack=True with partition.ratio=1.0 has nothing to pack"),
    (dict(partition=dict(pack="yes")), r"partition.pack='yes' must be auto, true or false"),
    (dict(init_from="runs/x", resume=True), r"init_from='runs/x' starts a new run and resume=true continues one"),
    (dict(init_from="runs/x", partition=dict(ratio=0.5)), r"partition.ratio=0.5 with init_from=runs/x would "
                                                           r"partition again"),
])
def test_packing_settings_that_cannot_work_name_the_key(values, match):
    from padnet_ds.engine.config import config_from_dict
    from padnet_ds.settings import ConfigError

    with pytest.raises(ConfigError, match=match):
        config_from_dict(values)
