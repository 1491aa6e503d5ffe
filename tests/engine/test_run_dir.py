"""The run folder: a run is a complete checkpoint (or summary.json); a failed start leaves it reusable."""
import pytest

from padnet_ds.commit import write_tag
from padnet_ds.engine.config import ConfigError, load_config
from padnet_ds.engine.run_dir import RunDir


def snapshot(root):
    return {p: p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def complete_checkpoint(run: RunDir, tag="step5"):
    with write_tag(run.checkpoints, tag, collective=False) as stage:
        (stage.dir / "mp_rank_00_model_states.pt").write_bytes(b"weights")


def test_check_and_create_write_nothing_until_create(tmp_path):
    cfg = load_config(None, [f"output_dir={tmp_path}/run"])
    run = RunDir(cfg.output_dir)
    run.check(cfg)
    assert not run.root.exists()
    run.create(cfg)
    assert run.config_file.is_file() and run.checkpoints.is_dir() and not run.holds_run()


def test_output_dir_holding_another_run_is_refused_and_left_untouched(tmp_path):
    cfg = load_config(None, [f"output_dir={tmp_path}/run"])
    run = RunDir(cfg.output_dir)
    run.create(cfg)
    complete_checkpoint(run)
    before = snapshot(run.root)
    with pytest.raises(ConfigError, match=r"already holds a run \(checkpoints/step5\).*resume=true"):
        run.check(cfg)
    (run.root / "summary.json").write_text('{"eval": {"accuracy": 0.9}}')
    with pytest.raises(ConfigError, match=r"already holds a run \(checkpoints/step5, summary.json\)"):
        run.check(cfg)
    before[run.root / "summary.json"] = b'{"eval": {"accuracy": 0.9}}'
    assert snapshot(run.root) == before


def test_a_failed_start_leaves_the_folder_reusable_and_the_rerun_clears_what_it_left(tmp_path):
    first = load_config(None, [f"output_dir={tmp_path}/run", "optim.lr=0.5"])
    run = RunDir(first.output_dir)
    run.create(first)  # then the start failed before its first checkpoint completed:
    (run.tensorboard).mkdir()
    (run.tensorboard / "events.out.tfevents.1").write_bytes(b"steps 1-7")
    (run.checkpoints / "step8.partial").mkdir()
    (run.checkpoints / "step8.partial" / "zero_pp_rank_0_mp_rank_00_optim_states.pt").write_bytes(b"half")
    assert not run.holds_run()
    with pytest.raises(ConfigError, match=r"holds no complete checkpoint \(step8.partial: a save that did not"):
        run.check(load_config(None, [f"output_dir={tmp_path}/run", "resume=true"]))
    fixed = load_config(None, [f"output_dir={tmp_path}/run", "optim.lr=0.001"])
    run.check(fixed)
    run.create(fixed)
    assert not run.tensorboard.exists() and not (run.checkpoints / "step8.partial").exists()
    assert "lr: 0.001" in run.config_file.read_text()


def test_a_folder_with_a_latest_pointer_but_no_manifest_is_never_overwritten(tmp_path):
    cfg = load_config(None, [f"output_dir={tmp_path}/run"])
    run = RunDir(cfg.output_dir)
    run.checkpoints.mkdir(parents=True)
    (run.checkpoints / "latest").write_text("step5")  # an older padnet-ds's checkpoints
    with pytest.raises(ConfigError, match=r"already holds a run \(checkpoints/latest\)"):
        run.check(cfg)


def test_resume_with_a_different_model_is_refused(tmp_path):
    cfg = load_config(None, [f"output_dir={tmp_path}/run", "moe.num_experts=4"])
    run = RunDir(cfg.output_dir)
    run.create(cfg)
    complete_checkpoint(run)
    other = load_config(None, [f"output_dir={tmp_path}/run", "moe.num_experts=8", "resume=true"])
    with pytest.raises(ConfigError, match="from a different model: its moe settings"):
        RunDir(other.output_dir).check(other)
    same = load_config(None, [f"output_dir={tmp_path}/run", "moe.num_experts=4", "resume=true", "train.steps=9"])
    RunDir(same.output_dir).check(same)  # other settings (steps, data...) may change
