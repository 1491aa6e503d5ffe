"""The run folder: ``checkpoints/``, ``tensorboard/``, ``config.yaml`` and ``summary.json``.

Nothing already written is overwritten by accident: a folder that holds another run is
refused unless ``resume=true``; files are replaced atomically (write, then rename).
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Dict

import yaml

from ..files import atomic_write_text
from ..settings import ConfigError
from .config import RunConfig, to_dict

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

    def holds_run(self) -> bool:
        return self.config_file.exists() or self.summary_file.exists() or self.has_checkpoint()

    def has_checkpoint(self) -> bool:
        return (self.checkpoints / "latest").is_file()

    def prepare(self, cfg: RunConfig, is_writer: bool, barrier=lambda: None) -> None:
        """Check the folder against ``cfg.resume`` on every rank, then (after ``barrier``) rank 0 writes.

        The barrier matters: a rank that checks after rank 0 wrote config.yaml would see "a run".
        """
        self.check(cfg)
        barrier()
        if is_writer:
            self.create(cfg)

    def check(self, cfg: RunConfig) -> None:
        if cfg.resume:
            if not self.has_checkpoint():
                raise ConfigError(f"resume=true but {self.checkpoints} has no checkpoint (no 'latest' file): "
                                  "start without resume=true, or point output_dir at the run to continue")
            self.check_same_model(cfg)
        elif self.holds_run():
            raise ConfigError(f"output_dir {self.root} already holds a run ({self._evidence()}): pass resume=true "
                              "to continue it, or choose another output_dir; nothing was changed")

    def create(self, cfg: RunConfig) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        self.checkpoints.mkdir(exist_ok=True)
        if not cfg.resume:
            atomic_write_text(self.config_file, yaml.safe_dump(to_dict(cfg), sort_keys=False))

    def _evidence(self) -> str:
        found = [p.name for p in (self.config_file, self.summary_file) if p.exists()]
        if self.has_checkpoint():
            found.append("checkpoints/latest")
        return ", ".join(found)

    def saved_config(self) -> Dict[str, Any]:
        if not self.config_file.exists():
            return {}
        return yaml.safe_load(self.config_file.read_text()) or {}

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
