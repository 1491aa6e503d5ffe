import pytest

from padnet_ds.engine.config import ConfigError, load_config, parse_overrides


def write(tmp_path, text):
    p = tmp_path / "run.yaml"
    p.write_text(text)
    return str(p)


def test_yaml_plus_overrides_build_one_typed_config(tmp_path):
    path = write(tmp_path, "train:\n  steps: 5\nmoe:\n  num_experts: 4\n")
    cfg = load_config(path, ["train.steps=7", "optim.lr=1e-3", "data.text_columns=[a, b]", "resume=true",
                             "model.random_init={hidden_size: 32}"])
    assert cfg.train.steps == 7 and cfg.moe.num_experts == 4 and cfg.resume is True
    assert cfg.optim.lr == pytest.approx(1e-3)  # YAML 1.1 reads 1e-3 as a string: accepted as a number
    assert cfg.data.text_columns == ("a", "b")
    assert cfg.model.random_init == {"hidden_size": 32}


@pytest.mark.parametrize("text, overrides, match", [
    ("train:\n  stepz: 5\n", [], "unknown config key train.stepz"),
    ("", ["bogus=1"], "unknown config key bogus"),
    ("", ["train.steps=many"], "train.steps: expected an integer, got 'many'"),
    ("", ["train.micro_batch_size=0"], "train.micro_batch_size=0 must be an integer >= 1"),
    ("", ["train.grad_accum=0"], "train.grad_accum=0 must be an integer >= 1"),
    ("", ["train.steps=0"], "train.steps=0 must be an integer >= 1"),
    ("", ["optim.lr=0"], "optim.lr=0 must be > 0"),
    ("", ["optim.lr=true"], "optim.lr: expected a number, got True"),
    ("", ["model.max_length=0"], "model.max_length=0 must be an integer >= 1"),
    ("", ["train.eval_every=-5"], "train.eval_every=-5 must be an integer >= 0"),
    ("", ["optim.betas=[0.9, 1.0]"], r"optim.betas\[1\]=1.0 must be in \[0, 1\)"),
    ("", ["data.source=imdb"], "data.source='imdb' is not one of glue, files, rotten_tomatoes"),
    ("", ["moe.num_experts=6", "moe.ep_size=4"], "num_experts=6 is not divisible by ep_size=4"),
    ("", ["resume=yes please"], "resume: expected true or false"),
    ("", ["moe.k=1.5"], "moe.k: expected an integer"),
    ("", ["partition.ratio=1.5"], r"partition.ratio=1.5 must be in \(0, 1\]"),
    ("", ["partition.mode=sometimes"], "partition.mode='sometimes' is not one of"),
    ("moe: 3\n", [], "moe: expected a mapping"),
    ("", ["train.steps"], "is not key=value"),
])
def test_bad_settings_name_the_key(tmp_path, text, overrides, match):
    with pytest.raises(ConfigError, match=match):
        load_config(write(tmp_path, text), overrides)


def test_missing_config_file_says_where_to_look():
    with pytest.raises(ConfigError, match="configs/smoke.yaml"):
        load_config("no/such.yaml")


def test_overrides_nest_dotted_keys():
    assert parse_overrides(["a.b.c=1", "a.d=x"]) == {"a": {"b": {"c": 1}, "d": "x"}}


def test_shipped_configs_are_valid():
    from pathlib import Path

    for path in sorted((Path(__file__).resolve().parents[2] / "configs").glob("*.yaml")):
        load_config(str(path))


@pytest.mark.parametrize("override, fused", [([], True), (["optim.fused=false"], False)])
def test_trainer_adamw_is_fused_unless_switched_off(tmp_path, override, fused):
    import torch

    from padnet_ds.engine.setup import optimizer_and_schedule

    cfg = load_config(write(tmp_path, ""), ["optim.lr=0.01"] + override)
    make_opt, _ = optimizer_and_schedule(cfg, {}, total_steps=10)
    p = torch.nn.Parameter(torch.ones(3))
    opt = make_opt([{"params": [p]}])
    assert isinstance(opt, torch.optim.AdamW) and bool(opt.defaults["fused"]) is fused
    p.grad = torch.ones(3)
    opt.step()
    assert torch.all(p < 1)  # one real step on this machine's kernel
    assert optimizer_and_schedule(cfg, {"optimizer": {"type": "AdamW"}}, 10)[0] is None  # the JSON's own wins
