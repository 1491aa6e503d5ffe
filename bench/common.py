"""Helpers shared by the benchmarks: interleaved timing, tables, JSON, machine facts, shapes.

Every benchmark compares variants *inside one process* (or one group of ranks), timing them
interleaved A B A B ... after a warm-up and reporting medians, so that the noise of a shared
machine hits every variant alike and only ratios are reported as results.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import platform
import statistics
import time
from pathlib import Path
from typing import Any, Callable, Dict, Iterable, List, Mapping, Optional, Sequence

# The two MoE shapes of the issue (docs/PAD.md section 8). Tokens are per rank; with E=8, k=2,
# capacity factor 1.25 and ep_size 2 a local expert sees 2 * tokens * k / E * 1.25 rows.
SHAPES: Dict[str, Dict[str, int]] = {
    "h256": dict(hidden=256, ffn=1024, batch=8, seq=128),
    # BERT-base FFN with "as many tokens as fit": micro-batch 8 at BERT's full 512-token sequence
    # (2560 rows per local expert; a step takes a few seconds on one CPU core per rank).
    "h768": dict(hidden=768, ffn=3072, batch=8, seq=512),
    # BERT-base FFN with few tokens (320 rows per local expert, docs/PAD.md section 8's reference
    # shape): the weight-sized composition weighs most against the GEMMs here.
    "h768s": dict(hidden=768, ffn=3072, batch=4, seq=128),
}
DEFAULT_SHAPES = "h256,h768s"  # layer-level benchmarks; bench.moe_step adds h768
MOE = dict(experts=8, k=2, capacity_factor=1.25, ep_size=2)


def tune_malloc() -> bool:
    """Keep freed multi-MB blocks in glibc's heap instead of returning them to the OS.

    By default every large tensor is a fresh ``mmap`` that page-faults on first touch, so the
    same copy can take 1 ms or 12 ms depending on what was freed before it; a small A/B
    difference (scoring on/off) drowns in that. This is what a GPU caching allocator does
    anyway. Applies to this process from now on; False where there is no glibc ``mallopt``.
    """
    import ctypes
    import ctypes.util

    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    m_trim_threshold, m_top_pad, m_mmap_threshold = -1, -2, -3
    ok = mallopt(m_mmap_threshold, 32 << 20)  # glibc's ceiling for this setting
    ok &= mallopt(m_trim_threshold, (1 << 31) - 1)
    ok &= mallopt(m_top_pad, 256 << 20)
    return bool(ok)


def tokens(shape: Mapping[str, int]) -> int:
    return shape["batch"] * shape["seq"]


def rows_per_local_expert(shape: Mapping[str, int], ep_size: int = 2, experts: int = 8, k: int = 2,
                          capacity_factor: float = 1.25) -> int:
    """GEMM rows one local expert processes (DeepSpeed's capacity, gathered from ep_size ranks)."""
    capacity = math.ceil(tokens(shape) / experts * k * capacity_factor)
    return ep_size * capacity


def parser(doc: str, name: str) -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=f"bench/results/{name}.json", help="where to write the JSON results")
    ap.add_argument("--quick", action="store_true", help="CI-sized run: few repetitions, smaller shapes where noted")
    ap.add_argument("--warmup", type=int, default=None, help="warm-up repetitions per variant (default per benchmark)")
    ap.add_argument("--reps", type=int, default=None, help="timed repetitions per variant (default per benchmark)")
    return ap


def add_shape_args(ap: argparse.ArgumentParser, threads: bool = True) -> None:
    ap.add_argument("--shapes", default=None, help="comma list of " + ",".join(SHAPES) + " (quick: h256)")
    if threads:
        ap.add_argument("--threads", type=int, default=1, help="torch threads in this process")


def chosen_shapes(args, default: str = DEFAULT_SHAPES) -> List[str]:
    """The shapes to run (quick runs: h256 only); also applies ``--threads`` when the benchmark has it."""
    if getattr(args, "threads", None):
        import torch

        torch.set_num_threads(args.threads)
    shapes = (args.shapes or ("h256" if args.quick else default)).split(",")
    unknown = [s for s in shapes if s not in SHAPES]
    if unknown:
        raise SystemExit(f"--shapes: unknown shape(s) {unknown}; choose from {sorted(SHAPES)}")
    return shapes


def reps(args, default: int, quick: int) -> int:
    return args.reps if args.reps is not None else (quick if args.quick else default)


def warmup(args, default: int, quick: int) -> int:
    return args.warmup if args.warmup is not None else (quick if args.quick else default)


def timed(fn: Callable[[], Any]) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def interleave(variants: Mapping[str, Callable[[], Any]], warmup: int, reps: int,
               clock: Optional[Callable[[Callable[[], Any]], Any]] = None) -> Dict[str, List[Any]]:
    """Run ``variants`` round-robin (A B C A B C ...) ``warmup + reps`` times; keep the timed rounds.

    ``clock(fn)`` measures one call (default: wall time of ``fn()``); it may return a float or a
    dict of phase times. The order inside a round rotates so no variant always goes first.
    """
    clock = clock or timed
    names = list(variants)
    out: Dict[str, List[Any]] = {n: [] for n in names}
    for rnd in range(warmup + reps):
        shift = rnd % len(names)
        for name in names[shift:] + names[:shift]:
            value = clock(variants[name])
            if rnd >= warmup:
                out[name].append(value)
    return out


def median(values: Iterable[float]) -> float:
    return float(statistics.median(list(values)))


def quartiles(values: Sequence[float]) -> List[float]:
    """[25th percentile, median, 75th percentile] (inclusive method; one value gives it thrice)."""
    vals = [float(v) for v in values]
    if len(vals) < 2:
        return vals * 3
    q1, q2, q3 = statistics.quantiles(vals, n=4, method="inclusive")
    return [q1, q2, q3]


def phase_medians(samples: Sequence[Mapping[str, float]]) -> Dict[str, float]:
    """Median of each phase over samples that are dicts of phase times."""
    return {k: median(s[k] for s in samples) for k in samples[0]}


def table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    cells = [[_fmt(c) for c in row] for row in rows]
    widths = [max(len(str(h)), *(len(r[i]) for r in cells)) if cells else len(str(h)) for i, h in enumerate(headers)]
    lines = ["  ".join(str(h).ljust(w) if i == 0 else str(h).rjust(w) for i, (h, w) in enumerate(zip(headers, widths)))]
    for r in cells:
        lines.append("  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths))))
    return "\n".join(lines)


def _fmt(c: Any) -> str:
    if isinstance(c, float):
        return f"{c:.3f}" if abs(c) < 1e4 else f"{c:.4g}"
    return str(c)


def machine() -> Dict[str, Any]:
    import torch

    info: Dict[str, Any] = dict(cpus=os.cpu_count(), platform=platform.platform(), python=platform.python_version(),
                                torch=torch.__version__, torch_threads=torch.get_num_threads(),
                                omp_num_threads=os.environ.get("OMP_NUM_THREADS"),
                                cuda=torch.cuda.get_device_name(0) if torch.cuda.is_available() else None)
    try:
        import deepspeed

        info["deepspeed"] = deepspeed.__version__
    except Exception:  # noqa: BLE001
        info["deepspeed"] = None
    try:
        info["load_average"] = os.getloadavg()
    except OSError:
        pass
    return info


def finite(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def write_json(path: str, result: Mapping[str, Any]) -> Path:
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2, default=_json_default) + "\n")
    return out


def _json_default(o: Any) -> Any:
    if hasattr(o, "tolist"):
        return o.tolist()
    if isinstance(o, Path):
        return str(o)
    return str(o)


def spawn(fn: Callable[..., Any], world: int, *args: Any, timeout: float = 1200.0) -> List[Any]:
    """Run ``fn(*args)`` on ``world`` real gloo ranks (one thread each); results in rank order."""
    from padnet_ds.testing import run_ranks

    return run_ranks(fn, world, *args, timeout=timeout)


def setup_env() -> None:
    """Process defaults for CPU benchmarks, before torch/DeepSpeed are imported by the caller."""
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    repo = Path(__file__).resolve().parents[1]
    os.environ.setdefault("TORCH_EXTENSIONS_DIR", str(repo / ".torch_extensions"))
    import padnet_ds._env  # noqa: F401


def quiet_deepspeed() -> None:
    import logging

    for name in ("DeepSpeed", "deepspeed"):
        logging.getLogger(name).setLevel(logging.ERROR)
    try:
        from deepspeed.utils import logger

        logger.setLevel(logging.ERROR)
    except Exception:  # noqa: BLE001
        pass
