"""The whole run config is validated on every rank before the run folder is touched (2 real ranks)."""
import json
from pathlib import Path

import pytest

CONFIGS = Path(__file__).resolve().parents[2] / "configs"
SMOKE, MNIST = str(CONFIGS / "smoke.yaml"), str(CONFIGS / "mnist_pad.yaml")


def train_until_refused(config, out, overrides):
    from padnet_ds.engine.config import load_config
    from padnet_ds.engine.trainer import train
    from padnet_ds.settings import ConfigError

    try:
        train(load_config(config, [f"output_dir={out}", *overrides]))
    except ConfigError as err:
        return str(err)
    return "no error"


def ds_json(tmp_path, **settings):
    path = tmp_path / "ds.json"
    path.write_text(json.dumps({"zero_optimization": {"stage": 2}, **settings}))
    return f"ds_config={path}"


CASES = {
    "vision-typo": (MNIST, ["extra.vision.colour=RGB"], "unknown config key extra.vision.colour"),
    "vision-range": (MNIST, ["extra.vision.width=0"], "extra.vision.width=0 must be > 0"),
    "extra-typo": (MNIST, ["extra.visoin.conv=pad"], "unknown config key extra.visoin: task 'image' reads "
                   "extra.vision only"),
    "text-extra": (SMOKE, ["extra.vision.conv=pad"], "unknown config key extra.vision: task 'text' reads no"),
    "task": (SMOKE, ["task=audio"], "task='audio' is not one of image, text"),
    "ep-size-vs-world": (SMOKE, ["moe.num_experts=8", "moe.ep_size=8"], "moe.ep_size=8 does not divide the "
                         "world size 2"),
    "ds-missing": (SMOKE, ["ds_config=ds_configs/nope.json"], "ds_config ds_configs/nope.json not found"),
    "ds-zero3": (SMOKE, [lambda tmp: ds_json(tmp, zero_optimization={"stage": 3})], "zero_optimization.stage=3"),
    "ds-fp16-cpu": (SMOKE, [lambda tmp: ds_json(tmp, fp16={"enabled": True})], "fp16.enabled=true"),
    "ds-batch": (SMOKE, [lambda tmp: ds_json(tmp, train_micro_batch_size_per_gpu=4)],
                 "sets train_micro_batch_size_per_gpu=4 but the run config asks for 8"),
    "ds-not-json": (SMOKE, [lambda tmp: (tmp / "bad.json").write_text("{") and f"ds_config={tmp / 'bad.json'}"],
                    "is not valid JSON"),
}


@pytest.mark.parametrize("case", list(CASES))
def test_bad_config_is_refused_on_every_rank_before_anything_is_written(pool, tmp_path, case):
    config, overrides, message = CASES[case]
    overrides = [o(tmp_path) if callable(o) else o for o in overrides]
    out = tmp_path / "run"
    results = pool.run(train_until_refused, config, str(out), overrides)
    assert results[0] == results[1] and message in results[0], results
    assert not out.exists(), f"{out} was created: validation ran after the run folder was prepared"


def validate_shipped_configs():
    from padnet_ds.engine.config import load_config
    from padnet_ds.engine.validate import validate_run

    paths = sorted(CONFIGS.glob("*.yaml"))
    return {p.name: validate_run(load_config(str(p)))["train_micro_batch_size_per_gpu"] for p in paths}


def test_shipped_configs_pass_validation_on_two_ranks(pool):
    from padnet_ds.engine.config import load_config

    got, _ = pool.run(validate_shipped_configs)
    assert got == {p.name: load_config(str(p)).train.micro_batch_size
                   for p in sorted(CONFIGS.glob("*.yaml"))} and len(got) >= 6
