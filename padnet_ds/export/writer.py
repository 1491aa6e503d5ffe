"""``padnet-ds export RUN_OR_CHECKPOINT OUT_DIR``: a checkpoint as a folder that loads without DeepSpeed.

One process, no process group: the checkpoint is read from its files (``engine.checkpoint_reader``,
one file per global expert, so any world size and ``ep_size``), converted (``text.py``,
``vision.py``) and written as

    config.json, model.safetensors, README.md (model card)
    + text: the tokenizer's files, configuration_padnet.py and modeling_padnet.py (remote code)

through the commit protocol checkpoints use (``commit.write_tag``, one process): into
``<OUT_DIR>.partial``, then ``padnet_manifest.json`` (every file's size and sha256), then a rename
to OUT_DIR, so a crash never leaves a half export that looks complete. An existing OUT_DIR that
holds files is refused unless ``overwrite``, and even then it is left as it was until the new
export is whole.
"""
from __future__ import annotations

import json
import logging
import os
import shutil
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Dict, Iterator, Optional, Tuple

import torch

from ..commit import PARTIAL, write_tag
from ..engine.checkpoint_reader import locate, read_checkpoint
from ..engine.config import RunConfig, config_from_dict
from ..engine.packing import check_packed_checkpoint
from ..engine.run_dir import RunDir
from ..files import read_text
from ..settings import ConfigError
from .card import export_sizes, model_card

log = logging.getLogger("padnet_ds")

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
KEEP_FP32 = ("gate.weight", ".phi")  # routing and the lambdas: tiny, and rounding them changes choices


def export_run(source: str, out_dir: str, dtype: str = "fp32", overwrite: bool = False) -> Dict[str, Any]:
    """Export the checkpoint ``source`` names (run folder: its latest) to ``out_dir``; returns the sizes."""
    if dtype not in DTYPES:
        raise ConfigError(f"--dtype {dtype!r} is not one of {', '.join(DTYPES)}")
    out = Path(out_dir)
    run = locate(source)[0]
    check_destination(out, overwrite, run)
    cfg = run_config(run)
    ckpt = read_checkpoint(source)  # the tag verified against its manifest, every file loaded weights-only
    tag_dir = ckpt.tag_dir
    check_packed_checkpoint(ckpt)  # packed values that do not fit their positions: refused before anything is written
    summary = read_summary(run)
    labels, is_regression = task_labels(summary, cfg)
    padnet = {"run": str(run.resolve()), "checkpoint": tag_dir.name, "step": ckpt.loop_state.get("step"),
              "dtype": dtype, "task": cfg.task, "max_length": cfg.model.max_length,
              "text_columns": list(cfg.data.text_columns) if cfg.data.source == "files" else None}
    if cfg.task == "text":
        from .text import REMOTE_CODE, text_export

        config, tensors = text_export(ckpt, cfg, labels, is_regression, padnet)
        extra = [Path(__file__).with_name(name) for name in REMOTE_CODE]
    elif cfg.task == "image":
        from .vision import vision_export

        config, tensors = vision_export(ckpt, cfg, labels, padnet)
        extra = []
    else:
        raise ConfigError(f"{run}/config.yaml: task {cfg.task!r} has no export (text and image do)")
    tensors = cast(tensors, DTYPES[dtype])
    config.dtype = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}[dtype]
    with staged_folder(out, overwrite, meta={"checkpoint": str(tag_dir), "dtype": dtype}) as stage:
        write_folder(stage, config, tensors, extra, cfg)
        sizes = export_sizes(stage)
        (stage / "README.md").write_text(model_card(config, summary, sizes, source=str(tag_dir)))
    log.info("exported %s to %s", tag_dir, out)
    return dict(sizes, out_dir=str(out), checkpoint=str(tag_dir))


def run_config(run: Path) -> RunConfig:
    folder = RunDir(str(run))
    if not folder.config_file.is_file():
        raise ConfigError(f"{folder.config_file} does not exist: padnet-ds export needs the run folder padnet-ds train "
                          "wrote (its config.yaml names the encoder, the MoE settings and the tokenizer)")
    return config_from_dict(folder.saved_config())


def read_summary(run: Path) -> Dict[str, Any]:
    path = RunDir(str(run)).summary_file
    if not path.is_file():
        return {}
    try:
        return json.loads(read_text(path))
    except ValueError as err:
        raise ConfigError(f"{path} is not valid JSON ({err}): restore it, or remove it to export without its "
                          "eval metrics") from None


def task_labels(summary: Dict[str, Any], cfg: RunConfig) -> Tuple[Tuple[str, ...], bool]:
    """(label names, regression?) from summary.json, or (a run still going) from the run's data."""
    if "label_names" in summary:
        return tuple(summary["label_names"]), bool(summary.get("is_regression"))
    if cfg.task == "image":
        from ..engine.image_task import load_data, vision_config

        return tuple(str(c) for c in load_data(vision_config(cfg)).classes), False
    from ..data.text import load_text_task

    spec = load_text_task(cfg.data)[0]
    return tuple(spec.label_names), spec.is_regression


def cast(tensors: Dict[str, torch.Tensor], dtype: torch.dtype) -> Dict[str, torch.Tensor]:
    """Floating tensors in ``dtype`` (the gate and phi stay fp32), every tensor contiguous and on its own."""
    out = {}
    for key, t in tensors.items():
        if t.is_floating_point():
            t = t.to(torch.float32 if key.endswith(KEEP_FP32) else dtype)
        out[key] = t.detach().cpu().contiguous().clone()
    return out


def write_folder(stage: Path, config, tensors: Dict[str, torch.Tensor], extra, cfg: RunConfig) -> None:
    from safetensors.torch import save_file

    config.save_pretrained(stage)
    save_file(tensors, str(stage / "model.safetensors"), metadata={"format": "pt"})
    for path in extra:
        shutil.copyfile(path, stage / path.name)
    if cfg.task == "text":
        from ..models.pretrained import load_tokenizer

        tokenizer = load_tokenizer(cfg.model.tokenizer or cfg.model.name)
        tokenizer.model_max_length = cfg.model.max_length  # pipeline(truncation=True) cuts where training did
        tokenizer.save_pretrained(stage)


# -- the folder, complete or not at all --------------------------------------------------------

def check_destination(out: Path, overwrite: bool, run: Optional[Path] = None) -> None:
    if out.exists() and not out.is_dir():
        raise ConfigError(f"{out} is a file: give a folder to export to; nothing was changed")
    if run is not None and (run.resolve() == out.resolve() or out.resolve() in run.resolve().parents):
        raise ConfigError(f"{out} holds the run being exported ({run}): export to another folder; nothing was changed")
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        found = sorted(p.name for p in out.iterdir())
        raise ConfigError(f"{out} already holds files ({', '.join(found[:5])}{', ...' if len(found) > 5 else ''}): "
                          "pass --overwrite to replace them, or export to a new folder; nothing was changed")


@contextmanager
def staged_folder(out: Path, overwrite: bool, meta: Dict[str, Any]) -> Iterator[Path]:
    """A folder to write ``out`` into, committed as a checkpoint tag is (``commit.write_tag``, one
    process): the files go to ``<out>.partial``, a manifest lists their sizes and sha256, and the
    folder is renamed to ``out`` only once complete (an existing ``out`` moved aside first). A
    failure removes the partial folder and leaves ``out`` as it was."""
    check_destination(out, overwrite)
    try:
        with write_tag(out.parent, out.name, collective=False, latest=False, meta=meta) as stage:
            yield stage.dir
    except BaseException:
        shutil.rmtree(out.parent / f"{out.name}{PARTIAL}", ignore_errors=True)
        raise
    share(out)


def share(folder: Path) -> None:
    """The permissions a plain mkdir / open would give (the manifest is written through a private temp file)."""
    umask = os.umask(0)
    os.umask(umask)
    folder.chmod(0o777 & ~umask)
    for path in folder.iterdir():
        path.chmod(0o666 & ~umask)
