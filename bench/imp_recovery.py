"""Does IMP find the entries that matter? Precision of the partitioned mask on a planted problem.

    python -m bench.imp_recovery [--quick] [--seeds 1,2,3] [--out bench/results/imp_recovery.json]

The teacher is a stack of PAD-MoE layers whose experts equal one static weight except at a
planted set ``P`` (``r*`` of every PAD linear's entries, shared by the experts;
``bench/planted.py``). A student upcycled from the static weight (every expert a copy; the
teacher's gate, frozen) is trained on the teacher's outputs (MSE, torch's AdamW at a constant
``lr``) through the real DeepSpeed engine on 2 gloo ranks (``build_engine``, ep_size 2,
ZeRO 2), each rank on its own shard of the data. The partitioner runs in ``in_training`` mode
with the package's default schedule (fully dynamic for ``warmup`` steps, T partition steps
every ``interval`` steps to ``r*``, exponential, global scope) and each method (``imp``,
``random``, ``magnitude``), then training goes on for ``tail`` steps; the fully dynamic student
(no partition) trains as many steps. Reported per seed:

    precision  = |M and P| / |M|        per PAD linear, per layer and overall (random: r* expected)
    loss       = final MSE on held-out inputs;   loss_ratio = loss(method) / loss(fully dynamic)

Diagnostics (why a method falls short), on the first seed:

- ``planted_share``: after warm-up, the share of the experts' squared deviation from the static
  side ``sum (lambda_d W_e - lambda_s W_static)^2`` that lies on ``P`` (did the experts diverge
  where the teacher's do?);
- sweeps of IMP's precision over the schedule (T, interval) and the warm-up length;
- ``anatomy``: a fully dynamic student whose per-step global IMP sensitivities ``s_t = dL/dM``
  (the partitioner's own score sinks and all-reduce) are kept, so that the precision of the
  top ``r*`` can be read for any scoring window ``[a, a + n)``: of IMP's score ``|sum_t s_t|``
  and, for comparison, of ``sum_t |s_t|``, with the coherence ``|sum_t s_t| / sum_t |s_t|`` on
  and off ``P`` (1: the per-step sensitivities agree in sign; near 0: they cancel).
"""
from __future__ import annotations

import dataclasses
import statistics
import time
from typing import Any, Dict, List, Optional, Sequence

from . import common
from .planted import Problem

METHODS = ("imp", "random", "magnitude")
ANATOMY_STARTS = (0, 25, 50, 100, 200, 400)
ANATOMY_LENGTHS = (5, 20, 50, 100)


@dataclasses.dataclass(frozen=True)
class Schedule:
    warmup: int = 100  # = PartitionConfig's defaults (warmup_steps, steps, interval)
    steps: int = 4
    interval: int = 50
    tail: int = 100  # optimizer steps after the last partition step
    lr: float = 3e-3

    @property
    def total(self) -> int:
        return self.warmup + self.steps * self.interval + self.tail


def ds_config(micro: int) -> Dict[str, Any]:
    return {"train_micro_batch_size_per_gpu": micro, "gradient_accumulation_steps": 1,
            "zero_optimization": {"stage": 2}, "gradient_clipping": 0.0, "steps_per_print": 10**9,
            "zero_allow_untested_optimizer": True, "wall_clock_breakdown": False}


def build(p: Problem, sched: Schedule, method: str, **partition):
    """(engine, partitioner) for one student on this rank; collective."""
    import torch

    from padnet_ds.engine.setup import build_engine
    from padnet_ds.partition import PartitionConfig, Partitioner

    from .planted import make_student

    engine = build_engine(make_student(p, ep_size=2), ds_config(p.batch),
                          optimizer=lambda groups: torch.optim.AdamW(groups, lr=sched.lr, weight_decay=0.0))
    cfg = dict(ratio=1.0 if method == "dynamic" else p.ratio, method="imp" if method == "dynamic" else method,
               warmup_steps=sched.warmup, interval=sched.interval, steps=sched.steps, seed=p.seed)
    return engine, Partitioner(engine.module, PartitionConfig(**{**cfg, **partition}), engine)


def step(engine, data, g: int) -> None:
    import torch.nn.functional as F

    from padnet_ds.comm import rank

    xs, ys = data["train_x"][rank()], data["train_y"][rank()]
    i = g % xs.shape[0]
    engine.backward(F.mse_loss(engine(xs[i].to(engine.device)), ys[i].to(engine.device)))
    engine.step()


def train_student(p: Problem, sched: Schedule, method: str, data, planted) -> Dict[str, Any]:
    """One student trained through the schedule (collective: every rank runs the same call)."""
    from .planted import masks_of, precision

    engine, part = build(p, sched, method)
    out: Dict[str, Any] = {"method": method, "loss_initial": eval_loss(engine, data), "partition_steps": []}
    start = time.perf_counter()
    for g in range(sched.total):
        part.before_step(g)
        step(engine, data, g)
        entry = part.after_step(g + 1)
        if g + 1 == sched.warmup:
            out["planted_share"] = planted_share(engine.module, planted)
            out["loss_after_warmup"] = eval_loss(engine, data)
        if entry is not None:
            got = precision(masks_of(engine.module), planted)["overall"]
            # recall: the share of P still dynamic (|M| = ratio n, |P| = r* n)
            out["partition_steps"].append({"global_step": entry["global_step"], "ratio": entry["ratio"],
                                           "precision": got, "recall": got * entry["achieved"] / p.ratio,
                                           "loss": eval_loss(engine, data)})
    out["train_s"] = time.perf_counter() - start
    out["loss"] = eval_loss(engine, data)
    out["precision"] = precision(masks_of(engine.module), planted)
    out["dynamic_ratio"] = part.overall_ratio()
    return out


def planted_share(model, planted) -> float:
    """The share on ``P`` of every expert's squared deviation from the static side (collective)."""
    from padnet_ds.comm import reduce_values

    from .planted import deviation_split

    on, off = reduce_values(list(deviation_split(model, planted)))
    return on / (on + off) if on + off else float("nan")


def eval_loss(engine, data) -> float:
    """MSE on the held-out batches, averaged over ranks (collective)."""
    import torch
    import torch.nn.functional as F

    from padnet_ds.comm import rank, reduce_values, world_size

    xs, ys = data["eval_x"][rank()], data["eval_y"][rank()]
    engine.eval()
    with torch.no_grad():
        total = sum(float(F.mse_loss(engine(x.to(engine.device)), y.to(engine.device))) for x, y in zip(xs, ys))
    engine.train()
    return reduce_values([total / xs.shape[0]])[0] / world_size()


def anatomy(p: Problem, sched: Schedule, data, planted, steps: int) -> Dict[str, Any]:
    """Per-step global IMP sensitivities of a fully dynamic student, read through windows (see module doc)."""
    import torch

    from padnet_ds.partition.sync import global_imp_scores

    # Scoring on from the first step and never due: the partitioner only feeds its score book.
    engine, part = build(p, sched, "imp", warmup_steps=0, interval=10**9, steps=1)
    per_step = []
    for g in range(steps):
        part.before_step(g)
        step(engine, data, g)
        per_step.append(torch.cat([s.reshape(-1) for s in global_imp_scores(part.sites, part.book.local())]).cpu())
        part.book.reset()
    flat_p = torch.cat([planted[s.name].reshape(-1) for s in part.sites])
    return window_precisions(torch.stack(per_step), flat_p, p.ratio, ANATOMY_STARTS, ANATOMY_LENGTHS)


def window_precisions(per_step, planted_flat, ratio: float, starts, lengths) -> Dict[str, Any]:
    """For windows [a, a+n): precision of the top ``ratio`` by |sum s_t| and by sum |s_t|; coherence on/off P."""
    import torch

    from padnet_ds.partition.select import dynamic_count, top_k

    k = dynamic_count(planted_flat.numel(), ratio)
    signed = torch.cat([torch.zeros_like(per_step[:1]), per_step.cumsum(0)])  # [steps + 1, n]
    absolute = torch.cat([torch.zeros_like(per_step[:1]), per_step.abs().cumsum(0)])

    def prec(score) -> float:
        return float(torch.count_nonzero(top_k(score, k) & planted_flat)) / k

    out: Dict[str, Any] = {}
    for a in starts:
        for n in lengths:
            if a + n > per_step.shape[0]:
                continue
            s, m = (signed[a + n] - signed[a]).abs(), absolute[a + n] - absolute[a]
            coherence = s / m.clamp_min(torch.finfo(m.dtype).tiny)
            out[f"{a}+{n}"] = {"abs_of_sum": prec(s), "sum_of_abs": prec(m),
                               "coherence_planted": float(coherence[planted_flat].mean()),
                               "coherence_other": float(coherence[~planted_flat].mean())}
    return out


def _rank(plan: Dict[str, Any], problems: Dict[int, tuple]) -> Dict[str, Any]:
    common.quiet_deepspeed()
    results: Dict[str, Any] = {"seeds": {}, "sweeps": {}, "anatomy": None}
    first = plan["seeds"][0]
    for seed, (data, planted) in problems.items():
        p = dataclasses.replace(plan["problem"], seed=seed)
        results["seeds"][seed] = {m: train_student(p, plan["schedule"], m, data, planted)
                                  for m in ("dynamic", *METHODS)}
        if seed == first:
            for name, sched in plan["sweeps"]:
                results["sweeps"][name] = train_student(p, sched, "imp", data, planted)
            if plan["anatomy_steps"]:
                results["anatomy"] = anatomy(p, plan["schedule"], data, planted, plan["anatomy_steps"])
    return results


def planted_problems(problem: Problem, seeds: Sequence[int]) -> Dict[int, tuple]:
    """{seed: (teacher data, planted sets)}, computed here in one process (the teacher at ep_size 1)."""
    from .planted import make_teacher, teacher_data

    out = {}
    for seed in seeds:
        p = dataclasses.replace(problem, seed=seed)
        teacher, planted = make_teacher(p)
        out[seed] = (teacher_data(p, teacher, 2), planted)
    return out


def sweeps(base: Schedule, quick: bool) -> List[tuple]:
    """(label, schedule): the partition schedule (T, interval), then the warm-up length, one at a time."""
    if quick:
        return [(f"warmup={base.warmup * 3}", dataclasses.replace(base, warmup=base.warmup * 3))]
    out = [(f"steps={t},interval={i}", dataclasses.replace(base, steps=t, interval=i))
           for t, i in ((1, 50), (2, 50), (8, 25), (4, 10))]
    out += [(f"warmup={w}", dataclasses.replace(base, warmup=w)) for w in (0, 300)]
    return out


def spread(values: List[float]) -> Dict[str, Any]:
    return {"mean": statistics.fmean(values), "min": min(values), "max": max(values),
            "std": statistics.stdev(values) if len(values) > 1 else 0.0, "per_seed": values}


def summarize(res: Dict[str, Any]) -> Dict[str, Any]:
    runs = list(res["seeds"].values())
    prec = {m: spread([r[m]["precision"]["overall"] for r in runs]) for m in METHODS}
    ratio = {m: spread([r[m]["loss"] / r["dynamic"]["loss"] for r in runs]) for m in METHODS}
    loss = {m: spread([r[m]["loss"] for r in runs]) for m in ("dynamic", *METHODS)}
    # the share of the upcycled student's error left at the end (the teacher is exactly representable)
    left = {m: spread([r[m]["loss"] / r[m]["loss_initial"] for r in runs]) for m in ("dynamic", *METHODS)}
    keys = {f"imp_recovery_precision{'' if m == 'imp' else '_' + m}": prec[m]["mean"] for m in METHODS}
    keys.update({f"imp_recovery_loss_ratio{'' if m == 'imp' else '_' + m}": ratio[m]["mean"] for m in METHODS})
    return dict(keys, precision=prec, loss_ratio=ratio, loss=loss, error_left=left)


def main(argv: Optional[Sequence[str]] = None) -> Dict[str, Any]:
    common.setup_env()
    ap = common.parser(__doc__, "imp_recovery")
    ap.add_argument("--seeds", default=None, help="comma list (default 1,2,3; quick: 1,2)")
    ap.add_argument("--anatomy-steps", type=int, default=None, help="steps of the anatomy run (0: skip it)")
    args = ap.parse_args(argv)
    seeds = [int(s) for s in (args.seeds or ("1,2" if args.quick else "1,2,3")).split(",")]
    problem = Problem()
    schedule = Schedule(warmup=30, steps=2, interval=10, tail=20) if args.quick else Schedule()
    anatomy_steps = args.anatomy_steps if args.anatomy_steps is not None else (60 if args.quick else 500)
    plan = dict(problem=problem, schedule=schedule, seeds=seeds, sweeps=sweeps(schedule, args.quick),
                anatomy_steps=anatomy_steps)
    res = common.spawn(_rank, 2, plan, planted_problems(problem, seeds))[0]
    summary = summarize(res)
    report(res, summary, problem)
    result = dict(summary, r_star=problem.ratio, problem=dataclasses.asdict(problem),
                  schedule=dataclasses.asdict(schedule), seeds=seeds, quick=args.quick, machine=common.machine(),
                  runs=res["seeds"], sweeps=res["sweeps"], anatomy=res["anatomy"])
    if args.out:
        common.write_json(args.out, result)
    return result


def report(res: Dict[str, Any], summary: Dict[str, Any], problem: Problem) -> None:
    nan = float("nan")
    rows = [[f"seed {seed} {m}", nan if m == "dynamic" else r["precision"]["overall"], r["loss_initial"],
             r["loss_after_warmup"], r["loss"], r["loss"] / runs["dynamic"]["loss"], r["planted_share"],
             r["dynamic_ratio"]]
            for seed, runs in res["seeds"].items() for m, r in runs.items()]
    print(common.table(["run", "precision", "MSE initial", "after warm-up", "final", "vs dynamic",
                        "planted share", "dynamic ratio"], rows))
    first = next(iter(res["seeds"]))
    print(common.table([f"IMP, seed {first}", "precision", "MSE final", "recall of P after each partition step"],
                       [[k, v["precision"]["overall"], v["loss"],
                         " ".join(f"{s['recall']:.2f}" for s in v["partition_steps"])]
                        for k, v in [("default schedule", res["seeds"][first]["imp"]), *res["sweeps"].items()]]))
    if res["anatomy"]:
        print(common.table(["anatomy window", "|sum s_t|", "sum |s_t|", "coherence on P", "coherence off P"],
                           [[k, v["abs_of_sum"], v["sum_of_abs"], v["coherence_planted"], v["coherence_other"]]
                            for k, v in res["anatomy"].items()]))
    for m in METHODS:
        p, q = summary["precision"][m], summary["loss_ratio"][m]
        print(f"{m:9s} precision {p['mean']:.3f} (seeds {p['min']:.3f}-{p['max']:.3f}; r* = {problem.ratio}), "
              f"final loss / fully dynamic {q['mean']:.3f} (seeds {q['min']:.3f}-{q['max']:.3f}), "
              f"error left {summary['error_left'][m]['mean']:.4f} (fully dynamic: "
              f"{summary['error_left']['dynamic']['mean']:.4f})")


if __name__ == "__main__":
    main()
