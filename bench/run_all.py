"""Run every benchmark and write ``bench-results.json`` at the repository root (``make bench``).

    python -m bench.run_all [--quick] [--out bench-results.json] [--only moe_step,memory,...]

Each benchmark runs as its own ``python -m bench.<name>`` subprocess (so one crashing, or one
holding memory, does not disturb the next) and writes ``bench/results/<name>.json``; this script
collects the headline numbers. A benchmark that fails or is absent is recorded as null with
the reason under ``errors``. ``--quick`` passes ``--quick`` (CI-sized runs) to every benchmark.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Dict, List, Optional

from . import common

REPO = Path(__file__).resolve().parents[1]
BENCHES = ("moe_step", "authors_layer", "memory", "gemm", "scaling", "partitioner", "dyconv", "imp_recovery")
IMP_RECOVERY_KEYS = ("imp_recovery_precision", "imp_recovery_precision_random", "imp_recovery_precision_magnitude",
                     "imp_recovery_loss_ratio", "imp_recovery_loss_ratio_random", "imp_recovery_loss_ratio_magnitude")


def _args(name: str, quick: bool) -> List[str]:
    if name == "dyconv":  # another helper's benchmark, with its own flags (no --quick)
        return ["--reps", "5", "--warmup", "2", "--threads", "1"] if quick else ["--threads", "1"]
    return ["--quick"] if quick else []


def run(name: str, quick: bool, results_dir: Path, timeout: float) -> Dict[str, Any]:
    out = results_dir / f"{name}.json"
    if out.exists():
        out.unlink()
    cmd = [sys.executable, "-m", f"bench.{name}", "--out", str(out)] + _args(name, quick)
    env = dict(os.environ, OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "1"), PYTHONUNBUFFERED="1")
    start = time.monotonic()
    print(f"\n=== {' '.join(cmd[1:])}", flush=True)
    proc = subprocess.run(cmd, cwd=REPO, env=env, timeout=timeout, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                          text=True)
    wall = time.monotonic() - start
    noise = ("WARNING", "FutureWarning", "return func(", "process group")
    print("\n".join(line for line in proc.stdout.splitlines() if not any(n in line for n in noise)), flush=True)
    if proc.returncode != 0:
        raise RuntimeError(f"bench.{name} exited with {proc.returncode}; last output:\n{proc.stdout[-2000:]}")
    return dict(json.loads(out.read_text()), _wall_s=wall)


def number(d: Optional[Dict[str, Any]], *path: str) -> Optional[float]:
    for key in path:
        if not isinstance(d, dict) or key not in d:
            return None
        d = d[key]
    return float(d) if common.finite(d) else None


def partitioner_overhead(d: Optional[Dict[str, Any]]) -> Optional[float]:
    if not isinstance(d, dict):
        return None
    for key in ("partitioner_overhead", "overhead", "overhead_fraction"):
        if common.finite(d.get(key)):
            return float(d[key])
    return None


def main(argv=None) -> Dict[str, Any]:
    common.setup_env()
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--out", default=str(REPO / "bench-results.json"))
    ap.add_argument("--results-dir", default=str(REPO / "bench" / "results"))
    ap.add_argument("--only", default=",".join(BENCHES), help="comma list of benchmarks to run")
    ap.add_argument("--timeout", type=float, default=1800.0, help="seconds per benchmark")
    args = ap.parse_args(argv)
    results_dir = Path(args.results_dir)
    results_dir.mkdir(parents=True, exist_ok=True)
    raw: Dict[str, Optional[Dict[str, Any]]] = {}
    errors: Dict[str, str] = {}
    for name in args.only.split(","):
        if not (REPO / "bench" / f"{name}.py").exists():
            raw[name], errors[name] = None, f"bench/{name}.py not present"
            continue
        try:
            raw[name] = run(name, args.quick, results_dir, args.timeout)
        except Exception as exc:  # noqa: BLE001 - record and go on with the others
            raw[name], errors[name] = None, str(exc)[-3000:]
            print(f"!!! bench.{name} failed: {str(exc)[:500]}", flush=True)
    ms, al, mem, gm, sc = (raw.get(n) for n in ("moe_step", "authors_layer", "memory", "gemm", "scaling"))
    summary: Dict[str, Any] = dict(
        step_ratio_vs_deepspeed_moe=number(ms, "step_ratio_vs_deepspeed_moe"),
        step_ratio_per_shape=(ms or {}).get("step_ratio_per_shape"),
        fill_fraction_per_shape=(ms or {}).get("fill_fraction_per_shape"),
        step_ratio_dropless_vs_deepspeed_no_drop_per_shape=(ms or {}).get(
            "step_ratio_dropless_vs_deepspeed_no_drop_per_shape"),
        fill_fraction_no_drop_per_shape=(ms or {}).get("fill_fraction_no_drop_per_shape"),
        layer_ratio_vs_authors=number(al, "layer_ratio_vs_authors"),
        layer_ratio_per_shape=(al or {}).get("layer_ratio_per_shape"),
        memory_ratio_r05=number(mem, "memory_ratio_r05"),
        memory_ratio_r03=number(mem, "memory_ratio_r03"),
        memory_ratio_packed_r05=number(mem, "memory_ratio_packed_r05"),
        memory_ratio_packed_r03=number(mem, "memory_ratio_packed_r03"),
        checkpoint_bytes_ratio_packed_r05=number(mem, "checkpoint_bytes_ratio_packed_r05"),
        step_ratio_packed_vs_deepspeed_moe=number(ms, "step_ratio_packed_vs_deepspeed_moe"),
        step_ratio_packed_per_shape=(ms or {}).get("step_ratio_packed_per_shape"),
        activation_ratio_r05=number(mem, "activation_ratio_r05"),
        deployment_ratio_r05=number(mem, "deployment_ratio_r05"),
        deployment_ratio_r03=number(mem, "deployment_ratio_r03"),
        gemm_efficiency=number(gm, "gemm_efficiency"),
        gemm_efficiency_per_shape=(gm or {}).get("gemm_efficiency_per_shape"),
        grouped_kernel_vs_loop_per_shape=(gm or {}).get("grouped_kernel_vs_loop_per_shape"),
        partitioner_overhead=partitioner_overhead(raw.get("partitioner")),
        partitioner_overhead_per_shape=(raw.get("partitioner") or {}).get("overhead_per_shape"),
        weak_scaling=number(sc, "weak_scaling"),
        dyconv_ratio=number(raw.get("dyconv"), "ratio_vs_plain", "pad"),
        **{key: number(raw.get("imp_recovery"), key) for key in IMP_RECOVERY_KEYS},
    )
    if raw.get("imp_recovery"):  # the spread over seeds beside the means
        summary["imp_recovery_seeds"] = {f"{what}_{m}": {k: v for k, v in d.items() if k != "std"}
                                         for what in ("precision", "loss_ratio")
                                         for m, d in raw["imp_recovery"][what].items()}
    if ms:
        summary["step_overhead_breakdown"] = {s: r.get("overhead_share_of_moe_step")
                                              for s, r in ms.get("results", {}).items()}
    shapes: Dict[str, Any] = {}
    for name, d in raw.items():
        if d and "shapes" in d:
            shapes[name] = d["shapes"]
    if raw.get("dyconv"):
        shapes["dyconv"] = raw["dyconv"].get("config")
    summary.update(shapes=shapes, machine=common.machine(), quick=args.quick,
                   wall_s={n: d.get("_wall_s") for n, d in raw.items() if d}, errors=errors,
                   details={n: str(results_dir / f"{n}.json") for n, d in raw.items() if d})
    Path(args.out).write_text(json.dumps(summary, indent=2, default=str) + "\n")
    print("\n" + common.table(["key", "value"], [[k, v] for k, v in summary.items() if v is None or common.finite(v)]))
    if errors:
        print(f"failed or missing: {', '.join(errors)}")
    print(f"wrote {args.out}")
    return summary


if __name__ == "__main__":
    main()
