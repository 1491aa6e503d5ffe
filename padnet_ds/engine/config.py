"""One validated run configuration, read from YAML plus ``key=value`` overrides.

Each component owns its section (``data``: :class:`~padnet_ds.data.config.TextDataConfig`,
``moe``: :class:`~padnet_ds.models.encoder.MoEConfig`, ``partition``:
:class:`~padnet_ds.partition.config.PartitionConfig`); this module adds the run's own
sections and nests them. Types and ranges are checked here, on load; what needs more than
the file (the task's ``extra.<name>`` sections, the DeepSpeed JSON, the world size) is
checked by :func:`padnet_ds.engine.validate.validate_run` before anything is written.
"""
from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any, Dict, Optional, Sequence, Tuple

import yaml
from pydantic import Field, model_validator

from ..data.config import TextDataConfig
from ..files import read_text
from ..models.encoder import MoEConfig
from ..partition.config import PartitionConfig
from ..settings import Bool, ConfigError, FieldError, Float, Int, Settings

__all__ = ["ConfigError", "ModelConfig", "OptimConfig", "RunConfig", "TrainConfig", "load_config",
           "config_from_dict", "merge", "parse_overrides", "to_dict"]

Beta = Annotated[Float, Field(ge=0, lt=1)]  # an Adam beta


class ModelConfig(Settings):
    section = "model"

    # A hub name, a local folder, or "minilm" (the offline all-MiniLM-L6-v2 package).
    name: str = "minilm"
    # BertConfig kwargs for a random-init encoder (tests, smoke runs); null = pretrained weights.
    random_init: Optional[Dict[str, Any]] = None
    # Tokenizer to use with random_init models (a name or folder); defaults to `name`.
    tokenizer: Optional[str] = None
    max_length: Int = Field(128, ge=1, description="tokens per sequence after truncation")
    # Keep the encoder dense (no MoE at all): the baseline of a study.
    dense: Bool = False


class OptimConfig(Settings):
    section = "optim"

    lr: Float = Field(5e-5, gt=0)
    weight_decay: Float = Field(0.01, ge=0)
    betas: Tuple[Beta, Beta] = (0.9, 0.999)
    eps: Float = Field(1e-8, gt=0)
    # linear warm-up over this fraction of the steps, then linear decay to 0
    warmup_ratio: Float = Field(0.1, ge=0, le=1)
    # torch's fused AdamW kernel (CPU and CUDA): on CPU the per-tensor loop allocates temporaries
    # for every tensor and ran 8x slower here (bench/README.md); false for the loop
    fused: Bool = True


class TrainConfig(Settings):
    section = "train"

    steps: Optional[Int] = Field(None, ge=1, description="optimizer steps; null = derive from epochs")
    epochs: Float = Field(1.0, gt=0)
    micro_batch_size: Int = Field(16, ge=1, description="sequences (or images) per rank and micro-batch")
    grad_accum: Int = Field(1, ge=1, description="micro-batches per optimizer step")
    eval_every: Int = Field(0, ge=0, description="optimizer steps; 0 = only at the end")
    checkpoint_every: Int = Field(0, ge=0, description="optimizer steps; 0 = only at the end")
    keep_checkpoints: Int = Field(2, ge=0, description="0 keeps every checkpoint")
    log_every: Int = Field(10, ge=1)
    eval_batch_size: Int = Field(64, ge=1)
    # Stop (after checkpointing) at this optimizer step, as if interrupted: the schedule still
    # runs to `steps`, so `resume=true` continues exactly. For time-limited cluster jobs and tests.
    stop_at: Optional[Int] = Field(None, ge=1)


class RunConfig(Settings):
    output_dir: str = "runs/default"
    seed: Int = 42
    resume: Bool = False
    # Start a new fine-tune from a partitioned run or checkpoint (its weights and final masks, packed
    # unless partition.pack=false); the optimizer, schedule and step count start afresh.
    init_from: Optional[str] = None
    ds_config: str = "ds_configs/zero2_fp32.json"
    task: str = "text"  # a registered task (engine/tasks.py): "text" (GLUE and friends) | "image" (DY-Conv ResNets)
    model: ModelConfig = Field(default_factory=ModelConfig)
    moe: MoEConfig = Field(default_factory=MoEConfig)
    data: TextDataConfig = Field(default_factory=TextDataConfig)
    partition: PartitionConfig = Field(default_factory=PartitionConfig)
    optim: OptimConfig = Field(default_factory=OptimConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)
    # The task's own sections (e.g. `vision` for task: image), validated by the task registry.
    extra: Dict[str, Any] = Field(default_factory=dict)

    @model_validator(mode="after")
    def _packing_is_possible(self) -> "RunConfig":
        part = self.partition
        if self.init_from is not None and self.resume:
            raise FieldError("init_from", self.init_from, "starts a new run and resume=true continues one: drop one")
        if part.pack is True and not part.active and self.init_from is None:
            raise FieldError("partition.pack", True, "with partition.ratio=1.0 has nothing to pack: a fully dynamic "
                             "model keeps every entry; set partition.ratio below 1 (e.g. 0.5), start from a "
                             "partitioned checkpoint with init_from=RUN, or leave partition.pack at auto")
        if self.init_from is not None and part.active:
            raise FieldError("partition.ratio", part.ratio, f"with init_from={self.init_from} would partition again, "
                             "but a run started from a checkpoint keeps its final masks: set partition.ratio=1.0")
        return self


def parse_overrides(pairs: Sequence[str]) -> Dict[str, Any]:
    """``a.b=1 c=[x, y]`` -> nested dict; values are YAML scalars/lists."""
    out: Dict[str, Any] = {}
    for pair in pairs:
        if "=" not in pair:
            raise ConfigError(f"override {pair!r} is not key=value (e.g. train.steps=100)")
        key, raw = pair.split("=", 1)
        try:
            value = yaml.safe_load(raw) if raw != "" else None
        except yaml.YAMLError as err:
            raise ConfigError(f"override {pair!r}: the value is not valid YAML ({_yaml_problem(err)}); quote "
                              "text that holds ':' or brackets") from None
        node = out
        parts = key.strip().split(".")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(f"override {pair!r}: {part} is not a section")
        node[parts[-1]] = value
    return out


def merge(base: Dict[str, Any], over: Dict[str, Any]) -> Dict[str, Any]:
    out = dict(base)
    for k, v in over.items():
        out[k] = merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def config_from_dict(values: Dict[str, Any]) -> RunConfig:
    """A :class:`RunConfig` from plain values; errors name the dotted key."""
    return RunConfig.parse(values, "")


def load_config(path: Optional[str], overrides: Sequence[str] = ()) -> RunConfig:
    values: Dict[str, Any] = {}
    if path:
        p = Path(path)
        if not p.is_file():
            raise ConfigError(f"config file {path} not found (configs/ has the shipped ones, e.g. configs/smoke.yaml)")
        try:
            values = yaml.safe_load(read_text(p)) or {}
        except yaml.YAMLError as err:
            raise ConfigError(f"config file {path} is not valid YAML: {_yaml_problem(err)}") from None
        if not isinstance(values, dict):
            raise ConfigError(f"config file {path} must hold a mapping of settings")
    return config_from_dict(merge(values, parse_overrides(overrides)))


def _yaml_problem(err: yaml.YAMLError) -> str:
    """PyYAML's complaint with its 1-based line and column."""
    mark = getattr(err, "problem_mark", None)
    where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark is not None else ""
    return where + (getattr(err, "problem", None) or str(err).splitlines()[0])


def to_dict(cfg: Settings) -> Dict[str, Any]:
    """Plain YAML/JSON values (tuples as lists), e.g. for ``config.yaml`` and ``summary.json``."""
    return cfg.model_dump(mode="json")

