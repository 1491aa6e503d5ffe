"""A checkpoint's optimizer state read from its files, whole and by layout-independent name, and
padnet-ds's own portable optimizer files (``padnet-ds reshard``).

DeepSpeed cuts the optimizer state for the layout it ran at (engine/layout.py), and loads it
back only at that layout:

- ZeRO 1/2, one file per rank r (``[bf16_]zero_pp_rank_{r}_mp_rank_00_optim_states.pt``): per param
  group g, rank r's flat fp32 partition (``single_partition_of_fp32_groups[g]``) and the base
  optimizer's moments over the same entries; ``param_slice_mappings[g]`` names the piece
  ``[start, start + numel)`` of each parameter the partition holds. A parameter's data-parallel
  group (every rank; an expert's: the ranks with its expert-parallel rank p, i.e. p, p + N, ...)
  holds consecutive pieces of it, so

      W = cat(pieces of W in rank order).view(param_shapes[W])

  with the shapes from the model-states file (``param_shapes``, rank 0's local names; every rank
  names its local experts alike).
- ZeRO 0, one file per expert-parallel rank p, written by rank p
  (``expp_rank_{p}_mp_rank_00_optim_states.pt``): the torch optimizer's ``state_dict``, keyed by
  position in its groups (the layout record names them); in bf16 the fp32 copies beside it
  (``fp32_groups``); in fp32 the master copy is the model weight itself.

:class:`OptimizerState` is the layout-independent pivot: every parameter's
:class:`~padnet_ds.engine.optim_state.ParamState` by name, experts by global id, plus the step
count. ``wanted`` restricts reading to the parameters one rank of the new layout needs (the
replicated ones and its own experts), one source file at a time. The portable files are
safetensors, one for the replicated parameters and one per global expert, each tensor
``<name>/<fp32|moment>``, so a rank reads only its experts' files.
"""
from __future__ import annotations

import json
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Tuple

import torch
from torch import Tensor

from ..errors import CheckpointError
from ..files import safe_load
from .layout import EXPERT_NAME, EXPERT_PREFIX, Layout, global_expert_name
from .optim_state import ParamState

Wanted = Optional[Callable[[str], bool]]
PORTABLE_REPLICATED = "padnet_optim_replicated.safetensors"
PORTABLE_EXPERT = "padnet_optim_{layer}_expert_{expert}.safetensors"


@dataclass
class OptimizerState:
    step: int  # the optimizer's step count (Adam's bias correction)
    keys: List[str]  # moment names, e.g. exp_avg, exp_avg_sq
    params: Dict[str, ParamState] = field(default_factory=dict)  # by name, experts by global id


def zero_file(tag_dir: Path, rank: int, bf16: bool) -> Path:
    return tag_dir / f"{'bf16_' if bf16 else ''}zero_pp_rank_{rank}_mp_rank_00_optim_states.pt"


def stage0_file(tag_dir: Path, ep_rank_: int) -> Path:
    return tag_dir / f"expp_rank_{ep_rank_}_mp_rank_00_optim_states.pt"


def optimizer_files(tag_dir: Path, layout: Layout) -> List[Path]:
    """The DeepSpeed optimizer files a checkpoint written at ``layout`` must hold."""
    if layout.zero_stage:
        return [zero_file(tag_dir, r, layout.bf16) for r in range(layout.world_size)]
    return [stage0_file(tag_dir, p) for p in range(max(layout.ep_size.values(), default=1))]


def read_deepspeed(tag_dir: Path, states: Dict[str, Any], layout: Layout, weights: Dict[str, Tensor],
                   wanted: Wanted = None) -> OptimizerState:
    """Every (``wanted``) parameter's state from DeepSpeed's optimizer files of ``tag_dir``.

    ``states`` is the model-states file, ``weights`` {global name: tensor} the model weights
    (stage 0 in fp32 keeps no other master copy)."""
    files = optimizer_files(tag_dir, layout)
    missing = [f for f in files if not f.is_file()]
    if missing:
        raise CheckpointError(f"checkpoint {tag_dir} lacks the optimizer shard {missing[0].name} (written at "
                              f"{layout.describe()}, it needs {len(files)}: {files[0].name} ...): it is incomplete; "
                              "resume from an earlier checkpoint or copy the missing files back")
    if layout.zero_stage:
        return _read_zero(files, states, layout, wanted)
    return _read_stage0(files, layout, weights, wanted)


def _read_zero(files: List[Path], states: Dict[str, Any], layout: Layout, wanted: Wanted) -> OptimizerState:
    shapes = {name: tuple(shape) for group in states.get("param_shapes") or [] for name, shape in group.items()}
    pieces: Dict[str, List[Tuple[Tensor, Dict[str, Tensor]]]] = defaultdict(list)
    steps, keys = set(), None
    for rank, path in enumerate(files):  # rank order: each parameter's pieces come in the order they join
        sd = safe_load(path).get("optimizer_state_dict") or {}
        try:
            base = sd["base_optimizer_state"]
            group_states = base["state"] if isinstance(base, dict) else dict(enumerate(base))
            for g, (part, mapping) in enumerate(zip(sd["single_partition_of_fp32_groups"],
                                                    sd["param_slice_mappings"])):
                st = group_states.get(g, {})
                moments = {k: v for k, v in st.items() if torch.is_tensor(v) and v.ndim > 0}
                if moments and keys is None:
                    keys = sorted(moments)
                if "step" in st:
                    steps.add(int(st["step"]))
                for local, frag in mapping.items():
                    name = global_expert_name(local, rank, layout.ep_size, layout.num_experts)
                    if wanted is None or wanted(name):
                        cut = slice(frag.start, frag.start + frag.numel)
                        pieces[name].append((part[cut].clone(), {k: v[cut].clone() for k, v in moments.items()}))
        except (KeyError, TypeError, AttributeError) as err:
            raise CheckpointError(f"{path} is not a DeepSpeed ZeRO 1/2 optimizer file ({err!r} missing)") from None
    params = {}
    for name, parts in pieces.items():
        local = _local_name(name, layout)
        if local not in shapes:
            raise CheckpointError(f"the model-states file has no shape for {local} (param_shapes): the checkpoint "
                                  "was not written by DeepSpeed's ZeRO 1/2")
        numel = int(torch.Size(shapes[local]).numel())
        flat = torch.cat([p for p, _ in parts])
        if flat.numel() != numel:
            raise CheckpointError(f"{name}: its ZeRO pieces hold {flat.numel()} of its {numel} values: the "
                                  f"optimizer files of {files[0].parent} do not belong together")
        params[name] = ParamState(flat.view(shapes[local]),
                                  {k: torch.cat([m[k] for _, m in parts]).view(shapes[local]) for k in keys or []})
    return OptimizerState(step=max(steps, default=0), keys=keys or [], params=params)


def _local_name(name: str, layout: Layout) -> str:
    """A global expert name as rank 0's ``param_shapes`` spells it (every rank's local experts share names)."""
    m = EXPERT_NAME.fullmatch(name)
    if not m:
        return name
    layer = m.group(1)
    per_rank = layout.num_experts[layer] // layout.ep_size[layer]
    return EXPERT_PREFIX.format(layer=layer, expert=int(m.group(2)) % per_rank) + m.group(3)


def _read_stage0(files: List[Path], layout: Layout, weights: Dict[str, Tensor], wanted: Wanted) -> OptimizerState:
    if not layout.optimizer_params:
        raise CheckpointError(f"{files[0].parent} is a ZeRO stage 0 checkpoint without padnet-ds's layout record "
                              "(written before padnet-ds could reshard): its optimizer files do not name their "
                              "parameters; resume it at its own layout")
    params: Dict[str, ParamState] = {}
    steps, keys = set(), []
    for p, path in enumerate(files):  # file p was written by rank p (expert-data-parallel rank 0)
        sd = safe_load(path).get("optimizer") or {}
        copies = sd.get("fp32_groups")  # bf16: DeepSpeed's fp32 copy per parameter
        torch_sd = sd.get("optimizer_state_dict", sd)
        for g, group in enumerate(torch_sd.get("param_groups", [])):
            for j, idx in enumerate(group["params"]):
                local = layout.optimizer_params[g][j]
                name = global_expert_name(local, p, layout.ep_size, layout.num_experts)
                if name in params or (p and name == local) or (wanted is not None and not wanted(name)):
                    continue  # replicated state from rank 0; an expert from the first rank holding it
                st = torch_sd["state"].get(idx, {})
                keys = sorted(k for k, v in st.items() if torch.is_tensor(v) and v.ndim > 0) or keys
                if "step" in st:
                    steps.add(int(st["step"]))
                fp32 = copies[g][j] if copies is not None else weights[name]
                params[name] = ParamState(fp32.detach().float().clone(),
                                          {k: st[k].float().clone() for k in keys if k in st})
    return OptimizerState(step=max(steps, default=0), keys=keys, params=params)


# -- portable files (padnet-ds reshard) -------------------------------------------------------------
def _portable_file(tag_dir: Path, name: str) -> Path:
    m = EXPERT_NAME.fullmatch(name)
    return tag_dir / (PORTABLE_EXPERT.format(layer=m.group(1), expert=m.group(2)) if m else PORTABLE_REPLICATED)


def write_portable(tag_dir: Path, opt: OptimizerState) -> List[Path]:
    """``opt`` as safetensors files in ``tag_dir`` (one replicated, one per global expert); their paths."""
    from safetensors.torch import save_file

    by_file: Dict[Path, Dict[str, Tensor]] = defaultdict(dict)
    by_file[tag_dir / PORTABLE_REPLICATED] = {}
    for name, st in opt.params.items():
        tensors = by_file[_portable_file(tag_dir, name)]
        tensors[f"{name}/fp32"] = st.fp32.contiguous()
        tensors.update({f"{name}/{k}": v.contiguous() for k, v in st.moments.items()})
    meta = {"step": str(opt.step), "keys": json.dumps(opt.keys)}
    for path, tensors in by_file.items():
        save_file(tensors, str(path), metadata=meta)
    return sorted(by_file)


def read_portable(tag_dir: Path, names: Optional[List[str]] = None) -> OptimizerState:
    """The state of ``names`` (None: every parameter) from the portable files of ``tag_dir`` (each file
    opened once, only its tensors read)."""
    from safetensors import safe_open

    by_file: Dict[Path, Optional[List[str]]] = defaultdict(list)
    if names is None:
        by_file.update({path: None for path in tag_dir.glob("padnet_optim_*.safetensors")})
    for name in names or []:
        by_file[_portable_file(tag_dir, name)].append(name)
    params, step, keys = {}, 0, []
    for path, wanted in sorted(by_file.items()):
        if not path.is_file():
            raise CheckpointError(f"resharded checkpoint {tag_dir} lacks {path.name}: it is incomplete")
        try:
            with safe_open(str(path), framework="pt") as f:
                meta = f.metadata() or {}
                step, keys = int(meta.get("step", 0)), json.loads(meta.get("keys", "[]"))
                held = set(f.keys())
                for name in sorted({k.rsplit("/", 1)[0] for k in held}) if wanted is None else wanted:
                    if f"{name}/fp32" not in held:
                        raise CheckpointError(f"{path} holds no optimizer state for {name}: the model does not "
                                              "match the checkpoint")
                    params[name] = ParamState(f.get_tensor(f"{name}/fp32"),
                                              {k: f.get_tensor(f"{name}/{k}") for k in keys})
        except CheckpointError:
            raise
        except Exception as err:  # noqa: BLE001 - safetensors raises its own error types
            raise CheckpointError(f"checkpoint file {path} cannot be read ({type(err).__name__}: {err}); it is "
                                  "truncated or damaged") from None
    return OptimizerState(step=step, keys=keys, params=params)
