"""``padnet-ds study``: PAD's quality claim, measured. One base run config, many runs:

- ``dense``: the encoder without MoE (text) / a static ResNet (image);
- ``moe``: the fully dynamic MoE baseline, ratio 1.0 (text) / plain DY-Conv (image);
- ``pad@r``: PAD partitioned by IMP to each ratio r < 1;
- ``random@r``: the random-partition ablation at the smallest ratio.

Each (task, variant, seed) is one ``train()`` in the same processes (the study itself runs
under the launcher), writing its own run folder under ``out``. The study writes
``results.json``, ``table.md`` (mean and std over seeds of the final and the best eval) and
``metric_vs_ratio.png``. Beside each task it states the trivial baseline (a constant prediction:
the eval split's majority class, or the mean training label for regression, scored with the
task's metric) and how many seeds of each variant beat it: when none does, the budget is too
small for the variants to differ in anything but noise.
"""
from __future__ import annotations

import json
import math
import statistics
from pathlib import Path
from typing import Annotated, Any, Dict, List, Sequence, Tuple

import yaml
from pydantic import Field, ValidationInfo, field_validator

from ..comm import rank
from ..files import atomic_write_text
from ..settings import Bool, Float, Int, Settings
from .config import RunConfig, config_from_dict, load_config, merge, parse_overrides, to_dict

Ratio = Annotated[Float, Field(gt=0, le=1, description="1.0 = the fully dynamic baseline")]


class StudyConfig(Settings):
    """``key=value`` study settings; lists may be given comma-separated (``ratios=1.0,0.5``)."""
    section = "study"

    tasks: List[str] = ["sst2"]
    ratios: List[Ratio] = [1.0, 0.5, 0.3]
    seeds: List[Int] = [1, 2]
    out: str = "runs/study"
    dense: Bool = True  # the dense (no MoE / static ResNet) baseline
    ablation: Bool = True  # the random-partition ablation at the smallest ratio

    @field_validator("tasks", "ratios", "seeds", mode="before")
    @classmethod
    def _comma_list(cls, value: Any, info: ValidationInfo) -> Any:
        if isinstance(value, str):
            parts = [v.strip() for v in value.split(",") if v.strip()]
            return parts if info.field_name == "tasks" else [yaml.safe_load(v) for v in parts]  # numbers
        return value if isinstance(value, (list, tuple)) else [value]


def parse_study_args(pairs: Sequence[str]) -> Tuple[StudyConfig, List[str]]:
    """Split ``key=value`` pairs into study settings and run-config overrides."""
    study: Dict[str, Any] = {}
    run: List[str] = []
    for pair in pairs:
        key = pair.split("=", 1)[0]
        if key in StudyConfig.model_fields:
            study[key] = parse_overrides([pair])[key]
        else:
            run.append(pair)
    return StudyConfig(**study), run


def variants(study: StudyConfig, task: str) -> List[Tuple[str, float, Dict[str, Any]]]:
    """(name, dynamic ratio, run-config overrides) for each arm of the study."""
    image = task == "image"
    out: List[Tuple[str, float, Dict[str, Any]]] = []
    if study.dense:
        over = {"extra": {"vision": {"conv": "static"}}} if image else {"model": {"dense": True}}
        out.append(("dense", math.nan, merge(over, {"partition": {"ratio": 1.0}})))
    for r in sorted(set(study.ratios), reverse=True):
        conv = {"extra": {"vision": {"conv": "dynamic" if r == 1.0 else "pad"}}} if image else {}
        name = "moe" if r == 1.0 else f"pad@{r:g}"
        out.append((name, r, merge(conv, {"partition": {"ratio": r, "method": "imp"}})))
    partial = [r for r in study.ratios if r < 1.0]
    if study.ablation and partial:
        r = min(partial)
        conv = {"extra": {"vision": {"conv": "pad"}}} if image else {}
        out.append((f"random@{r:g}", r, merge(conv, {"partition": {"ratio": r, "method": "random"}})))
    return out


def run_study(config_path: str, pairs: Sequence[str]) -> Dict[str, Any]:
    from .trainer import train

    study, run_overrides = parse_study_args(pairs)
    base = to_dict(load_config(config_path, run_overrides))
    results: List[Dict[str, Any]] = []
    baselines: Dict[str, float] = {}
    out = Path(study.out)
    for task in study.tasks:
        image = base.get("task") == "image"
        for name, ratio, over in variants(study, "image" if image else task):
            for seed in study.seeds:
                values = merge(base, over)
                values = merge(values, {"seed": seed, "resume": False,
                                        "output_dir": str(out / task / name.replace("@", "_") / f"seed{seed}")})
                if not image:
                    values = merge(values, {"data": {"task": task}})
                cfg = config_from_dict(values)
                summary = train(cfg)
                metric = summary["main_metric"]
                if task not in baselines:
                    baselines[task] = task_baseline(cfg, metric)
                results.append(dict(task=task, variant=name, ratio=ratio, seed=seed, metric=metric,
                                    value=summary["eval"].get(metric), eval=summary["eval"],
                                    best=summary.get("best_eval", {}).get(metric), baseline=baselines[task],
                                    dynamic_ratio=math.nan if name == "dense" else summary["dynamic_ratio"],
                                    output_dir=cfg.output_dir))
                if rank() == 0:
                    write_outputs(out, study, results)
    return {"results": results, "table": table(results)}


def task_baseline(cfg: RunConfig, metric: str) -> float:
    """``metric`` of the trivial constant predictor on ``cfg``'s eval split (nan for other workloads)."""
    from ..data.metrics import trivial_baseline

    if cfg.task == "image":
        from .vision import load_data, vision_config

        data = load_data(vision_config(cfg))
        return trivial_baseline(metric, False, data.train.tensors[1].tolist(), data.test.tensors[1].tolist())
    if cfg.task != "text":
        return math.nan
    from ..data.text import load_text_task

    spec, train_rows, eval_rows = load_text_task(cfg.data)
    return trivial_baseline(metric, spec.is_regression, train_rows.labels, eval_rows.labels)


def _mean_std(vals: List[float]) -> Tuple[float, float]:
    return (statistics.fmean(vals) if vals else math.nan), (statistics.stdev(vals) if len(vals) > 1 else 0.0)


def aggregate(results: List[Dict[str, Any]]) -> List[Dict[str, Any]]:
    groups: Dict[Tuple[str, str], List[Dict[str, Any]]] = {}
    for r in results:
        groups.setdefault((r["task"], r["variant"]), []).append(r)
    rows = []
    for (task, variant), runs in groups.items():
        vals = [r["value"] for r in runs if r["value"] is not None]
        mean, std = _mean_std(vals)
        best_mean, best_std = _mean_std([r["best"] for r in runs if r.get("best") is not None])
        baseline = runs[0].get("baseline", math.nan)
        rows.append(dict(task=task, variant=variant, ratio=runs[0]["ratio"], metric=runs[0]["metric"],
                         mean=mean, std=std, best_mean=best_mean, best_std=best_std, seeds=len(vals),
                         baseline=baseline, beat_baseline=sum(v > baseline for v in vals),
                         dynamic_ratio=statistics.fmean(r["dynamic_ratio"] for r in runs)))
    return rows


def table(results: List[Dict[str, Any]]) -> str:
    rows = aggregate(results)
    lines = ["| task | variant | target ratio | achieved ratio | metric | mean | std | best mean | best std "
             "| seeds > trivial | seeds |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for row in rows:
        ratio = "-" if math.isnan(row["ratio"]) else f"{row['ratio']:g}"
        achieved = "-" if math.isnan(row["dynamic_ratio"]) else f"{row['dynamic_ratio']:.3f}"
        beats = "-" if math.isnan(row["baseline"]) else f"{row['beat_baseline']}/{row['seeds']}"
        lines.append(f"| {row['task']} | {row['variant']} | {ratio} | {achieved} | {row['metric']} "
                     f"| {row['mean']:.4f} | {row['std']:.4f} | {row['best_mean']:.4f} | {row['best_std']:.4f} "
                     f"| {beats} | {row['seeds']} |")
    lines += ["", "mean/std: the final eval; best: the best eval of each run. Trivial baseline: a constant "
              "prediction (the eval split's majority class; the mean training label for regression) scored "
              "with the task's metric; 'seeds > trivial' counts the seeds whose final eval beats it."]
    for task in dict.fromkeys(r["task"] for r in rows):
        mine = [r for r in rows if r["task"] == task]
        baseline = mine[0]["baseline"]
        if math.isnan(baseline):
            lines.append(f"- {task}: no trivial baseline for this workload")
            continue
        winners = [r["variant"] for r in mine if r["beat_baseline"]]
        verdict = (f"beaten by {', '.join(winners)}" if winners else
                   "NO variant beats it: this budget is too small to compare the variants")
        lines.append(f"- {task}: trivial {mine[0]['metric']} = {baseline:.4f}; {verdict}")
    return "\n".join(lines)


def write_outputs(out: Path, study: StudyConfig, results: List[Dict[str, Any]]) -> None:
    atomic_write_text(out / "results.json", json.dumps({"study": study.model_dump(), "results": results,
                                                        "aggregate": aggregate(results)}, indent=2, default=float))
    atomic_write_text(out / "table.md", table(results) + "\n")
    plot(out / "metric_vs_ratio.png", aggregate(results))


def plot(path: Path, rows: List[Dict[str, Any]]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tasks = sorted({r["task"] for r in rows})
    fig, axes = plt.subplots(1, len(tasks), figsize=(5 * len(tasks), 4), squeeze=False)
    for ax, task in zip(axes[0], tasks):
        mine = [r for r in rows if r["task"] == task]
        imp = sorted((r for r in mine if r["variant"] in ("moe",) or r["variant"].startswith("pad@")),
                     key=lambda r: r["ratio"])
        if imp:
            ax.errorbar([r["ratio"] for r in imp], [r["mean"] for r in imp], yerr=[r["std"] for r in imp],
                        marker="o", capsize=3, label="PAD (IMP); 1.0 = fully dynamic MoE")
        for r in mine:
            if r["variant"].startswith("random@"):
                ax.errorbar([r["ratio"]], [r["mean"]], yerr=[r["std"]], marker="x", capsize=3, linestyle="none",
                            label="random partition")
            if r["variant"] == "dense":
                ax.axhline(r["mean"], color="gray", linestyle="--", label="dense")
        if mine and not math.isnan(mine[0]["baseline"]):
            ax.axhline(mine[0]["baseline"], color="red", linestyle=":", label="trivial baseline")
        ax.set_xlabel("dynamic ratio")
        ax.set_ylabel(mine[0]["metric"] if mine else "metric")
        ax.set_title(task)
        ax.legend(fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
