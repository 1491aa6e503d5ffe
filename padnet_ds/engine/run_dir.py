"""The run folder: ``checkpoints/``, ``tensorboard/``, ``config.yaml`` and ``summary.json``.

A folder becomes "a run" only once it holds a complete checkpoint (or ``summary.json``): a start
that failed earlier, for whatever reason, leaves it reusable, and the fixed rerun clears what
that start wrote (``config.yaml``, ``tensorboard/``, unfinished ``checkpoints/*.partial``).
Nothing else already written is overwritten by accident: a folder that holds a run is refused
unless ``resume=true``; files are replaced atomically (write, then rename).

:meth:`RunDir.check` only reads (every rank, before the process group exists);
:meth:`RunDir.create` writes (rank 0, once the model and engine are built).
"""
from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path
from typing import Any, Dict, List

import yaml

from ..commit import LATEST, PARTIAL, complete_tags
from ..files import atomic_write_text, read_text
from ..settings import ConfigError
from .config import RunConfig, to_dict

log = logging.getLogger("padnet_ds")

# Settings that define the model's shape: a checkpoint written under other values cannot load.
MODEL_KEYS = ("task", "model", "moe", "extra")
# ... except these, which say how the model is spread over the ranks (engine/reshard.py converts)
LAYOUT_KEYS = {"moe": ("ep_size",)}


class RunDir:

    def __init__(self, root: str) -> None:
        self.root = Path(root)
        self.checkpoints = self.root / "checkpoints"
        self.tensorboard = self.root / "tensorboard"
        self.config_file = self.root / "config.yaml"
        self.summary_file = self.root / "summary.json"

    def evidence(self) -> List[str]:
        """What makes the folder a run: a complete checkpoint, ``summary.json``, or a ``latest`` pointer
        (an older padnet-ds wrote checkpoints without manifests: never overwrite those)."""
        found = [f"checkpoints/{t}" for t in complete_tags(self.checkpoints)[-1:]]
        if self.summary_file.exists():
            found.append("summary.json")
        if not found and (self.checkpoints / LATEST).is_file():
            found.append("checkpoints/latest")
        return found

    def holds_run(self) -> bool:
        return bool(self.evidence())

    def check(self, cfg: RunConfig) -> None:
        """Raise a :class:`ConfigError` if ``cfg`` may not run in this folder; writes nothing."""
        if cfg.resume:
            if not complete_tags(self.checkpoints):
                partial = sorted(p.name for p in self.checkpoints.glob(f"*{PARTIAL}")) if self.checkpoints.is_dir() \
                    else []
                left = f" ({', '.join(partial)}: a save that did not finish)" if partial else ""
                raise ConfigError(f"resume=true but {self.checkpoints} holds no complete checkpoint{left}: start "
                                  "without resume=true (the folder is reused), or point output_dir at the run to "
                                  "continue")
            self.check_same_model(cfg)
        elif self.holds_run():
            raise ConfigError(f"output_dir {self.root} already holds a run ({', '.join(self.evidence())}): pass "
                              "resume=true to continue it, or choose another output_dir; nothing was changed")

    def create(self, cfg: RunConfig) -> None:
        """Rank 0, after everything that can fail at start-up: a new run clears what a failed start left."""
        self.root.mkdir(parents=True, exist_ok=True)
        if not cfg.resume:
            self.clear_failed_start()
            atomic_write_text(self.config_file, yaml.safe_dump(to_dict(cfg), sort_keys=False))
        self.checkpoints.mkdir(exist_ok=True)

    def clear_failed_start(self) -> None:
        """Remove what an earlier start that never completed a checkpoint wrote (its ``config.yaml`` is the sign)."""
        if self.holds_run() or not self.config_file.exists():
            return
        log.info("output_dir %s holds a start that never completed a checkpoint: reusing it", self.root)
        shutil.rmtree(self.tensorboard, ignore_errors=True)
        for partial in self.checkpoints.glob(f"*{PARTIAL}") if self.checkpoints.is_dir() else ():
            shutil.rmtree(partial, ignore_errors=True)

    def saved_config(self) -> Dict[str, Any]:
        if not self.config_file.exists():
            return {}
        try:
            return yaml.safe_load(read_text(self.config_file)) or {}
        except yaml.YAMLError as err:
            raise ConfigError(f"{self.config_file} is not valid YAML ({err})") from None

    def check_same_model(self, cfg: RunConfig) -> None:
        saved, now = self.saved_config(), to_dict(cfg)
        for key in MODEL_KEYS:
            if key in saved and _model_part(key, saved[key]) != _model_part(key, now[key]):
                raise ConfigError(f"the checkpoint in {self.root} is from a different model: its {key} settings "
                                  f"{saved[key]} differ from this run's {now[key]}; resume with the original settings "
                                  "or use another output_dir")

    def write_summary(self, summary: Dict[str, Any]) -> None:
        atomic_write_text(self.summary_file, json.dumps(summary, indent=2, sort_keys=False, default=float))


def _model_part(section: str, values: Any) -> Any:
    if not isinstance(values, dict):
        return values
    return {k: v for k, v in values.items() if k not in LAYOUT_KEYS.get(section, ())}
