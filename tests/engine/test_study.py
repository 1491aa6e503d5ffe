import json
from pathlib import Path

import pytest

from padnet_ds.engine.config import ConfigError
from padnet_ds.engine.study import parse_study_args
from tests.engine.test_train import TINY, glue
from padnet_ds.testing import run_ranks


def study_in_ranks(out, extra):
    from padnet_ds.engine.study import run_study

    return run_study("configs/smoke.yaml", [f"out={out}", "tasks=wnli", "ratios=1.0,0.5", "seeds=1", *extra])


def test_study_runs_every_arm_and_writes_table_results_and_plot(tmp_path, shared_dir):
    extra = [*TINY, *glue(shared_dir, "WNLI", 128), "train.steps=10", "train.eval_every=0",
             "train.checkpoint_every=0", "train.keep_checkpoints=1"]
    res, _ = run_ranks(study_in_ranks, 2, str(tmp_path / "study"), extra)
    arms = [(r["variant"], r["dynamic_ratio"]) for r in res["results"]]
    assert [a for a, _ in arms] == ["dense", "moe", "pad@0.5", "random@0.5"]
    ratios = dict(arms)
    assert ratios["moe"] == 1.0 and ratios["pad@0.5"] == pytest.approx(0.5, abs=0.01)
    assert ratios["random@0.5"] == pytest.approx(0.5, abs=0.01)
    saved = json.loads((tmp_path / "study" / "results.json").read_text())
    for r in saved["results"]:  # each arm's value is its own run's final eval, read back from its folder
        summary = json.loads((Path(r["output_dir"]) / "summary.json").read_text())
        assert r["value"] == summary["eval"][r["metric"]] and r["dynamic_ratio"] == pytest.approx(
            summary["dynamic_ratio"] if r["variant"] != "dense" else float("nan"), nan_ok=True)
    # one seed: each aggregate row's mean is that arm's value, std 0
    assert [(a["variant"], a["mean"], a["std"]) for a in saved["aggregate"]] == \
        [(r["variant"], r["value"], 0.0) for r in saved["results"]]
    assert "| wnli | pad@0.5 | 0.5 |" in (tmp_path / "study" / "table.md").read_text()
    png = (tmp_path / "study" / "metric_vs_ratio.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 5000


def test_study_settings_are_checked():
    with pytest.raises(ConfigError, match=r"study.ratios\[1\]=1.5 must be in \(0, 1\]"):
        parse_study_args(["ratios=1.0,1.5"])
    with pytest.raises(ConfigError, match="study.seeds\\[0\\]: expected an integer, got 'one'"):
        parse_study_args(["seeds=one"])
    study, run = parse_study_args(["tasks=sst2,mrpc", "ratios=1.0,0.5", "seeds=3", "train.steps=4"])
    assert (study.tasks, study.ratios, study.seeds, run) == (["sst2", "mrpc"], [1.0, 0.5], [3], ["train.steps=4"])
