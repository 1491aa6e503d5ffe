"""``padnet-ds train | eval | study | inspect | reshard | export | predict``: argument parsing only; the
work is in ``engine/`` and ``export/``.

Run under any launcher (``deepspeed``, ``torchrun``, ``mpirun``) or as one process. The
``deepspeed`` launcher appends ``--local_rank=N``; it is accepted and ignored (the rank
comes from the environment).

Exit status: 0, or 2 for bad input (:class:`~padnet_ds.errors.InputError`, a missing file): the
message names the key or file and no traceback is printed; 1 for anything else. In a multi-rank
job the rank that fails exits at once (``os._exit``: no interpreter shutdown that could wait on
a collective), so the launcher stops the others; a rank whose collective failed because another
rank went away says so in one line and waits for the launcher to stop it, so the launcher
reports the failing rank's exit status and the user reads that rank's message.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
import traceback
from typing import List, Optional

PEER_GRACE_S = 10.0  # how long a rank whose peer failed waits to be stopped by the launcher


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="padnet-ds", description="PAD-Net partially dynamic MoE on DeepSpeed")
    p.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)
    sub = p.add_subparsers(dest="command", required=True)
    t = sub.add_parser("train", help="fine-tune a PAD-MoE model (YAML config + key=value overrides)")
    t.add_argument("config", help="run config YAML, e.g. configs/smoke.yaml")
    t.add_argument("overrides", nargs="*", help="key=value, e.g. train.steps=100 output_dir=runs/x resume=true")
    e = sub.add_parser("eval", help="evaluate the newest intact checkpoint of a run")
    e.add_argument("checkpoint", help="run folder (output_dir), its checkpoints/ folder, or one tag folder")
    e.add_argument("overrides", nargs="*", help="data.* overrides to evaluate on other data, e.g. data.task=mrpc")
    e.add_argument("--predictions", metavar="FILE", help="also write each eval row's logits to FILE (JSON lines)")
    s = sub.add_parser("study", help="dense vs fully dynamic MoE vs PAD at several ratios (+ random ablation)")
    s.add_argument("config", help="base run config, e.g. configs/study.yaml")
    s.add_argument("overrides", nargs="*", help="tasks=sst2,mrpc ratios=1.0,0.5,0.3 seeds=1,2 out=DIR "
                   "[dense=false ablation=false] plus run-config key=value overrides")
    i = sub.add_parser("inspect", help="describe a checkpoint: layers, experts, dynamic ratios, parameter counts")
    i.add_argument("checkpoint")
    i.add_argument("--json", action="store_true", help="print JSON instead of a table")
    rs = sub.add_parser("reshard", help="rewrite a checkpoint for another cluster shape (offline): a new run folder "
                       "to resume with resume=true at that many ranks")
    rs.add_argument("checkpoint", help="run folder (output_dir), its checkpoints/ folder, or a checkpoint tag folder")
    rs.add_argument("out", help="the new run folder (must not exist)")
    rs.add_argument("--world-size", type=int, required=True, help="ranks of the new layout")
    rs.add_argument("--ep-size", type=int, required=True, help="moe.ep_size of the new layout")
    rs.add_argument("--zero-stage", type=int, default=None, choices=(0, 1, 2), help="default: the checkpoint's")
    x = sub.add_parser("export", help="write a checkpoint as a folder that loads without DeepSpeed "
                       "(transformers from_pretrained, pipeline, padnet-ds predict)")
    x.add_argument("checkpoint", help="run folder (its latest checkpoint), its checkpoints/ folder, or a tag folder")
    x.add_argument("out_dir", help="the export folder (written whole, then renamed into place)")
    x.add_argument("--dtype", choices=("fp32", "bf16", "fp16"), default="fp32", help="weights' dtype (default fp32; "
                   "the gate and the lambdas stay fp32)")
    x.add_argument("--overwrite", action="store_true", help="replace an out_dir that already holds files")
    r = sub.add_parser("predict", help="classify the rows of a CSV/TSV/JSONL file with an export")
    r.add_argument("export", help="an export folder (padnet-ds export)")
    r.add_argument("input", help="a .csv, .tsv or .jsonl file with the text column(s)")
    r.add_argument("--output", help="write .csv/.tsv/.jsonl (by extension) instead of JSON lines on stdout")
    r.add_argument("--text-columns", help="comma-separated: one column, or two for sentence pairs (default: the "
                   "run's data.text_columns for file data, else 'text')")
    r.add_argument("--batch-size", type=int, default=32)
    r.add_argument("--compose", choices=("load", "forward"), help="compose expert weights once at load (default) "
                   "or per forward (less memory)")
    r.add_argument("--device", help="e.g. cpu, cuda, cuda:1 (default: cuda when available)")
    return p


def main(argv: Optional[List[str]] = None) -> int:
    args = _parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    from .comm import peer_failed
    from .errors import InputError

    commands = {"train": _train, "eval": _eval, "study": _study, "inspect": _inspect, "reshard": _reshard,
                "export": _export, "predict": _predict}
    try:
        return commands[args.command](args)
    except (InputError, FileNotFoundError, NotADirectoryError, IsADirectoryError, PermissionError) as err:
        return _fail(f"error: {err}", 2)
    except Exception as err:  # noqa: BLE001 - decides how a rank of a multi-rank job ends
        if not _distributed():
            raise
        if peer_failed(err):
            return _fail(f"stopped: another rank failed (see that rank's message): {_first_line(err)}",
                         1, grace=PEER_GRACE_S)
        traceback.print_exc()
        return _fail(None, 1)


def _distributed() -> bool:
    from .comm import dist_on, world_size

    return dist_on() and world_size() > 1


def _first_line(err: BaseException) -> str:
    return (str(err).strip().splitlines() or [type(err).__name__])[0][:300]


def _fail(message: Optional[str], code: int, grace: float = 0.0) -> int:
    """Print ``message`` (with the rank in a multi-rank job); in one, end this rank now."""
    from .comm import rank

    if not _distributed():
        if message:
            print(f"padnet-ds: {message}", file=sys.stderr)
        return code
    if message:
        print(f"padnet-ds (rank {rank()}): {message}", file=sys.stderr)
    sys.stdout.flush()
    sys.stderr.flush()
    time.sleep(grace)
    os._exit(code)


def _train(args) -> int:
    from .engine.config import load_config
    from .comm import rank
    from .engine.trainer import train

    cfg = load_config(args.config, args.overrides)
    summary = train(cfg)
    if rank() == 0:
        main = summary["main_metric"]
        print(f"eval {main}: {summary['eval'].get(main, float('nan')):.4f}  "
              f"dynamic ratio: {summary['dynamic_ratio']:.3f}  steps: {summary['steps']}")
        print(f"summary: {cfg.output_dir}/summary.json")
        print(f"TensorBoard: tensorboard --logdir {cfg.output_dir}/tensorboard")
    return 0


def _eval(args) -> int:
    from .comm import rank
    from .engine.eval_checkpoint import evaluate_run

    metrics = evaluate_run(args.checkpoint, args.overrides, args.predictions)
    if rank() == 0:
        print(json.dumps(metrics, indent=2))
    return 0


def _study(args) -> int:
    from .comm import rank
    from .engine.study import run_study

    result = run_study(args.config, args.overrides)
    if rank() == 0:
        print(result["table"])
    return 0


def _inspect(args) -> int:
    from .engine.inspect import format_report, inspect_checkpoint

    info = inspect_checkpoint(args.checkpoint)
    print(json.dumps(info, indent=2) if args.json else format_report(info))
    return 0


def _reshard(args) -> int:
    from .engine.reshard import reshard

    done = reshard(args.checkpoint, args.out, args.world_size, args.ep_size, args.zero_stage)
    print(f"resharded {done['source']} ({done['from']}) -> {done['out']} ({done['to']}); {done['batch']}")
    print(f"resume: padnet-ds train {done['out']}/config.yaml resume=true  (at {args.world_size} ranks)")
    return 0


def _export(args) -> int:
    from .export.writer import export_run

    sizes = export_run(args.checkpoint, args.out_dir, args.dtype, args.overwrite)
    ratio = sizes["expert_bytes_ratio"]
    print(f"exported {sizes['checkpoint']} to {sizes['out_dir']}: {sizes['folder_bytes'] / 2 ** 20:.2f} MiB"
          + (f", expert storage {ratio:.3f} of a fully dynamic model's" if ratio else ""))
    return 0


def _predict(args) -> int:
    from .export.predict import predict_file, render

    columns = [c.strip() for c in args.text_columns.split(",")] if args.text_columns else None
    rows = predict_file(args.export, args.input, args.output, columns, args.batch_size, args.compose, args.device)
    if args.output is None:
        sys.stdout.write(render(rows, "jsonl"))
    else:
        print(f"{len(rows)} predictions: {args.output}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
