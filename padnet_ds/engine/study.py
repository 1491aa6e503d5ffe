"""``padnet-ds study``: PAD's quality claim, measured. One base run config, many runs:

- ``dense``: the encoder without MoE (text) / a static ResNet (image);
- ``moe``: the fully dynamic MoE baseline, ratio 1.0 (text) / plain DY-Conv (image);
- ``pad@r``: PAD partitioned by IMP to each ratio r < 1;
- ``random@r``: the random-partition ablation at the smallest ratio.

Each (task, variant, seed) is one ``train()`` in the same processes (the study itself runs
under the launcher), writing its own run folder under ``out``. The study writes
``results.json``, ``table.md`` (mean and std over seeds) and ``metric_vs_ratio.png``.
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
from .config import config_from_dict, load_config, merge, parse_overrides, to_dict

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
                results.append(dict(task=task, variant=name, ratio=ratio, seed=seed, metric=metric,
                                    value=summary["eval"].get(metric), eval=summary["eval"],
                                    dynamic_ratio=math.nan if name == "dense" else summary["dynamic_ratio"],
                                    output_dir=cfg.output_dir))
                if rank() == 0:
                    write_outputs(out, study, results)
    return {"results": results, "table": table(results)}


def aggregate(results: List[Dict[str, Any]]) -> List[Dict[str, Any]]:
    groups: Dict[Tuple[str, str], List[Dict[str, Any]]] = {}
    for r in results:
        groups.setdefault((r["task"], r["variant"]), []).append(r)
    rows = []
    for (task, variant), runs in groups.items():
        vals = [r["value"] for r in runs if r["value"] is not None]
        rows.append(dict(task=task, variant=variant, ratio=runs[0]["ratio"], metric=runs[0]["metric"],
                         mean=statistics.fmean(vals) if vals else math.nan,
                         std=statistics.stdev(vals) if len(vals) > 1 else 0.0, seeds=len(vals),
                         dynamic_ratio=statistics.fmean(r["dynamic_ratio"] for r in runs)))
    return rows


def table(results: List[Dict[str, Any]]) -> str:
    lines = ["| task | variant | target ratio | achieved ratio | metric | mean | std | seeds |",
             "|---|---|---|---|---|---|---|---|"]
    for row in aggregate(results):
        ratio = "-" if math.isnan(row["ratio"]) else f"{row['ratio']:g}"
        achieved = "-" if math.isnan(row["dynamic_ratio"]) else f"{row['dynamic_ratio']:.3f}"
        lines.append(f"| {row['task']} | {row['variant']} | {ratio} | {achieved} | {row['metric']} "
                     f"| {row['mean']:.4f} | {row['std']:.4f} | {row['seeds']} |")
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
        ax.set_xlabel("dynamic ratio")
        ax.set_ylabel(mine[0]["metric"] if mine else "metric")
        ax.set_title(task)
        ax.legend(fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
