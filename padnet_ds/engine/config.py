"""One validated run configuration, read from YAML plus ``key=value`` overrides.

Each component owns its own small dataclass (data, model MoE settings, partitioner); this
module only nests them, checks every key and type, and names the offending key in errors.
"""
from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple, Union

import yaml

from ..data.text import TextDataConfig
from ..models.encoder import MoEConfig
from ..partition.config import PartitionConfig


class ConfigError(ValueError):
    pass


@dataclass
class ModelConfig:
    # A hub name, a local folder, or "minilm" (the offline all-MiniLM-L6-v2 package).
    name: str = "minilm"
    # BertConfig kwargs for a random-init encoder (tests, smoke runs); null = pretrained weights.
    random_init: Optional[Dict[str, Any]] = None
    # Tokenizer to use with random_init models (a name or folder); defaults to `name`.
    tokenizer: Optional[str] = None
    max_length: int = 128
    # Keep the encoder dense (no MoE at all): the baseline of a study.
    dense: bool = False


@dataclass
class OptimConfig:
    lr: float = 5e-5
    weight_decay: float = 0.01
    betas: Tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    warmup_ratio: float = 0.1  # linear warm-up over this fraction of the steps, then linear decay to 0
    # torch's fused AdamW kernel (CPU and CUDA): on CPU the per-tensor loop allocates temporaries
    # for every tensor and ran 8x slower here (bench/README.md); false for the loop
    fused: bool = True


@dataclass
class TrainConfig:
    steps: Optional[int] = None  # optimizer steps; null = derive from epochs
    epochs: float = 1.0
    micro_batch_size: int = 16  # per rank
    grad_accum: int = 1
    eval_every: int = 0  # optimizer steps; 0 = only at the end
    checkpoint_every: int = 0  # optimizer steps; 0 = only at the end
    keep_checkpoints: int = 2
    log_every: int = 10
    eval_batch_size: int = 64
    # Stop (after checkpointing) at this optimizer step, as if interrupted: the schedule still
    # runs to `steps`, so `resume=true` continues exactly. For time-limited cluster jobs and tests.
    stop_at: Optional[int] = None


@dataclass
class RunConfig:
    output_dir: str = "runs/default"
    seed: int = 42
    resume: bool = False
    ds_config: str = "ds_configs/zero2_fp32.json"
    task: str = "text"  # "text" (GLUE and friends) | "image" (DY-Conv ResNets)
    model: ModelConfig = field(default_factory=ModelConfig)
    moe: MoEConfig = field(default_factory=MoEConfig)
    data: TextDataConfig = field(default_factory=TextDataConfig)
    partition: PartitionConfig = field(default_factory=PartitionConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    # Sections of other workloads (e.g. `vision`) register here; see tasks.py.
    extra: Dict[str, Any] = field(default_factory=dict)


def _coerce(value: Any, tp, where: str):
    """Check ``value`` against the annotation ``tp``; convert lists to tuples where declared."""
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if tp is Any:
        return value
    if origin in (Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(value, arg, where)
            except ConfigError as err:
                errors.append(str(err))
        if len(errors) == 1:
            raise ConfigError(errors[0] + (" or null" if type(None) in args else ""))
        raise ConfigError(f"{where}: {value!r} matches none of: " + "; ".join(errors))
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a mapping of settings, got {value!r}")
        return build(tp, value, where)
    if origin in (tuple, Tuple):
        if not isinstance(value, (list, tuple)):
            value = [value] if args and args[-1] is Ellipsis else value
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{where}: expected a list, got {value!r}")
        if args and args[-1] is Ellipsis:
            return tuple(_coerce(v, args[0], f"{where}[{i}]") for i, v in enumerate(value))
        if args and len(args) != len(value):
            raise ConfigError(f"{where}: expected {len(args)} values, got {list(value)!r}")
        return tuple(_coerce(v, a, f"{where}[{i}]") for i, (v, a) in enumerate(zip(value, args or [Any] * len(value))))
    if origin in (list, List, Sequence):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{where}: expected a list, got {value!r}")
        return [_coerce(v, args[0] if args else Any, f"{where}[{i}]") for i, v in enumerate(value)]
    if origin in (dict, Dict):
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a mapping, got {value!r}")
        return dict(value)
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{where}: expected true or false, got {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{where}: expected an integer, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, str):
            try:  # YAML 1.1 reads 1e-3 (no dot) as a string
                return float(value)
            except ValueError:
                pass
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{where}: expected a number, got {value!r}")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{where}: expected a string, got {value!r}")
        return value
    return value


def build(cls, values: Dict[str, Any], where: str = ""):
    """Instantiate dataclass ``cls`` from ``values``, rejecting unknown keys and wrong types."""
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    unknown = sorted(set(values) - set(names))
    if unknown:
        prefix = f"{where}." if where else ""
        raise ConfigError(f"unknown config key {prefix}{unknown[0]}: the keys of {where or 'the run config'} "
                          f"are {', '.join(names)}")
    kwargs = {k: _coerce(v, hints[k], f"{where}.{k}" if where else k) for k, v in values.items()}
    try:
        return cls(**kwargs)
    except (TypeError, ValueError) as err:
        raise ConfigError(f"{where or 'config'}: {err}") from err


def parse_overrides(pairs: Sequence[str]) -> Dict[str, Any]:
    """``a.b=1 c=[x, y]`` -> nested dict; values are YAML scalars/lists."""
    out: Dict[str, Any] = {}
    for pair in pairs:
        if "=" not in pair:
            raise ConfigError(f"override {pair!r} is not key=value (e.g. train.steps=100)")
        key, raw = pair.split("=", 1)
        value = yaml.safe_load(raw) if raw != "" else None
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


def load_config(path: Optional[str], overrides: Sequence[str] = ()) -> RunConfig:
    values: Dict[str, Any] = {}
    if path:
        p = Path(path)
        if not p.is_file():
            raise ConfigError(f"config file {path} not found (configs/ has the shipped ones, e.g. configs/smoke.yaml)")
        values = yaml.safe_load(p.read_text()) or {}
        if not isinstance(values, dict):
            raise ConfigError(f"config file {path} must hold a mapping of settings")
    return build(RunConfig, merge(values, parse_overrides(overrides)))


def to_dict(cfg) -> Dict[str, Any]:
    def plain(v):
        if isinstance(v, tuple):
            return [plain(x) for x in v]
        if isinstance(v, list):
            return [plain(x) for x in v]
        if isinstance(v, dict):
            return {k: plain(x) for k, x in v.items()}
        return v
    return plain(dataclasses.asdict(cfg))
