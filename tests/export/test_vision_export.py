"""PAD DY-Conv ResNet checkpoints (saved by the engine) exported and loaded in a fresh process without DeepSpeed."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from padnet_ds.cli import main
from padnet_ds.testing import run_ranks

REPO = Path(__file__).resolve().parents[2]
VARIANTS = {"pad": ("pad", False), "pad-packed": ("pad", True), "dynamic": ("dynamic", False)}
CLASSES = [f"digit {i}" for i in range(10)]
LOAD = """
import json, sys, torch
from padnet_ds.export import PADResNetForImageClassification
x = torch.load(sys.argv[1])
out = {}
for name, folder in json.loads(sys.argv[2]).items():
    model = PADResNetForImageClassification.from_pretrained(folder)
    with torch.no_grad():
        out[name] = model(x).logits.tolist()
out["deepspeed"] = any(m.startswith("deepspeed") for m in sys.modules)
print(json.dumps(out))
"""


def save_runs(root: str) -> dict:
    """One engine-saved checkpoint per variant, with trained-looking state: random masks, lambdas,
    BatchNorm statistics and a temperature that is not the start value; returns eval-mode logits."""
    from padnet_ds.engine.checkpoint import save
    from padnet_ds.engine.config import load_config, to_dict
    from padnet_ds.engine.image_task import vision_config
    from padnet_ds.engine.run_dir import RunDir
    from padnet_ds.engine.setup import build_engine
    from padnet_ds.engine.state import LoopState
    from padnet_ds.models.image import ImageClassifier
    from padnet_ds.models.resnet import build_resnet, dyconv_layers

    torch.manual_seed(0)
    x = torch.rand(6, 1, 28, 28)
    torch.save(x, f"{root}/pixels.pt")
    logits = {}
    for name, (conv, packed) in VARIANTS.items():
        cfg = load_config("configs/mnist_pad.yaml", [f"output_dir={root}/{name}", f"extra.vision.conv={conv}",
                                                     "extra.vision.width=0.125",
                                                     f"partition.ratio={0.3 if conv == 'pad' else 1.0}"])
        v = vision_config(cfg)
        resnet = build_resnet(v.depth, v.conv, v.num_kernels, small_input=True, in_channels=1, num_classes=10,
                              width=v.width, lambda_mode=v.lambda_mode, reduction=v.reduction)
        model = ImageClassifier(resnet, torch.tensor([0.13]), torch.tensor([0.31]), 30.0, sync_bn_stats=False)
        gen = torch.Generator().manual_seed(1)
        with torch.no_grad():
            for _, layer in dyconv_layers(resnet):
                if conv == "pad":
                    layer.pad.set_mask(torch.rand(layer.pad.weight_shape, generator=gen) < 0.3)
                    layer.pad.phi.normal_(0, 0.5, generator=gen)
            for m in resnet.modules():
                if isinstance(m, torch.nn.BatchNorm2d):
                    m.running_mean.normal_(0, 0.1, generator=gen)
                    m.running_var.uniform_(0.5, 2.0, generator=gen)
        model.set_temperature(2.5)
        if packed:
            from padnet_ds.pad.packed import pack_model

            assert pack_model(model)
        engine = build_engine(model, {"train_micro_batch_size_per_gpu": 4, "zero_optimization": {"stage": 0}})
        save(engine, None, RunDir(f"{root}/{name}"), LoopState(step=1), keep=0)  # the trainer's own save
        Path(f"{root}/{name}/config.yaml").write_text(yaml.safe_dump(to_dict(cfg), sort_keys=False))
        Path(f"{root}/{name}/summary.json").write_text(json.dumps({"label_names": CLASSES, "eval": {"accuracy": 0.5}}))
        model.eval()
        with torch.no_grad():
            logits[name] = model(pixel_values=x).logits
    return logits


def test_vision_exports_load_without_deepspeed_and_give_the_models_logits(tmp_path):
    os.chdir(REPO)
    (logits,) = run_ranks(save_runs, 1, str(tmp_path))
    folders = {}
    for name in VARIANTS:
        folders[name] = str(tmp_path / "exports" / name)
        assert main(["export", str(tmp_path / name), folders[name]]) == 0
    res = subprocess.run([sys.executable, "-c", LOAD, str(tmp_path / "pixels.pt"), json.dumps(folders)],
                         cwd=REPO, env=dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1"),
                         capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    got = json.loads(res.stdout.strip().splitlines()[-1])
    assert got.pop("deepspeed") is False
    for name in VARIANTS:
        torch.testing.assert_close(torch.tensor(got[name]), logits[name], rtol=0, atol=1e-5)
    assert (logits["pad"] - logits["dynamic"]).abs().max() > 1e-3
    config = json.loads((tmp_path / "exports" / "pad" / "config.json").read_text())
    assert config["model_type"] == "padnet_resnet" and config["id2label"]["3"] == "digit 3"
    specs = config["dyconv"]["layers"]
    assert len(specs) == 16 and all(s["dynamic_ratio"] == pytest.approx(0.3, abs=0.05) for s in specs.values())
    pad_bytes = (tmp_path / "exports" / "pad" / "model.safetensors").stat().st_size
    assert pad_bytes < 0.7 * (tmp_path / "exports" / "dynamic" / "model.safetensors").stat().st_size
