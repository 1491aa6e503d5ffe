"""A run's cluster shape, and which rank of it holds which expert.

A :class:`Layout` is what decides how DeepSpeed's files of a checkpoint are cut: the world
size ``W``, each MoE layer's ``ep_size`` ``N``, the ZeRO stage, bf16 or fp32. DeepSpeed's expert
groups (no tensor or pipeline parallelism) put rank ``r`` at

    expert-parallel rank  p = r mod N         (the N consecutive ranks r - p .. r - p + N - 1 share the experts)
    expert-data-parallel rank  r // N          (ranks p, p + N, ... hold the same experts)

so a layer with ``E`` experts keeps global experts ``p * E/N .. (p + 1) * E/N - 1`` on rank ``r``,
under local ids ``0 .. E/N - 1``. Every checkpoint records its layout (:func:`record`, in
DeepSpeed's client state under ``padnet_layout``), with the parameter names of the optimizer's
groups, which DeepSpeed's stage-0 optimizer files do not hold.
"""
from __future__ import annotations

import re
from dataclasses import asdict, dataclass, field
from typing import Any, Dict, List, Optional

from torch import nn

from ..comm import world_size
from ..settings import ConfigError


LAYOUT_KEY = "padnet_layout"  # the layout record's key in DeepSpeed's client state
EXPERT_NAME = re.compile(r"(.*)\.deepspeed_moe\.experts\.deepspeed_experts\.(\d+)\.(.*)")
EXPERT_PREFIX = "{layer}.deepspeed_moe.experts.deepspeed_experts.{expert}."


@dataclass
class Layout:
    world_size: int
    zero_stage: int
    bf16: bool
    ep_size: Dict[str, int]  # MoE layer path -> its ep_size
    num_experts: Dict[str, int]  # MoE layer path -> its global expert count
    micro_batch: int = 0  # rows per rank and micro-batch (0: unknown)
    grad_accum: int = 0
    # optimizer param groups: the DeepSpeed names (local expert ids) of their parameters, in order
    optimizer_params: List[List[str]] = field(default_factory=list)
    portable: bool = False  # written by `padnet-ds reshard`: padnet-ds's own optimizer files, no DeepSpeed ones
    resharded_from: Optional[Dict[str, Any]] = None  # the source's shape(), when portable

    def shape(self) -> Dict[str, Any]:
        """What makes DeepSpeed's optimizer files of two checkpoints interchangeable."""
        return {"world_size": self.world_size, "zero_stage": self.zero_stage, "bf16": self.bf16,
                "ep_size": dict(self.ep_size)}

    def describe(self) -> str:
        eps = sorted(set(self.ep_size.values()))
        ep = "ep_size " + "/".join(map(str, eps)) if eps else "no MoE"
        return (f"{self.world_size} rank{'s' if self.world_size != 1 else ''}, {ep}, ZeRO {self.zero_stage}, "
                f"{'bf16' if self.bf16 else 'fp32'}")

    @property
    def global_batch(self) -> int:
        return self.world_size * self.micro_batch * self.grad_accum

    def to_record(self) -> Dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_record(cls, record: Dict[str, Any]) -> "Layout":
        return cls(**{k: v for k, v in record.items() if k in cls.__dataclass_fields__})


def ep_rank(rank: int, ep_size: int) -> int:
    return rank % ep_size


def global_expert_name(local_name: str, rank: int, ep_size: Dict[str, int], num_experts: Dict[str, int]) -> str:
    """``local_name`` (a DeepSpeed name with a local expert id) as rank ``rank`` holds it -> its global id."""
    m = EXPERT_NAME.fullmatch(local_name)
    if not m:
        return local_name
    layer, local, rest = m.group(1), int(m.group(2)), m.group(3)
    per_rank = num_experts[layer] // ep_size[layer]
    return EXPERT_PREFIX.format(layer=layer, expert=ep_rank(rank, ep_size[layer]) * per_rank + local) + rest


def global_names(module: nn.Module) -> Dict[str, str]:
    """{this rank's parameter name: its layout-independent name} (experts by global id)."""
    from ..moe.layer import pad_moe_layers
    from ..moe.upcycle import global_expert_ids

    ids = {name: global_expert_ids(layer) for name, layer in pad_moe_layers(module).items()}
    out = {}
    for name, _ in module.named_parameters():
        m = EXPERT_NAME.fullmatch(name)
        out[name] = (EXPERT_PREFIX.format(layer=m.group(1), expert=ids[m.group(1)][int(m.group(2))]) + m.group(3)
                     if m else name)
    return out


def of_engine(engine) -> Layout:
    """The layout ``engine`` runs at, with its optimizer groups' parameter names."""
    from ..moe.layer import pad_moe_layers

    layers = pad_moe_layers(engine.module)
    return Layout(world_size=world_size(), zero_stage=int(engine.zero_optimization_stage()),
                  bf16=bool(engine.bfloat16_enabled()), ep_size={n: m.ep_size for n, m in layers.items()},
                  num_experts={n: m.num_experts for n, m in layers.items()},
                  micro_batch=int(engine.train_micro_batch_size_per_gpu()),
                  grad_accum=int(engine.gradient_accumulation_steps()),
                  optimizer_params=optimizer_param_names(engine))


def optimizer_param_names(engine) -> List[List[str]]:
    """Per optimizer param group, the names of its parameters in the group's order (stage 0 keys its
    state by that position). ZeRO flattens groups (its files name their pieces), so [] there."""
    opt = engine.optimizer
    if engine.zero_optimization_stage() or opt is None:
        return []
    names = engine.param_names  # {param: name}, DeepSpeed's own map
    groups = opt.fp16_groups if hasattr(opt, "fp16_groups") else [g["params"] for g in opt.param_groups]
    return [[names[p] for p in group] for group in groups]


def of_checkpoint(states: Dict[str, Any], config: Dict[str, Any]) -> Layout:
    """The layout a checkpoint was written at: its record, or (checkpoints from before the record)
    DeepSpeed's own metadata and the run's ``config.yaml``."""
    record = states.get(LAYOUT_KEY)
    if record:
        return Layout.from_record(record)
    ds = states.get("ds_config") or {}
    moe = config.get("moe") or {}
    layers = {}
    for key in states.get("module", {}):
        m = re.fullmatch(r"(.*)\.deepspeed_moe\.gate\.wg\.weight", key)
        if m:
            layers[m.group(1)] = int(moe.get("ep_size", 1))
    counts = states.get("num_experts") or []
    return Layout(world_size=int(states.get("dp_world_size", 1)),
                  zero_stage=int((ds.get("zero_optimization") or {}).get("stage", 0)),
                  bf16=bool((ds.get("bf16") or {}).get("enabled")), ep_size=layers,
                  num_experts={n: int(c) for n, c in zip(layers, counts)} if len(counts) == len(layers)
                  else {n: int(moe.get("num_experts", 1)) for n in layers},
                  micro_batch=int(ds.get("train_micro_batch_size_per_gpu", 0)),
                  grad_accum=int(ds.get("gradient_accumulation_steps", 0)))


def check_target(num_experts: Dict[str, int], world: int, ep_size: int, zero_stage: int) -> None:
    """A layout DeepSpeed's native MoE can run (the reshard target): a :class:`ConfigError` naming the fix."""
    if world < 1:
        raise ConfigError(f"--world-size {world} must be >= 1")
    if ep_size < 1 or world % ep_size:
        raise ConfigError(f"--world-size {world} is not divisible by --ep-size {ep_size}: expert-parallel groups "
                          "tile the ranks, so pick an ep_size that divides the world size")
    bad = {n: e for n, e in num_experts.items() if e % ep_size}
    if bad:
        layer, experts = next(iter(bad.items()))
        raise ConfigError(f"--ep-size {ep_size} does not divide the {experts} experts of MoE layer {layer}: each "
                          "expert-parallel rank holds num_experts/ep_size experts, so pick a divisor of "
                          f"{experts}")
    if zero_stage not in (0, 1, 2):
        raise ConfigError(f"--zero-stage {zero_stage}: DeepSpeed's native MoE runs ZeRO stages 0, 1 and 2 only")
