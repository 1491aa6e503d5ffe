"""``PADMoE``: a PAD-Net layer that *is* DeepSpeed's expert-parallel MoE.

Subclassing ``deepspeed.moe.layer.MoE`` keeps everything DeepSpeed does for native MoE
layers: TopKGate routing and ``l_aux``, all-to-all dispatch over ``ep_size`` ranks, expert
parameters marked ``allreduce=False`` and reduced in the expert-data-parallel group,
one checkpoint file per global expert, and the engine's MoE-aware gradient norm.
PAD adds one :class:`PADUnit` per expert linear (static weight, shared mask, ``phi``),
held in ``self.pad``: ordinary replicated data-parallel parameters. The dispatch sends and
computes only the routed rows (:class:`~padnet_ds.moe.dispatch.FilledMOELayer` in place of
DeepSpeed's ``MOELayer``: same gate, experts and parameter names). ``pack()`` switches a
layer with final masks to packed storage (``pad.packed``): each expert then holds only its
values at the mask's dynamic positions.
"""
from __future__ import annotations

from contextlib import contextmanager
from functools import partial
from typing import Any, Callable, Dict, Iterator, List, Optional, Tuple

import torch
from deepspeed.moe.layer import MoE
from torch import Tensor, nn

from ..pad.compose import PADUnit, check_lambda_mode
from ..pad.packed import (DenseSource, Packable, PackedUnit, gather_at, mask_of, pack_unit, unit_sizes,
                          unpack_unit)
from .dispatch import DISPATCHES, FilledMOELayer
from .expert import (FFNExpert, PackedExpertLinear, expert_linears_of, pack_expert_linear, to_pad_expert,
                     unpack_expert_linear)

MASK_SCOPES = ("shared", "expert")
NOISY_GATE_POLICIES = (None, "None", "Jitter", "RSample")


def check_moe_args(num_experts: int, ep_size: int, k: int, noisy_gate_policy: Optional[str], mask_scope: str,
                   dispatch: str = "filled", dropless: bool = False, use_tutel: bool = False) -> None:
    if num_experts < 1:
        raise ValueError(f"num_experts={num_experts} must be >= 1")
    if ep_size < 1 or num_experts % ep_size:
        raise ValueError(f"num_experts={num_experts} is not divisible by ep_size={ep_size}: each expert-parallel "
                         "rank holds num_experts/ep_size experts, so pick an ep_size that divides num_experts")
    if k < 1 or k > num_experts:
        raise ValueError(f"k={k} must be between 1 and num_experts={num_experts} "
                         "(each token goes to its top-k experts)")
    if noisy_gate_policy not in NOISY_GATE_POLICIES:
        raise ValueError(f"noisy_gate_policy={noisy_gate_policy!r} is not one of None, 'Jitter', 'RSample'")
    if mask_scope not in MASK_SCOPES:
        raise ValueError(f"mask_scope={mask_scope!r} is not one of {MASK_SCOPES}: 'shared' (one mask per PAD linear "
                         "for all experts, the paper's default) or 'expert' (one mask per expert)")
    if dispatch not in DISPATCHES:
        raise ValueError(f"dispatch={dispatch!r} is not one of {DISPATCHES}: 'filled' (send and compute the routed "
                         "rows only, the default) or 'padded' (DeepSpeed's capacity buffer)")
    if dropless and (dispatch != "filled" or use_tutel):
        raise ValueError("dropless=True needs dispatch='filled' and use_tutel=False: DeepSpeed's padded and Tutel "
                         "dispatches size every expert's buffer by a capacity")


class PADMoE(MoE, Packable):
    """Drop-in for ``deepspeed.moe.layer.MoE`` whose expert linears are PAD linears.

    Same constructor arguments as DeepSpeed's MoE, plus ``lambda_mode``, ``mask_scope``,
    ``dropless`` and ``dispatch``. ``y, l_aux, exp_counts = layer(x)`` as in DeepSpeed, with
    DeepSpeed's gate; the experts see only the routed rows (``dispatch="filled"``, the default,
    moe/dispatch.py), with DeepSpeed's outputs and gradients; ``dispatch="padded"`` keeps
    DeepSpeed's capacity buffer. ``dropless=True``: no capacity and no token dropped (the gate
    runs with ``drop_tokens=False``; the argument is then ignored). One deliberate difference:
    with ``top2_2nd_expert_sampling`` the second expert is sampled in training only (DeepSpeed
    also samples in eval mode, which makes evaluation non-deterministic).
    """

    def __init__(self,
                 hidden_size: int,
                 expert: nn.Module,
                 num_experts: int = 1,
                 ep_size: int = 1,
                 k: int = 1,
                 capacity_factor: float = 1.0,
                 eval_capacity_factor: float = 1.0,
                 min_capacity: int = 4,
                 use_residual: bool = False,
                 noisy_gate_policy: Optional[str] = None,
                 drop_tokens: bool = True,
                 use_rts: bool = True,
                 use_tutel: bool = False,
                 enable_expert_tensor_parallelism: bool = False,
                 top2_2nd_expert_sampling: bool = True,
                 *,
                 lambda_mode: str = "both",
                 mask_scope: str = "shared",
                 dropless: bool = False,
                 dispatch: str = "filled") -> None:
        check_moe_args(num_experts, ep_size, k, noisy_gate_policy, mask_scope, dispatch, dropless, use_tutel)
        check_lambda_mode(lambda_mode)
        per_expert = mask_scope == "expert"
        template, keys = to_pad_expert(expert, per_expert)
        units = {key: PADUnit(template.get_submodule(path).weight if path else template.weight,
                              lambda_mode, shared_mask=not per_expert, name=key)
                 for path, key in keys.items()}
        super().__init__(hidden_size, template, num_experts, ep_size, k, capacity_factor, eval_capacity_factor,
                         min_capacity, use_residual, noisy_gate_policy, drop_tokens and not dropless, use_rts,
                         use_tutel, enable_expert_tensor_parallelism, top2_2nd_expert_sampling)
        # Same gate and experts (same parameter names), DeepSpeed's forward replaced by the filled-row dispatch.
        self.deepspeed_moe = FilledMOELayer(self.deepspeed_moe, dispatch, dropless)
        self.dropless = dropless
        self.lambda_mode = lambda_mode
        self.mask_scope = mask_scope
        self.k = k
        self.pad = nn.ModuleDict(units)
        self._unit_of_path = dict(keys)
        self._bind()  # after DeepSpeed deep-copied the template, so every copy shares the same unit

    def _bind(self) -> None:
        for owner in self.expert_modules():
            for path, lin in expert_linears_of(owner):
                lin.bind(self.pad[self._unit_of_path[path]])

    @classmethod
    def from_dense(cls, fc1: nn.Linear, fc2: nn.Linear, activation: nn.Module, *, num_experts: int,
                   ep_size: int = 1, k: int = 1, **moe_kwargs) -> "PADMoE":
        """Upcycle a dense FFN: static weights = the dense weights, every expert = a copy.

        With lambdas at 1 the result computes what the dense FFN did (up to the gate's
        weighting, which sums to 1 over the chosen experts when nothing is dropped).
        """
        return cls(fc1.in_features, FFNExpert(fc1, fc2, activation), num_experts=num_experts, ep_size=ep_size,
                   k=k, **moe_kwargs)

    # -- structure ---------------------------------------------------------------------------
    def expert_modules(self) -> List[nn.Module]:
        """The local expert copies (and the residual MLP, which is a PAD expert too)."""
        owners = list(self.deepspeed_moe.experts.deepspeed_experts)
        if self.use_residual:
            owners.append(self.mlp)
        return owners

    def pad_units(self) -> List[PADUnit]:
        """The PAD units, in expert-module order: each has ``.static_weight``, ``.phi`` and ``.mask``."""
        return list(self.pad.values())

    def local_expert_linears(self, unit: PADUnit) -> List[nn.Module]:
        """This rank's expert linears composed with ``unit`` (residual MLP excluded)."""
        path = next(p for p, key in self._unit_of_path.items() if self.pad[key] is unit)
        return [e.get_submodule(path) if path else e for e in self.deepspeed_moe.experts.deepspeed_experts]

    def masks(self, unit: PADUnit) -> List[Tensor]:
        """The masks that govern ``unit``: the shared one, or one per local expert.

        A packed layer has positions, not masks: these are then rebuilt copies (read-only in effect).
        """
        if unit.shared_mask:
            return [mask_of(unit.positions, unit.weight_shape) if isinstance(unit, PackedUnit) else unit.mask]
        return [mask_of(lin.positions, unit.weight_shape) if isinstance(lin, PackedExpertLinear) else lin.mask
                for lin in self.local_expert_linears(unit)]

    @property
    def last_l_aux(self) -> Optional[Tensor]:
        """The load-balancing loss of the latest forward (None before the first)."""
        return getattr(self.deepspeed_moe, "l_aux", None)

    @property
    def last_expert_counts(self) -> Optional[Tensor]:
        """Tokens this rank routed to each global expert in the latest forward (None before the first)."""
        return getattr(self.deepspeed_moe, "exp_counts", None)

    def clear_last_outputs(self) -> None:
        """Drop the latest forward's ``l_aux`` / expert counts: an engine's output hooks sit on them and would
        keep a released engine alive."""
        self.deepspeed_moe.l_aux = None
        self.deepspeed_moe.exp_counts = None

    def dynamic_ratio(self) -> float:
        """Fraction of mask entries that are dynamic (per-expert masks: over this rank's experts)."""
        total = dynamic = 0
        for unit in self.pad_units():
            for mask in self.masks(unit):
                total += mask.numel()
                dynamic += int(torch.count_nonzero(mask))  # bool .sum() is ~20x slower on CPU
        return dynamic / total

    # -- packed storage ----------------------------------------------------------------------
    @property
    def packed(self) -> bool:
        return any(isinstance(u, PackedUnit) for u in self.pad_units())

    def pack(self, dense_static: bool = False) -> None:
        """Store only the dynamic entries under the current masks, in place (``pad.packed``).

        The masks become final. Call before the DeepSpeed engine is built: the packed values
        are new parameters (tagged as DeepSpeed expert parameters, like the weights they replace).
        ``dense_static`` keeps the whole static weight (measured against packed in ``bench.memory``).
        """
        if self.packed:
            raise ValueError("this PADMoE layer is already packed")
        for path, key in self._unit_of_path.items():
            unit = pack_unit(self.pad[key], dense_static)
            self.pad[key] = unit
            shared = unit.positions if unit.shared_mask else None
            self._replace_linears(path, lambda lin, shared=shared: pack_expert_linear(lin, shared))
        self._bind()

    def unpack(self) -> None:
        """The dense form again (``W_e`` and ``W_static`` zero where the composition never reads them)."""
        if not self.packed:
            raise ValueError("this PADMoE layer is not packed")
        for path, key in self._unit_of_path.items():
            unit = self.pad[key]
            shared = unit.positions if unit.shared_mask else None
            self._replace_linears(path, lambda lin, shared=shared: unpack_expert_linear(lin, shared))
            self.pad[key] = unpack_unit(unit)
        self._bind()

    def _slots(self) -> List[Tuple[str, Any, Any]]:
        """(name prefix, holder, key) of every expert module: the local experts, then the residual MLP."""
        experts = self.deepspeed_moe.experts.deepspeed_experts
        slots: List[Tuple[str, Any, Any]] = [(f"deepspeed_moe.experts.deepspeed_experts.{i}.", experts, i)
                                             for i in range(len(experts))]
        if self.use_residual:
            slots.append(("mlp.", self, "mlp"))
        return slots

    def _linears_at(self, path: str) -> List[Tuple[str, nn.Module]]:
        """(name prefix, expert linear) at ``path`` of every expert module."""
        out = []
        for prefix, holder, key in self._slots():
            owner = holder[key] if isinstance(key, int) else getattr(holder, key)
            out.append((prefix + (path + "." if path else ""), owner.get_submodule(path) if path else owner))
        return out

    def _replace_linears(self, path: str, convert: Callable[[nn.Module], nn.Module]) -> None:
        """Swap the expert linear at ``path`` of every expert module (local experts, residual MLP)."""
        for _, holder, key in self._slots():
            owner = holder[key] if isinstance(key, int) else getattr(holder, key)
            if not path:  # the expert is a bare linear
                new = convert(owner)
                if isinstance(key, int):
                    holder[key] = new
                else:
                    setattr(holder, key, new)
                continue
            parent_path, _, leaf = path.rpartition(".")
            parent = owner.get_submodule(parent_path) if parent_path else owner
            setattr(parent, leaf, convert(getattr(parent, leaf)))

    def dense_sources(self) -> Dict[str, DenseSource]:
        """{packed parameter (relative name): where its values sit in the dense layout}; packed layers only."""
        out: Dict[str, DenseSource] = {}
        for path, key in self._unit_of_path.items():
            unit = self.pad[key]
            out.update(unit.static_source(f"pad.{key}."))
            for prefix, lin in self._linears_at(path):
                positions = unit.positions if unit.shared_mask else lin.positions
                out[prefix + "values"] = DenseSource(prefix + "weight", unit.weight_shape,
                                                     partial(gather_at, positions=positions))
        return out

    def storage_sizes(self) -> Dict[str, Tuple[int, int]]:
        out: Dict[str, Tuple[int, int]] = {}
        for path, key in self._unit_of_path.items():
            unit = self.pad[key]
            p, value_bytes = unit.weight_shape.numel(), unit.static_tensor().element_size()
            out.update(unit_sizes(unit, f"pad.{key}.", value_bytes))
            for prefix, lin in self._linears_at(path):
                packed = isinstance(lin, PackedExpertLinear)
                own = lin.positions if packed else lin.mask
                if packed:
                    n = lin.values.numel()
                else:
                    n = int(torch.count_nonzero(lin.mask if own is not None else unit.mask))
                out[prefix + ("values" if packed else "weight")] = (n * value_bytes, p * value_bytes)
                if own is not None:
                    out[prefix + ("positions" if packed else "mask")] = (4 * n, p)
        return out

    # -- distributed -------------------------------------------------------------------------
    def set_deepspeed_parallelism(self, use_data_before_expert_parallel_: bool = False) -> None:
        # Called by the engine on every rank before any expert group exists: fail here, not in a collective.
        if torch.distributed.is_initialized():
            world = torch.distributed.get_world_size()
            if world % self.ep_size:
                raise ValueError(f"world size {world} is not divisible by ep_size={self.ep_size}: expert-parallel "
                                 "groups tile the ranks, so launch a multiple of ep_size ranks or change ep_size")
        if self.deepspeed_moe.ep_group is not None:
            # An engine rebuilt around this layer (the switch to packed storage): the groups exist and the
            # layer holds them already; DeepSpeed's gate refuses to be given its group twice.
            return
        super().set_deepspeed_parallelism(use_data_before_expert_parallel_)

    # -- forward -----------------------------------------------------------------------------
    @contextmanager
    def _composition(self) -> Iterator[None]:
        units = self.pad_units()
        for unit in units:
            unit.hold()
        # DeepSpeed's top-2 gate draws Gumbel noise for the second expert in eval mode too;
        # evaluation (and `padnet-ds eval` of a checkpoint) must be reproducible, so only training samples.
        gate = self.deepspeed_moe.gate
        sampling = getattr(gate, "top2_2nd_expert_sampling", False)
        if not self.training:
            gate.top2_2nd_expert_sampling = False
        try:
            yield
        finally:
            for unit in units:
                unit.release()
            if hasattr(gate, "top2_2nd_expert_sampling"):
                gate.top2_2nd_expert_sampling = sampling

    def forward(self, hidden_states: Tensor, used_token: Optional[Tensor] = None):
        with self._composition():
            return super().forward(hidden_states, used_token)

    def extra_repr(self) -> str:
        return f"num_experts={self.num_experts}, ep_size={self.ep_size}, k={self.k}, " \
               f"lambda_mode={self.lambda_mode!r}, mask_scope={self.mask_scope!r}, " \
               f"dispatch={self.deepspeed_moe.dispatch!r}, dropless={self.dropless}"


def pad_moe_layers(model: nn.Module) -> Dict[str, PADMoE]:
    return {name: m for name, m in model.named_modules() if isinstance(m, PADMoE)}
