import csv
import json
import math
from pathlib import Path

import pytest

from padnet_ds.engine.config import ConfigError
from padnet_ds.engine.study import aggregate, parse_study_args, table
from tests.engine.test_train import TINY, glue
from padnet_ds.testing import run_ranks


def study_in_ranks(out, extra):
    from padnet_ds.engine.study import run_study

    return run_study("configs/smoke.yaml", [f"out={out}", "tasks=wnli", "ratios=1.0,0.5", "seeds=1", *extra])


def wnli_dev_majority(shared_dir) -> float:
    with open(shared_dir / "glue" / "WNLI" / "dev.tsv", newline="") as f:
        labels = [row["label"] for row in csv.DictReader(f, delimiter="\t", quoting=csv.QUOTE_NONE)]
    return max(labels.count(v) for v in set(labels)) / len(labels)


def test_study_runs_every_arm_and_writes_table_results_and_plot(tmp_path, shared_dir):
    # The whole WNLI dev split (71 rows), so the trivial baseline can be checked against the file.
    extra = [*TINY, *glue(shared_dir, "WNLI", 128), "data.max_eval_examples=1000", "train.steps=10",
             "train.eval_every=5", "train.checkpoint_every=0", "train.keep_checkpoints=1"]
    res, _ = run_ranks(study_in_ranks, 2, str(tmp_path / "study"), extra)
    majority = wnli_dev_majority(shared_dir)
    for r in res["results"]:
        assert r["baseline"] == pytest.approx(majority, abs=1e-12)
        # evals at steps 5 and 10, read back from the run's TensorBoard file: final = the last, best = the max
        from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

        events = EventAccumulator(str(Path(r["output_dir"]) / "tensorboard"), size_guidance={"scalars": 0})
        events.Reload()
        logged = [e.value for e in sorted(events.Scalars("eval/accuracy"), key=lambda e: e.step)]
        assert len(logged) == 2
        assert r["value"] == pytest.approx(logged[-1], abs=1e-6) and r["best"] == pytest.approx(max(logged), abs=1e-6)
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


def _run(task, variant, seed, value, best, baseline, ratio=0.5):
    return dict(task=task, variant=variant, ratio=ratio, seed=seed, metric="accuracy", value=value, best=best,
                baseline=baseline, dynamic_ratio=ratio)


def test_table_reports_best_eval_and_which_variants_beat_the_trivial_baseline():
    results = [_run("sst2", "moe", 1, 0.70, 0.74, 0.51, 1.0), _run("sst2", "moe", 2, 0.50, 0.52, 0.51, 1.0),
               _run("sst2", "pad@0.5", 1, 0.48, 0.49, 0.51), _run("sst2", "pad@0.5", 2, 0.46, 0.50, 0.51),
               _run("rte", "moe", 1, 0.47, 0.52, 0.53, 1.0), _run("rte", "pad@0.5", 1, 0.52, 0.53, 0.53)]
    rows = {(r["task"], r["variant"]): r for r in aggregate(results)}
    assert rows[("sst2", "moe")]["best_mean"] == pytest.approx(0.63)
    assert rows[("sst2", "moe")]["best_std"] == pytest.approx(math.sqrt(2) * 0.11)
    assert [rows[k]["beat_baseline"] for k in rows] == [1, 0, 0, 0]
    text = table(results)
    assert "| sst2 | moe | 1 | 1.000 | accuracy | 0.6000 | 0.1414 | 0.6300 | 0.1556 | 1/2 | 2 |" in text
    assert "| sst2 | pad@0.5 | 0.5 | 0.500 | accuracy | 0.4700 | 0.0141 | 0.4950 | 0.0071 | 0/2 | 2 |" in text
    assert "- sst2: trivial accuracy = 0.5100; beaten by moe" in text
    # rte: the best evals reach the baseline, the final ones do not: the budget compares nothing
    assert "- rte: trivial accuracy = 0.5300; NO variant beats it: this budget is too small" in text
