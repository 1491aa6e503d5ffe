import pytest

from padnet_ds.engine.config import ConfigError, load_config
from padnet_ds.engine.run_dir import RunDir


def snapshot(root):
    return {p: p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_output_dir_holding_another_run_is_refused_and_left_untouched(tmp_path):
    cfg = load_config(None, [f"output_dir={tmp_path}/run"])
    RunDir(cfg.output_dir).prepare(cfg, is_writer=True)
    (tmp_path / "run" / "summary.json").write_text('{"eval": {"accuracy": 0.9}}')
    before = snapshot(tmp_path / "run")
    with pytest.raises(ConfigError, match="already holds a run .*resume=true"):
        RunDir(cfg.output_dir).prepare(cfg, is_writer=True)
    assert snapshot(tmp_path / "run") == before


def test_resume_needs_a_checkpoint(tmp_path):
    cfg = load_config(None, [f"output_dir={tmp_path}/run", "resume=true"])
    with pytest.raises(ConfigError, match="has no checkpoint"):
        RunDir(cfg.output_dir).prepare(cfg, is_writer=True)


def test_resume_with_a_different_model_is_refused(tmp_path):
    cfg = load_config(None, [f"output_dir={tmp_path}/run", "moe.num_experts=4"])
    run = RunDir(cfg.output_dir)
    run.prepare(cfg, is_writer=True)
    (run.checkpoints / "latest").write_text("step5")
    other = load_config(None, [f"output_dir={tmp_path}/run", "moe.num_experts=8", "resume=true"])
    with pytest.raises(ConfigError, match="from a different model: its moe settings"):
        RunDir(other.output_dir).prepare(other, is_writer=True)
    same = load_config(None, [f"output_dir={tmp_path}/run", "moe.num_experts=4", "resume=true", "train.steps=9"])
    RunDir(same.output_dir).prepare(same, is_writer=True)  # other settings (steps, data...) may change
