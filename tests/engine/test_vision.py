"""The image task: PAD DY-Conv ResNets trained by the same engine as text (2 real ranks)."""
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from padnet_ds.conv.dyconv import dyconv_modules, temperature_at
from padnet_ds.engine.config import ConfigError, load_config
from padnet_ds.testing import run_ranks

REPO = Path(__file__).resolve().parents[2]
# A tiny PAD ResNet-18 (8/16/32/64 channels, K=4) on MNIST-5k; partitions after steps 30 and 40.
STEPS, MICRO, TRAIN_ROWS = 60, 32, 4000
TINY = ["extra.vision.width=0.125", "extra.vision.anneal_epochs=2", "partition.ratio=0.3", "partition.mode=in_training",
        "partition.warmup_steps=20", "partition.interval=10", "partition.steps=2", f"train.steps={STEPS}",
        f"train.micro_batch_size={MICRO}", "train.log_every=10", "train.eval_every=0", "train.checkpoint_every=0",
        "optim.lr=3e-3", "optim.warmup_ratio=0.1"]


def train_in_ranks(args):
    from padnet_ds.engine.trainer import train

    summary = train(load_config("configs/mnist_pad.yaml", args))
    return {k: summary[k] for k in ("partition_log", "dynamic_ratio", "layers", "steps", "eval", "history")}


@pytest.fixture(scope="module")
def pad_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("vision") / "run"
    ranks = run_ranks(train_in_ranks, 2, [f"output_dir={out}", *TINY])
    return out, ranks


def test_two_rank_pad_resnet_partitions_to_30_percent_with_identical_masks_and_learns(pad_run):
    out, (r0, r1) = pad_run
    assert r0["steps"] == STEPS
    assert len(r0["partition_log"]) == 2
    for entry in r0["partition_log"]:
        assert len(entry["mask_digests"]) == 2 and entry["mask_digests"][0] == entry["mask_digests"][1]
    assert r0["partition_log"][-1]["mask_digests"] == r1["partition_log"][-1]["mask_digests"]
    assert r0["dynamic_ratio"] == pytest.approx(0.3, abs=0.01)
    # ResNet-18 has 16 residual-block convs, each one PAD unit
    assert len([n for n in r0["layers"] if n.endswith(".pad")]) == 16
    assert r0["eval"] == r1["eval"]
    from padnet_ds.engine.image_task import load_data, vision_config

    labels = load_data(vision_config(load_config(str(out / "config.yaml")))).test.tensors[1]
    majority = float(torch.bincount(labels).max()) / len(labels)
    print(f"tiny PAD ResNet-18 on MNIST-5k, {STEPS} steps: test accuracy {r0['eval']['accuracy']:.4f} "
          f"(majority class {majority:.4f})")
    assert r0["eval"]["accuracy"] > max(0.5, 4 * majority)


def test_temperature_annealing_follows_the_epoch_and_is_checkpointed(pad_run):
    from padnet_ds.engine.image_task import build_model, load_data, vision_config
    from padnet_ds.engine.packing import is_packed_state, pack_like

    out, (r0, _) = pad_run
    cfg = load_config(str(out / "config.yaml"))
    v = vision_config(cfg)
    batches = (TRAIN_ROWS // 2) // MICRO  # per rank and epoch (drop_last)
    last = STEPS - 1  # the hook runs before each step with epoch + batch / batches
    expected = temperature_at(last // batches + (last % batches) / batches, 30.0, 1.0, 2)
    assert 1.0 < expected < 30.0
    data = load_data(v)
    model = build_model(v, data)
    assert {m.temperature for m in dyconv_modules(model)} == {30.0}
    tag = (out / "checkpoints" / "latest").read_text().strip()
    state = torch.load(out / "checkpoints" / tag / "mp_rank_00_model_states.pt", map_location="cpu",
                       weights_only=False)["module"]
    assert is_packed_state(state), "the run packs after its last partition step (partition.pack: auto)"
    pack_like(model, state, "the vision run's checkpoint")
    model.load_state_dict(state)
    temps = {m.temperature for m in dyconv_modules(model)}
    assert len(temps) == 1 and temps.pop() == pytest.approx(expected, rel=1e-6)
    # BatchNorm statistics are the same on both ranks, so the checkpoint reproduces the run's eval
    model.eval()
    x, y = data.test.tensors
    with torch.no_grad():
        acc = float((model(pixel_values=x).logits.argmax(-1) == y).float().mean())
    assert acc == pytest.approx(r0["eval"]["accuracy"], abs=1e-6)


def test_inspect_reports_dyconv_kernel_counts(pad_run):
    out, (r0, _) = pad_run
    res = subprocess.run([sys.executable, "-m", "padnet_ds.cli", "inspect", str(out), "--json"], cwd=REPO,
                         capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr[-3000:]
    report = json.loads(res.stdout)
    assert len(report["dyconv_layers"]) == 16 and report["moe_layers"] == []
    assert report["dynamic_ratio"] == pytest.approx(r0["dynamic_ratio"], abs=1e-6)
    for u in report["units"]:
        assert u["kind"] == "dyconv" and u["factors"] == 4
        p = 1
        for d in u["shape"]:
            p *= d
        r = u["dynamic_ratio"]
        assert u["params_fully_dynamic"] == 4 * p
        assert u["params_pad"] == pytest.approx((1 - r) * p + 4 * r * p)
    # the spec's worked numbers: K=4, r=0.3 overall -> 1.9P of the fully dynamic 4P
    assert report["pad_fraction_of_fully_dynamic"] == pytest.approx(1.9 / 4, abs=0.01)


def test_image_model_forward_loss_and_hook():
    from padnet_ds.engine.image_task import temperature_hook, vision_config
    from padnet_ds.models.image import ImageClassifier
    from padnet_ds.models.resnet import build_resnet

    cfg = load_config("configs/mnist_pad.yaml", ["extra.vision.anneal_epochs=4"])
    v = vision_config(cfg)
    model = ImageClassifier(build_resnet(18, "pad", 2, True, 1, 10, width=0.0625), torch.zeros(1), torch.ones(1),
                            30.0)
    out = model(pixel_values=torch.rand(3, 1, 28, 28), labels=torch.tensor([0, 1, 2]))
    assert out.logits.shape == (3, 10) and out.loss.ndim == 0
    out.loss.backward()
    hook = temperature_hook(v)
    for epoch, tau in ((0.0, 30.0), (2.0, 15.5), (4.0, 1.0), (9.0, 1.0)):
        hook(model, 123, epoch)
        assert {m.temperature for m in dyconv_modules(model)} == {tau}
        assert float(model.temperature) == tau


@pytest.mark.parametrize("override, message", [
    (["extra.vision.colour=RGB"], "unknown config key extra.vision.colour"),
    (["extra.vision.conv=dyconv"], "extra.vision.conv='dyconv' is not one of pad, dynamic, static"),
    (["extra.vision.depth=34"], "extra.vision.depth=34 is not one of 18, 50"),
    (["extra.vision.depth=eighteen"], "extra.vision.depth='eighteen' is not one of 18, 50"),
    (["extra.vision.width=0"], "extra.vision.width=0 must be > 0"),
    (["extra.vision.temperature_end=0"], "extra.vision.temperature_end=0 must be > 0"),
    (["extra.vision.bn_momentum=2"], "extra.vision.bn_momentum=2 must be in (0, 1]"),
    (["extra.vision.num_kernels=true"], "extra.vision.num_kernels: expected an integer, got True"),
    (["extra.vision.static_init=zeros"], "extra.vision.static_init='zeros' is not one of random, kernel_mean"),
    (["extra.vision.dataset=folder"], "extra.vision.root=None must name the image folder"),
    (["extra.vision.dataset=cifar"], "extra.vision.dataset='cifar' is not one of"),
    (["extra.vision=3"], "extra.vision: expected a mapping"),
    (["extra.visoin.conv=pad"], "unknown config key extra.visoin: task 'image' reads extra.vision only"),
    (["extra.vision.conv=dynamic"], "partition.ratio=0.3 partitions PAD masks, but extra.vision.conv='dynamic'"),
    (["extra.vision.conv=static"], "extra.vision.conv='static' builds an ordinary ResNet"),
])
def test_bad_vision_config_names_the_key(override, message):
    from padnet_ds.engine.validate import validate_run

    cfg = load_config("configs/mnist_pad.yaml", override)
    with pytest.raises(ConfigError, match=re.escape(message)):
        validate_run(cfg)


def test_shipped_image_configs_are_valid():
    from padnet_ds.engine.image_task import vision_config

    for name, conv in (("mnist_pad", "pad"), ("mnist_dyconv", "dynamic"), ("mnist_static", "static")):
        cfg = load_config(f"configs/{name}.yaml")
        assert cfg.task == "image" and vision_config(cfg).conv == conv


@pytest.mark.slow
def test_resumed_image_run_reproduces_the_uninterrupted_one(tmp_path):
    """Temperature (a function of the epoch), augmentation draws and BN statistics survive a resume."""
    common = [*TINY, "train.steps=40", "train.log_every=1", "extra.vision.augment=true",
              "extra.vision.max_train_images=1600"]
    full = run_ranks(train_in_ranks, 2, [f"output_dir={tmp_path}/full", *common])[0]
    first = run_ranks(train_in_ranks, 2, [f"output_dir={tmp_path}/cut", *common, "train.stop_at=25"])[0]
    assert first["steps"] == 25 and len(first["partition_log"]) == 0
    resumed = run_ranks(train_in_ranks, 2, [f"output_dir={tmp_path}/cut", *common, "resume=true"])[0]
    losses = {h["step"]: h["loss"] for h in full["history"]}
    got = {h["step"]: h["loss"] for h in resumed["history"]}
    assert sorted(got) == sorted(losses)
    torch.testing.assert_close([got[s] for s in sorted(got)], [losses[s] for s in sorted(got)],
                               rtol=1e-5, atol=1e-6)
    assert [e["mask_digests"] for e in resumed["partition_log"]] == [e["mask_digests"] for e in full["partition_log"]]
    assert resumed["eval"] == pytest.approx(full["eval"])
