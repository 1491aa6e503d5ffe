"""A catalogue of bad input: every case exits 2 with a message naming the key or file, no traceback,
fast, before any model is built where the input allows, and leaves the run folder as it was.

Most cases run ``padnet_ds.cli.main`` in one worker process, one after another (a real complete
run folder made once, copied where a case damages it); a few run ``python -m padnet_ds.cli`` as a
real process, and one runs under the ``deepspeed`` launcher on two ranks, where exit status and
output are the point.
"""
from __future__ import annotations

import contextlib
import io
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable, Dict, List, NamedTuple, Optional

import pytest

from padnet_ds.comm import free_port
from padnet_ds.testing import run_ranks

REPO = Path(__file__).resolve().parents[2]
SMOKE = str(REPO / "configs" / "smoke.yaml")
TINY = ["model.random_init={hidden_size: 16, num_hidden_layers: 1, num_attention_heads: 2, intermediate_size: 32}",
        "model.max_length=16", "moe.num_experts=2", "moe.ep_size=1", "partition.ratio=1.0", "train.steps=2",
        "train.micro_batch_size=4", "train.eval_every=0", "train.checkpoint_every=0", "train.log_every=1",
        "data.max_train_examples=16", "data.max_eval_examples=8"]
LIMIT_S = 10.0  # in one warm process a case takes well under a second; generous for a busy 2-core machine


class Case(NamedTuple):
    argv: Callable[["Paths"], List[str]]  # the command line after `padnet-ds`
    expect: str  # a substring of the message: the key or file named
    folder: str = "fresh"  # "fresh": output_dir must not appear; "run": a complete run, left unchanged
    env: Optional[Dict[str, str]] = None
    builds_model: bool = False  # True only where the problem is inside a file loaded into the model


class Paths(NamedTuple):
    tmp: Path  # the worker's folder of inputs
    run: Path  # a complete run folder (output_dir) of TINY
    fresh: Path  # an output_dir that does not exist


def train(*overrides, out="fresh", config=SMOKE):
    return lambda p: ["train", config(p) if callable(config) else config,
                      f"output_dir={getattr(p, out)}", *TINY, *overrides]


def file(name, content: bytes):
    def make(p: Paths) -> str:
        path = p.tmp / name
        path.write_bytes(content)
        return str(path)
    return make


def files_data(train_file, eval_file=None):
    return lambda p: ["data.source=files", f"data.train_file={train_file(p)}"] + (
        [f"data.eval_file={eval_file(p)}"] if eval_file else [])


def train_files(train_file, eval_file=None):
    return lambda p: ["train", SMOKE, f"output_dir={p.fresh}", *TINY, *files_data(train_file, eval_file)(p)]


def ds_json(settings):
    return file("ds.json", json.dumps({"zero_optimization": {"stage": 2}, **settings}).encode())


def train_ds(make):
    return lambda p: train(f"ds_config={make(p)}")(p)


CSV = b"text,label\ngood film,1\nbad film,0\n"


def failed_start(p: Paths) -> str:
    """A folder a start left before its first checkpoint: config.yaml and an empty checkpoints/."""
    (p.tmp / "failed" / "checkpoints").mkdir(parents=True)
    (p.tmp / "failed" / "config.yaml").write_text("seed: 1\n")
    return str(p.tmp / "failed")


CATALOGUE = {"config": {
    # config keys, types and ranges
    "unknown-key": Case(train("train.stepz=5"), "unknown config key train.stepz"),
    "unknown-section": Case(train("trian.steps=5"), "unknown config key trian"),
    "int-type": Case(train("train.steps=1.5"), "train.steps: expected an integer"),
    "bool-type": Case(train("resume=2"), "resume: expected true or false"),
    "negative-lr": Case(train("optim.lr=-1"), "optim.lr=-1"),
    "micro-batch-0": Case(train("train.micro_batch_size=0"), "train.micro_batch_size=0 must be"),
    "grad-accum-0": Case(train("train.grad_accum=0"), "train.grad_accum=0 must be"),
    "max-length-0": Case(train("model.max_length=0"), "model.max_length=0 must be"),
    "ratio-range": Case(train("partition.ratio=1.5"), "partition.ratio=1.5 must be in (0, 1]"),
    "choice": Case(train("data.source=web"), "data.source='web' is not one of"),
    "list-length": Case(train("optim.betas=[0.9]"), "optim.betas[1] is required"),
    "list-item-range": Case(train("optim.betas=[0.9, 1.0]"), "optim.betas[1]=1.0 must be"),
    "override-not-key-value": Case(train("train.steps"), "override 'train.steps' is not key=value"),
    "override-bad-yaml": Case(train("model.name=[minilm"), "override 'model.name=[minilm': the value is not valid"),
    "section-as-scalar": Case(train("seed.x=1"), "seed: expected an integer"),
    "task": Case(train("task=audio"), "task='audio' is not one of"),
    "extra-section": Case(train("extra.vision.conv=pad"), "unknown config key extra.vision"),
    "moe-k": Case(train("moe.k=0"), "moe.k=0 must be"),
    "config-missing": Case(train(config=lambda p: str(p.tmp / "nope.yaml")), "nope.yaml not found"),
    "config-yaml-syntax": Case(train(config=file("bad.yaml", b"seed: 1\ntrain:\n\tsteps: 2\n")),
                               "bad.yaml is not valid YAML: line 3, column 1: found character '\\t'"),
    "config-not-mapping": Case(train(config=file("list.yaml", b"- a\n- b\n")), "list.yaml must hold a mapping"),
    "config-not-utf8": Case(train(config=file("latin1.yaml", b"seed: 1\n# caf\xe9\n")),
                            "latin1.yaml, line 2: not UTF-8"),
}, "ds_config": {
    "ds-missing": Case(train("ds_config=ds_configs/nope.json"), "ds_config ds_configs/nope.json not found"),
    "ds-json-syntax": Case(train_ds(file("bad.json", b'{"a": 1,}')),
                           "bad.json is not valid JSON (Expecting property name enclosed in double quotes: line 1"),
    "ds-not-object": Case(train_ds(file("list.json", b"[1]")), "list.json must hold a JSON object"),
    "ds-zero3": Case(train_ds(ds_json({"zero_optimization": {"stage": 3}})), "ds_config zero_optimization.stage=3"),
    "ds-fp16-cpu": Case(train_ds(ds_json({"fp16": {"enabled": True}})), "ds_config fp16.enabled=true"),
    "ds-batch": Case(train_ds(ds_json({"train_micro_batch_size_per_gpu": 3})),
                     "sets train_micro_batch_size_per_gpu=3 but the run config asks for 4"),
    "ds-async-writer": Case(train_ds(ds_json({"checkpoint": {"writer": {"type": "fast"}}})),
                            "ds_config checkpoint.writer="),
}, "data": {
    "files-without-train-file": Case(train("data.source=files"), "data.train_file is required"),
    "train-file-missing": Case(train_files(lambda p: str(p.tmp / "none.csv")), "data.train_file: text data file"),
    "train-file-type": Case(train_files(file("rows.parquet", b"PAR1")), "data.train_file="),
    "csv-column": Case(train_files(file("cols.csv", b"sentence,label\nok,1\n")),
                       "cols.csv: missing column(s) ['text']"),
    "jsonl-line": Case(train_files(file("rows.jsonl", b'{"text": "a", "label": 1}\n\n{"text": "b", label: 0}\n')),
                       "rows.jsonl, line 3: not valid JSON"),
    "csv-not-utf8": Case(train_files(file("latin1.csv", CSV + b"caf\xe9 film,1\n")), "latin1.csv, line 4: not UTF-8"),
    "eval-label": Case(train_files(file("train.csv", CSV), file("eval.csv", b"text,label\nmeh,maybe\n")),
                       "eval.csv, line 2: label 'maybe' is not in the label set"),
    "glue-dir": Case(train("data.source=glue", "data.glue_dir=/nonexistent/glue"), "data.glue_dir: GLUE data folder"),
    "glue-task": Case(train("data.source=glue", "data.task=sst3"), "data.task='sst3' is not a GLUE task"),
}, "checkpoints": {
    "folder-holds-a-run": Case(train(out="run"), "already holds a run (checkpoints/step2", folder="run"),
    "resume-without-checkpoint": Case(train("resume=true"), "holds no complete checkpoint"),
    "resume-other-model": Case(train("resume=true", "moe.num_experts=4", out="run"), "from a different model",
                               folder="run"),
    "resume-damaged-file": Case(train("resume=true", out="run"), "mp_rank_00_model_states.pt does not match the sha256",
                                folder="run"),
    "resume-truncated-file": Case(train("resume=true", out="run"), "padnet_rng_rank0.pt has 10 bytes", folder="run"),
    # reshard (engine/reshard.py): resuming at another world size is not an error, a layout that cannot be is
    "reshard-ep-size": Case(lambda p: ["reshard", str(p.run), str(p.fresh), "--world-size", "3", "--ep-size", "3"],
                            "--ep-size 3 does not divide the 2 experts", folder="run"),
    "reshard-world-size": Case(lambda p: ["reshard", str(p.run), str(p.fresh), "--world-size", "3",
                                          "--ep-size", "2"], "--world-size 3 is not divisible by --ep-size 2",
                               folder="run"),
    "reshard-out-exists": Case(lambda p: ["reshard", str(p.run), str(p.run), "--world-size", "1", "--ep-size", "1"],
                               "run already exists", folder="run"),
    "reshard-truncated-shard": Case(lambda p: ["reshard", str(p.run), str(p.fresh), "--world-size", "2",
                                               "--ep-size", "2"], "zero_pp_rank_0_mp_rank_00_optim_states.pt has 10 "
                                    "bytes", folder="run"),
    "resume-crafted-pickle": Case(train("resume=true", out="run"), "zero_pp_rank_0_mp_rank_00_optim_states.pt holds "
                                  "pickled content", folder="run", builds_model=True),
    "eval-missing-folder": Case(lambda p: ["eval", str(p.tmp / "nowhere")], "nowhere is not a folder"),
    "eval-no-checkpoint": Case(lambda p: ["eval", failed_start(p)], "failed/checkpoints holds no complete checkpoint"),
    "inspect-damaged-manifest": Case(lambda p: ["inspect", str(p.run)], "padnet_manifest.json is damaged",
                                     folder="run"),
}, "launch": {
    "env-world-size": Case(train(), "environment variable WORLD_SIZE='two' is not an integer",
                           env={"WORLD_SIZE": "two"}),
    "env-rank": Case(train(), "RANK=3 must be below WORLD_SIZE=2", env={"RANK": "3", "WORLD_SIZE": "2"}),
    "env-port": Case(train(), "MASTER_PORT=99999 is out of range", env={"MASTER_PORT": "99999"}),
    "ep-size-vs-world": Case(train("moe.ep_size=2"), "moe.ep_size=2 does not divide the world size 1"),
}}
CASES = {name: case for group in CATALOGUE.values() for name, case in group.items()}


def damage(case: str, run: Path, tmp: Path) -> None:
    """Put the case's fault into the run folder copy ``run`` (a complete run of TINY)."""
    from padnet_ds.commit import MANIFEST, read_manifest, sha256_of

    tag = run / "checkpoints" / "step2"
    if case == "resume-damaged-file":
        data = bytearray((tag / "mp_rank_00_model_states.pt").read_bytes())
        data[len(data) // 2] ^= 0xFF
        (tag / "mp_rank_00_model_states.pt").write_bytes(bytes(data))
    elif case == "resume-truncated-file":
        (tag / "padnet_rng_rank0.pt").write_bytes((tag / "padnet_rng_rank0.pt").read_bytes()[:10])
    elif case == "reshard-truncated-shard":
        shard = tag / "zero_pp_rank_0_mp_rank_00_optim_states.pt"
        shard.write_bytes(shard.read_bytes()[:10])
    elif case in ("resume-crafted-pickle", "inspect-damaged-manifest"):
        manifest = read_manifest(tag)
        if case == "resume-crafted-pickle":  # a crafted file and a manifest forged to match it
            from tests.test_files import crafted

            name = "zero_pp_rank_0_mp_rank_00_optim_states.pt"
            crafted(tag / name, tmp / "payload-ran", inside_torch_file=True)
            manifest["files"][name] = {"size": (tag / name).stat().st_size, "sha256": sha256_of(tag / name)}
        (tag / MANIFEST).write_text(json.dumps(manifest) if case != "inspect-damaged-manifest" else "{not json")


def snapshot(root: Path) -> Dict[str, tuple]:
    from padnet_ds.commit import sha256_of

    if not root.exists():
        return {}
    return {p.relative_to(root).as_posix(): (p.stat().st_mtime_ns, sha256_of(p))
            for p in sorted(root.rglob("*")) if p.is_file()}


def run_case(name: str, case: Case, paths: Paths, spy: Dict[str, int]) -> dict:
    from padnet_ds.cli import main

    argv = case.argv(paths)
    before = snapshot(paths.run) if case.folder == "run" else None
    saved = {k: os.environ.get(k) for k in case.env or {}}
    os.environ.update(case.env or {})
    spy["built"], err, raised = 0, io.StringIO(), None
    t0 = time.perf_counter()
    try:
        with contextlib.redirect_stderr(err):
            rc = main(argv)
    except BaseException:  # noqa: BLE001 - reported to the test, which fails on it
        import traceback

        rc, raised = None, traceback.format_exc()
    elapsed = time.perf_counter() - t0
    for k, v in saved.items():
        os.environ.pop(k) if v is None else os.environ.__setitem__(k, v)
    changed = (before is not None and snapshot(paths.run) != before) or paths.fresh.exists()
    return dict(rc=rc, err=err.getvalue(), raised=raised, elapsed=elapsed, built=spy["built"], changed=changed)


def catalogue(tmp: str, names: List[str]) -> Dict[str, dict]:
    """In one process: a complete TINY run, then every case against fresh copies of what it needs."""
    from padnet_ds.engine import trainer
    from padnet_ds.engine.config import load_config
    from padnet_ds.models import encoder

    tmp = Path(tmp)
    reference = tmp / "reference"
    trainer.train(load_config(SMOKE, [f"output_dir={reference}", *TINY]))
    spy, build = {"built": 0}, encoder.build_classifier

    def counted(*args, **kwargs):  # builds as before, and counts: did a case get that far?
        spy["built"] += 1
        return build(*args, **kwargs)

    encoder.build_classifier = counted
    out = {}
    for i, name in enumerate(names):
        case_dir = tmp / f"case{i}"
        case_dir.mkdir()
        paths = Paths(case_dir, case_dir / "run", case_dir / "fresh")
        if CASES[name].folder == "run":
            shutil.copytree(reference, paths.run)
            damage(name, paths.run, case_dir)
        out[name] = run_case(name, CASES[name], paths, spy)
        out[name]["payload_ran"] = (case_dir / "payload-ran").exists()
    return out


@pytest.fixture(scope="module")
def outcomes(tmp_path_factory):
    (results,) = run_ranks(catalogue, 1, str(tmp_path_factory.mktemp("bad-input")), list(CASES))
    return results


def test_the_catalogue_covers_every_kind_of_input(outcomes):
    slowest = max(outcomes, key=lambda n: outcomes[n]["elapsed"])
    print(f"slowest case: {slowest} {outcomes[slowest]['elapsed']:.2f} s; median "
          f"{sorted(o['elapsed'] for o in outcomes.values())[len(outcomes) // 2]:.3f} s")
    assert len(CASES) >= 30 and all(len(group) >= 4 for group in CATALOGUE.values())


@pytest.mark.parametrize("name", list(CASES))
def test_bad_input_exits_2_naming_it_fast_and_changes_nothing(outcomes, name):
    case, got = CASES[name], outcomes[name]
    assert got["raised"] is None, got["raised"]
    assert got["rc"] == 2, got
    assert case.expect in got["err"], got["err"]
    assert "Traceback" not in got["err"]
    assert got["elapsed"] < LIMIT_S, f"{got['elapsed']:.1f} s to fail"
    assert got["built"] == int(case.builds_model), "the model was built before the input was checked" \
        if got["built"] else "expected the failure while loading into the model"
    assert not got["changed"], "the run folder changed" if case.folder == "run" else "output_dir was created"
    assert not got["payload_ran"]


PROCESS_CASES = ["config-yaml-syntax", "csv-not-utf8", "env-rank"]  # a config, a data file, the launch


def test_as_a_real_process_bad_input_exits_2_without_a_traceback(tmp_path):
    """The exit status and stderr of ``python -m padnet_ds.cli`` itself (all cases at once)."""
    procs = {}
    for name in PROCESS_CASES:
        case_dir = tmp_path / name
        case_dir.mkdir()
        paths = Paths(case_dir, case_dir / "run", case_dir / "fresh")
        env = dict(os.environ, OMP_NUM_THREADS="1", **(CASES[name].env or {}))
        for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK") if not CASES[name].env else ():
            env.pop(key, None)
        procs[name] = (subprocess.Popen([sys.executable, "-m", "padnet_ds.cli", *CASES[name].argv(paths)], cwd=REPO,
                                        env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True), paths)
    for name, (proc, paths) in procs.items():
        out, err = proc.communicate(timeout=300)
        assert proc.returncode == 2, (name, out[-2000:], err[-3000:])
        assert CASES[name].expect in err and "Traceback" not in err + out, (name, err[-3000:])
        assert not paths.fresh.exists()


def test_under_the_deepspeed_launcher_bad_input_on_every_rank_exits_2_with_each_ranks_message(tmp_path):
    out, port = tmp_path / "run", free_port()
    cmd = [str(Path(sys.executable).parent / "deepspeed"), "--num_accelerators", "2", "--master_port", str(port),
           "--module", "padnet_ds.cli", "train", SMOKE, f"output_dir={out}", *TINY, "moe.num_experts=8",
           "moe.ep_size=8"]
    t0 = time.monotonic()
    res = subprocess.run(cmd, cwd=REPO, env=dict(os.environ, OMP_NUM_THREADS="1"), capture_output=True, text=True,
                         timeout=300)
    text = res.stdout + res.stderr
    assert res.returncode == 2, text[-4000:]
    assert text.count("padnet-ds: error: moe.ep_size=8 does not divide the world size 2") >= 1, text[-4000:]
    assert "Traceback" not in text and not out.exists()
    assert time.monotonic() - t0 < 120
