"""One parameter's optimizer state in a DeepSpeed engine, read whole and written back (ZeRO 0-2).

ZeRO 1/2, and DeepSpeed's bf16 optimizer at stage 0, keep each parameter's fp32 master copy and
optimizer moments as fragments of flat per-group partitions spread over the data-parallel
ranks. ``deepspeed.utils.safe_get_full_*`` assembles one parameter's full tensors (an all-reduce
over the parameter's data-parallel group: the expert-data-parallel group for expert
parameters) and ``safe_set_full_*`` writes this rank's fragment of a full tensor back. fp32
training at stage 0 keeps plain torch optimizer state, keyed by the parameter itself.

A :class:`ParamState` is ``{"fp32": master, <moment>: tensor, ...}`` in the parameter's full
shape plus the optimizer's step count. Moving state between engines (the dense -> packed
switch, resharding) is: read every parameter of the old engine, build the new one,
:func:`prime` it, write every parameter. Every function is collective: call it on every rank
for the same parameters in the same order.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional, Tuple

import torch
from torch import Tensor


@dataclass
class ParamState:
    fp32: Tensor  # the fp32 master copy, full shape
    moments: Dict[str, Tensor] = field(default_factory=dict)  # e.g. exp_avg, exp_avg_sq, full shape, fp32

    def mapped(self, fn: Callable[[Tensor], Tensor]) -> "ParamState":
        """The state of another parameter whose entries are ``fn`` of this one's (e.g. the kept positions)."""
        return ParamState(fn(self.fp32), {k: fn(v) for k, v in self.moments.items()})


# How an engine's optimizer holds state:
#   "flat"    ZeRO 1/2 (and DeepSpeed's BF16_Optimizer): flat fp32 partitions, DeepSpeed's fragment links
#   "copies"  DeepSpeed's FP16(Unfused)Optimizer, which stage 0 uses for bf16 here: one fp32 copy per parameter
#   "direct"  stage 0 in fp32: the client torch optimizer on the parameters themselves
def _layout(engine) -> Tuple[str, torch.optim.Optimizer]:
    opt = engine.optimizer
    inner = getattr(opt, "optimizer", None)
    if isinstance(inner, torch.optim.Optimizer):
        return ("copies" if hasattr(opt, "fp32_groups") and hasattr(opt, "fp16_groups") else "flat"), inner
    if isinstance(opt, torch.optim.Optimizer):
        return "direct", opt
    raise TypeError(f"unsupported DeepSpeed optimizer {type(opt).__name__}: expected ZeRO stage 0-2 with a torch "
                    "optimizer such as AdamW")


def _fp32_copy(engine, param: Tensor) -> Tensor:
    """The fp32 copy a "copies" optimizer keeps for ``param`` (the key of its state)."""
    opt = engine.optimizer
    for lp_group, hp_group in zip(opt.fp16_groups, opt.fp32_groups):
        for lp, hp in zip(lp_group, hp_group):
            if lp is param:
                return hp
    raise KeyError("parameter is not optimized by this engine")


def _link(engine) -> None:
    # DeepSpeed links each parameter's fragment of the flat optimizer state once, right after
    # the first group has stepped, so the state of later groups (the MoE expert groups) is never
    # linked and safe_get_full_optimizer_state fails for them (deepspeed 0.19.8). Link every group.
    from deepspeed.utils.mixed_precision_linkage import lazy_init_hp_params_optimizer_state

    opt = engine.optimizer
    if hasattr(opt, "bit16_groups"):  # ZeRO 1/2
        lp_groups, hp_parts = opt.bit16_groups, opt.single_partition_of_fp32_groups
    else:  # BF16_Optimizer
        lp_groups, hp_parts = opt.bf16_groups, opt.fp32_groups_flat_partition
    for lp, hp in zip(lp_groups, hp_parts):
        if hp in opt.optimizer.state:
            lazy_init_hp_params_optimizer_state(lp, hp, opt.optimizer.state)


def moment_keys(engine) -> List[str]:
    """Names of the per-entry optimizer state tensors (Adam: ``exp_avg``, ``exp_avg_sq``); [] before the first step."""
    _, inner = _layout(engine)
    for state in inner.state.values():
        return sorted(k for k, v in state.items() if torch.is_tensor(v) and v.ndim > 0)
    return []


def step_count(engine) -> int:
    """The optimizer's step count (torch Adam keeps it per parameter or partition; all agree)."""
    _, inner = _layout(engine)
    for state in inner.state.values():
        step = state.get("step")
        if step is not None:
            return int(step)
    return 0


def read(engine, param: Tensor, keys: List[str]) -> ParamState:
    """The full fp32 master and moments of ``param``. Collective over its data-parallel group ("flat")."""
    from deepspeed.utils import safe_get_full_fp32_param, safe_get_full_optimizer_state

    layout, inner = _layout(engine)
    if layout == "flat":
        _link(engine)
        return ParamState(safe_get_full_fp32_param(param).detach().clone(),
                          {k: safe_get_full_optimizer_state(param, k).detach().clone() for k in keys})
    hp = param if layout == "direct" else _fp32_copy(engine, param)
    state = inner.state[hp]
    return ParamState(hp.detach().float().clone(), {k: state[k].detach().float().clone() for k in keys})


def write(engine, param: Tensor, value: ParamState) -> None:
    """Set ``param``'s fp32 master, its model copy and its moments from full tensors (after :func:`prime`)."""
    from deepspeed.utils import safe_set_full_fp32_param, safe_set_full_optimizer_state

    layout, inner = _layout(engine)
    with torch.no_grad():
        param.copy_(value.fp32.view_as(param))
        if layout == "flat":
            safe_set_full_fp32_param(param, value.fp32.view_as(param))
            for k, v in value.moments.items():
                safe_set_full_optimizer_state(param, v.view_as(param), k)
            return
        hp = param if layout == "direct" else _fp32_copy(engine, param)
        hp.copy_(value.fp32.view_as(hp))
        for k, v in value.moments.items():
            inner.state[hp][k].copy_(v.view_as(hp))


def prime(engine, keys: List[str], step: int) -> None:
    """Create zero optimizer state (``keys``, step count ``step``) before the engine's first step,
    so that :func:`write` has somewhere to write: torch optimizers create their state lazily."""
    layout, inner = _layout(engine)
    for group in inner.param_groups:
        on_device = bool(group.get("fused")) or bool(group.get("capturable"))  # torch's rule for Adam's step
        for p in group["params"]:
            state = inner.state[p]
            state["step"] = torch.tensor(float(step), dtype=torch.float32, device=p.device if on_device else "cpu")
            for k in keys:
                state[k] = torch.zeros_like(p, memory_format=torch.preserve_format)
    if layout == "flat":
        _link(engine)


def read_all(engine, named: Dict[str, Tensor], keys: Optional[List[str]] = None) -> Dict[str, ParamState]:
    """:func:`read` for every ``{name: param}`` in order. Collective."""
    keys = moment_keys(engine) if keys is None else keys
    return {name: read(engine, p, keys) for name, p in named.items()}
