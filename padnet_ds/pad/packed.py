"""Packed PAD weights: once a mask is final, only its dynamic entries are stored (docs/PAD.md section 9).

Notation: a factor (expert weight) has P entries; ``idx`` are the mask's dynamic positions
(flat, ascending, int32; ``n = |idx| = rP``) and ``cidx`` their complement. Expert e holds
``v_e = W_e[idx]`` (n values instead of P); with a shared mask the static weight is held only
where the mask is 0, ``s = W_static[cidx]``. The composition is

    W_eff(e) = S + scatter_idx(lambda_d * v_e),            S = scatter_cidx(lambda_s * s)

(S is zero at ``idx``, so each expert only overwrites its dynamic entries of a workspace that
holds S), and its backward, with ``G_e = dL/dW_eff(e)``,

    dL/dv_e = lambda_d G_e[idx]                 dL/ds = lambda_s (sum_e G_e)[cidx]
    dL/dlambda_d = sum_e <G_e[idx], v_e>        dL/dlambda_s = <(sum_e G_e)[cidx], s>

so neither a dense ``W_e`` nor its gradient ever exists; the weight-sized tensors are the
unit's workspace and ``G_e`` (as in the dense path). The same hub design as
:mod:`.compose`: experts add ``G_e`` into one per-layer sum, one hub node per layer turns it
into the replicated side's gradients after every expert ran.

Per-expert masks keep positions per expert and a dense ``W_static``: the static entries in
use are the union of the experts' complements, ``1 - r^E`` of P for independent masks
(99.6% at r = 0.5, E = 8), so holding them packed would save nothing.

Why int32 positions and ``scatter_`` / ``index_select`` rather than a bool mask with
``masked_scatter_`` / ``masked_select``: measured on one CPU core at 1024x256 and 3072x768,
r = 0.5, the index ops take 0.09 / 0.9 ms (scatter; ``index_copy_`` 0.17 / 1.6) and 0.07 / 0.8
ms (gather) against 1.8 / 11 ms and 1.7 / 17 ms for the masked ones, and each runs three times
per expert and step (int64 indices, converted once per layer forward: int32 ones are up to 2x
slower in these kernels). A
bool mask would be smaller (P bytes against 4rP), but turning it into positions costs a
``nonzero`` per layer forward (1.5 / 15-29 ms). The complement ``cidx`` is not stored (that
would be 4P bytes per mask in all); it is derived once per layer forward from ``idx`` with a
bincount (0.5 / 6 ms, about 3x faster than ``nonzero``) and lives only until the backward.
"""
from __future__ import annotations

from dataclasses import dataclass
from functools import partial
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch
from torch import Tensor, nn

from .compose import PADUnit, check_lambda_mode, expert_linear, flat_dot

MAX_POSITIONS = 2 ** 31 - 1  # int32
PACKED_WEIGHTS = ("values", "static_values")  # parameter names of packed weights


def is_packed_weight(name: str) -> bool:
    """Whether a parameter name is a packed weight: a weight matrix stored as its kept entries (so
    optimizer settings for matrices, such as weight decay, apply although it is 1-D)."""
    return name.rpartition(".")[2] in PACKED_WEIGHTS


@dataclass(frozen=True)
class DenseSource:
    """Where a packed parameter's values come from in the dense layout: ``take(dense) -> packed``."""
    name: str  # the dense parameter's name
    shape: torch.Size  # the dense parameter's shape
    take: Callable[[Tensor], Tensor]


# -- positions and conversions (shared by packing, export and resharding) ----------------------

def positions_of(mask: Tensor) -> Tensor:
    """The dynamic positions of a bool mask: flat, ascending, int32."""
    if mask.numel() > MAX_POSITIONS:
        raise ValueError(f"a PAD mask of {mask.numel()} entries is too large for int32 positions "
                         f"(at most {MAX_POSITIONS}); split the weight")
    return mask.reshape(-1).nonzero().squeeze(1).to(torch.int32)


def mask_of(positions: Tensor, shape: Sequence[int]) -> Tensor:
    """The bool mask (1 = dynamic) whose dynamic positions are ``positions``."""
    mask = torch.zeros(torch.Size(shape).numel(), dtype=torch.bool, device=positions.device)
    return mask.index_fill_(0, positions.long(), True).view(*shape)


def complement_of(positions: Tensor, numel: int) -> Tensor:
    """The ascending int64 positions NOT in ``positions`` (ascending) among ``numel``.

    Dynamic entry i has ``idx_i - i`` static entries before it, so the k-th static entry sits
    at ``k + #{i: idx_i - i <= k}``: one bincount and one cumsum, no pass over a mask.
    """
    n = positions.numel()
    n_static = numel - n
    # in the positions' own dtype: int32 arithmetic is cheaper, bincount counts in int64 anyway
    ranks = positions - torch.arange(n, dtype=positions.dtype, device=positions.device)
    before = torch.bincount(ranks, minlength=n_static + 1)[:n_static]
    return before.cumsum_(0).add_(torch.arange(n_static, device=positions.device))


def gather_at(weight: Tensor, positions: Tensor, batch_dims: int = 0) -> Tensor:
    """``weight`` at ``positions`` of its flattened factor dims: [*batch, n], a copy.

    ``batch_dims`` leading dims index factors (DY-Conv's K kernels); the rest is one factor.
    """
    flat = weight.detach().reshape(*weight.shape[:batch_dims], -1)  # [*batch, P]
    return flat.index_select(batch_dims, positions.long())


def scatter_at(values: Tensor, positions: Tensor, shape: Sequence[int], into: Optional[Tensor] = None) -> Tensor:
    """Dense [*batch, *shape] holding ``values`` [*batch, n] at ``positions``; zeros elsewhere, or
    ``into``'s entries (a copy; ``into`` is not changed)."""
    batch = values.shape[:-1]
    numel = torch.Size(shape).numel()
    if into is None:
        out = values.new_zeros(*batch, numel)
    else:
        out = into.detach().reshape(*batch, numel).clone()  # [*batch, P]
    out.index_copy_(len(batch), positions.long(), values.detach())
    return out.view(*batch, *shape)


def check_packed(what: str, shape: Sequence[int], positions: Tensor, count: int, expected: str) -> None:
    """Positions must be a valid int32 set; ``count`` (a stored tensor's length) must equal ``expected``."""
    numel = torch.Size(shape).numel()
    if positions.dtype != torch.int32 or positions.ndim != 1:
        raise ValueError(f"{what}: positions must be a 1-D int32 tensor, got {positions.dtype} "
                         f"{tuple(positions.shape)}")
    n = positions.numel()
    want = n if expected == "dynamic" else numel - n
    if count != want:
        raise ValueError(f"{what}: {count} packed {expected} values, but its mask has {want} {expected} entries "
                         f"({n} dynamic of {numel}); the values do not belong to this mask")
    if n and (int(positions.min()) < 0 or int(positions.max()) >= numel
              or (n > 1 and not bool((positions[1:] > positions[:-1]).all()))):
        raise ValueError(f"{what}: positions must be ascending, distinct and in [0, {numel})")


# -- the composition ---------------------------------------------------------------------------

class PackedComposition:
    """One layer forward's packed composition for one set of positions (a shared mask, or one
    expert's). Same contract as :class:`~padnet_ds.pad.compose.Composition`: ``linear`` per
    expert, ``token`` from the layer's hub, ``release`` through the unit."""

    def __init__(self, unit: "PackedUnit", positions: Tensor, single_use: bool) -> None:
        static = unit.static_tensor()
        lam_d, lam_s = unit.lambdas()
        self.lam_d, self.lam_s = lam_d.detach(), lam_s.detach()
        self.learn_lam_d = lam_d.requires_grad
        self.static = static
        self.dyn = positions.long()  # [n]; scatter_ takes int64 (and int64 gathers are faster)
        # [P - n] where the static weight is packed; None: it is dense (per-expert masks)
        self.static_pos = complement_of(positions, unit.weight_shape.numel()) if unit.static_packed else None
        self.workspace = unit.workspace(static.dtype, static.device)
        self.scaled = unit.scratch(max(self.dyn.numel(), static.numel() if unit.static_packed else 0), static.dtype,
                                   static.device)  # lambda * values before they are scattered
        self.single_use = single_use
        grad = torch.is_grad_enabled()
        self.sum_needed = grad and (static.requires_grad or lam_s.requires_grad)
        self.gsum: Optional[Tensor] = None  # sum_e G_e (per-expert masks: sum_e (1-M_e) G_e)
        self.dlam_d: Optional[Tensor] = None
        if self.static_pos is not None:
            # Written once per layer forward: experts write only at idx, so S stays for all of
            # them and their backward (S changes only with s and lambda_s, which cannot change
            # between a forward and its backward without autograd's version check failing).
            self._write_static()
        hub_needed = grad and (static.requires_grad or lam_d.requires_grad or lam_s.requires_grad)
        self.token = _PackedHub.apply(static, lam_d, lam_s, self) if hub_needed else None

    def kept(self) -> List[Tensor]:
        """The tensors this composition holds for backward (and the unit's workspace and scratch)."""
        return [t for t in (self.dyn, self.static_pos, self.workspace, self.scaled) if t is not None]

    @torch.no_grad()
    def _write_static(self) -> None:
        flat = self.workspace.view(-1)
        if self.static_pos is None:
            torch.mul(self.static.view(-1), self.lam_s, out=flat)
        else:
            flat.scatter_(0, self.static_pos, torch.mul(self.static, self.lam_s, out=self.scaled[:self.static.numel()]))

    @torch.no_grad()
    def compose(self, values: Tensor) -> Tensor:
        """``S + scatter_idx(lambda_d v_e)`` in the shared workspace (valid until the next expert composes)."""
        if self.static_pos is None:  # dense static: rewrite the entries the last expert overwrote
            self._write_static()
        scaled = torch.mul(values, self.lam_d, out=self.scaled[:values.numel()])
        self.workspace.view(-1).scatter_(0, self.dyn, scaled)
        return self.workspace

    def linear(self, x: Tensor, values: Tensor, bias: Optional[Tensor]) -> Tensor:
        """``F.linear(x, W_eff, bias)`` for one expert's packed ``v_e``/``b_e``."""
        return expert_linear(self, x, values, bias)

    def weight_grad(self, grad: Tensor, values: Tensor, hubbed: bool) -> Tensor:
        """``dL/dv_e`` from ``G_e``: always :meth:`collect` (the gather it does is the gradient itself)."""
        return self.collect(grad, values)

    def collect(self, grad: Tensor, values: Tensor) -> Tensor:
        """Take one expert's ``G_e`` into the layer sums; returns ``dL/dv_e = lambda_d G_e[idx]``."""
        flat = grad.view(-1)
        picked = flat.index_select(0, self.dyn)  # G_e[idx]
        if self.learn_lam_d:
            d = flat_dot(picked, values)
            self.dlam_d = d if self.dlam_d is None else self.dlam_d + d
        if self.sum_needed:
            if self.static_pos is None:
                flat.index_fill_(0, self.dyn, 0)  # (1 - M) G_e: the dynamic entries have no static part
            if self.gsum is None:
                self.gsum = grad
            else:
                self.gsum.add_(grad)
        return picked.mul_(self.lam_d)


class _PackedHub(torch.autograd.Function):
    """Per layer: (static values or weight, lambda_d, lambda_s) -> an empty token for the experts."""

    @staticmethod
    def forward(ctx, static: Tensor, lam_d: Tensor, lam_s: Tensor, comp: PackedComposition) -> Tensor:
        ctx.comp = comp
        ctx.save_for_backward(static)
        return static.new_empty(0)

    @staticmethod
    def backward(ctx, _):
        (static,) = ctx.saved_tensors
        comp: PackedComposition = ctx.comp
        need_s, need_ld, need_ls, _ = ctx.needs_input_grad
        g, comp.gsum = comp.gsum, None
        dlam_d, comp.dlam_d = comp.dlam_d, None
        grad_s = grad_ld = grad_ls = None
        if need_ld and dlam_d is not None:
            grad_ld = dlam_d.to(comp.lam_d.dtype).reshape(comp.lam_d.shape)
        if g is not None:
            flat = g.view(-1)
            at_static = flat if comp.static_pos is None else flat.index_select(0, comp.static_pos)
            if need_ls:
                grad_ls = flat_dot(at_static, static).to(comp.lam_s.dtype).reshape(comp.lam_s.shape)
            if need_s:
                grad_s = at_static.mul_(comp.lam_s).view(static.shape)
        return grad_s, grad_ld, grad_ls, None


# -- the packed unit -----------------------------------------------------------------------------

class PackedUnit(PADUnit):
    """The replicated half of a packed PAD weight.

    Shared mask: ``positions`` (int32 buffer) and ``static_values`` (``W_static`` where the mask
    is 0). Per-expert masks: each factor owner holds its own ``positions``; the static weight
    stays dense (``static_weight``, see the module docstring). ``dense_static`` keeps it dense
    with a shared mask too (more memory; ``bench.memory`` measures the two against each other).
    ``phi`` as in :class:`PADUnit`. The mask is final: there is no bool mask to edit
    (:func:`mask_of` derives one).
    """

    def __init__(self, shape: Sequence[int], static: Tensor, positions: Optional[Tensor], phi: Tensor,
                 lambda_mode: str = "both", name: str = "", dense_static: bool = False) -> None:
        nn.Module.__init__(self)  # not PADUnit.__init__: that would build a dense static weight and mask
        self.lambda_mode = check_lambda_mode(lambda_mode)
        self.name = name
        self.shape = torch.Size(shape)
        self.shared_mask = positions is not None
        self.static_packed = self.shared_mask and not dense_static
        # The dense shape travels with the state, so a checkpoint can be unpacked from its files alone.
        self.register_buffer("dense_shape", torch.tensor(list(self.shape), dtype=torch.int64, device=phi.device))
        if self.shared_mask:
            self.register_buffer("positions", positions)
        if self.static_packed:
            check_packed(f"PAD weight {name!r}", self.shape, positions, static.numel(), "static")
            self._register_static("static_values", static)
        else:
            self._register_static("static_weight", static)
        self._register_phi(phi)
        self.score_sink = None  # never set: a packed mask is not scored
        self._held: Optional[PackedComposition] = None

    @property
    def weight_shape(self) -> torch.Size:
        return self.shape

    def static_tensor(self) -> Tensor:
        return self.static_values if self.static_packed else self.static_weight

    def dynamic_ratio(self) -> float:
        self._shared_only()
        return self.positions.numel() / self.shape.numel()

    def static_source(self, prefix: str) -> Dict[str, DenseSource]:
        """``{prefix + "static_values": its dense source}`` ({} when the static weight is dense)."""
        if not self.static_packed:
            return {}
        take = partial(gather_at, positions=complement_of(self.positions, self.shape.numel()))
        return {prefix + "static_values": DenseSource(prefix + "static_weight", self.shape, take)}

    def _final(self) -> ValueError:
        return ValueError(f"PAD weight {self.name!r} is packed: its mask is final (only the values at its dynamic "
                          "positions exist); unpack it first (PADMoE.unpack / padnet_ds.pad.packed.unpack_unit)")

    def set_mask(self, mask: Tensor) -> None:
        raise self._final()

    def terms(self, mask: Tensor, owner: nn.Module):
        raise self._final()

    def composition(self, owner: Optional[nn.Module] = None) -> PackedComposition:
        """The composition for ``owner``'s positions (default: the shared ones, held by :meth:`hold`)."""
        positions = getattr(owner, "positions", None) if owner is not None and owner is not self else None
        if positions is None:
            if not self.shared_mask:
                raise ValueError(f"PAD weight {self.name!r} uses per-expert masks: pass the expert linear as owner")
            if self._held is not None:
                return self._held
            return PackedComposition(self, self.positions, single_use=True)
        return PackedComposition(self, positions, single_use=True)

    def hold(self) -> None:
        if self.shared_mask:
            self._held = PackedComposition(self, self.positions, single_use=False)

    def extra_repr(self) -> str:
        n = f", dynamic={self.positions.numel()}/{self.shape.numel()}" if self.shared_mask else ""
        return f"{self.name!r}, shape={tuple(self.shape)}, lambda_mode={self.lambda_mode!r}, packed{n}, " \
               f"mask={'shared' if self.shared_mask else 'per-expert'}"


def pack_unit(unit: PADUnit, dense_static: bool = False) -> PackedUnit:
    """The packed form of ``unit`` under its current mask (a new module; ``unit`` is unchanged).

    Per-expert masks: the positions are the expert linears' business (``pack_expert_linear``).
    """
    if isinstance(unit, PackedUnit):
        raise ValueError(f"PAD weight {unit.name!r} is already packed")
    positions = positions_of(unit.mask) if unit.shared_mask else None
    if positions is not None and not dense_static:
        static = gather_at(unit.static_weight, complement_of(positions, unit.mask.numel()))
    else:
        static = unit.static_weight.detach().clone()
    packed = PackedUnit(unit.weight_shape, static, positions, unit.phi.detach().clone(), unit.lambda_mode, unit.name,
                        dense_static)
    packed.static_tensor().requires_grad_(unit.static_weight.requires_grad)
    return packed


def unpack_unit(unit: PackedUnit) -> PADUnit:
    """The dense form of a packed unit: ``W_static`` is zero at the dynamic positions (where the
    composition never reads it), the mask is rebuilt from the positions."""
    static = unit.static_tensor()
    if unit.static_packed:
        static = scatter_at(static, complement_of(unit.positions, unit.shape.numel()), unit.shape)
    dense = PADUnit(static, unit.lambda_mode, shared_mask=unit.shared_mask, name=unit.name)
    with torch.no_grad():
        dense.phi.copy_(unit.phi)
        if unit.shared_mask:
            dense.mask.copy_(mask_of(unit.positions, unit.shape))
    dense.static_weight.requires_grad_(unit.static_tensor().requires_grad)
    return dense


@torch.no_grad()
def effective_weight(unit: PackedUnit, values: Tensor, positions: Optional[Tensor] = None) -> Tensor:
    """``W_eff(e) = S + scatter_idx(lambda_d v_e)`` as a new dense tensor (export to a plain MoE,
    comparisons); ``positions`` only for per-expert masks."""
    comp = PackedComposition(unit, unit.positions if positions is None else positions, single_use=True)
    return comp.compose(values).clone()


# -- layers that can be packed -------------------------------------------------------------------

class Packable:
    """A PAD layer whose dynamic factors can be stored packed, in place (mixin for nn.Modules)."""

    @property
    def packed(self) -> bool:
        raise NotImplementedError

    def pack(self) -> None:
        raise NotImplementedError

    def unpack(self) -> None:
        raise NotImplementedError

    def dense_sources(self) -> Dict[str, DenseSource]:
        """Packed layer: {packed parameter name (relative): its dense source}."""
        raise NotImplementedError

    def storage_sizes(self) -> Dict[str, Tuple[int, int]]:
        """{relative name: (bytes packed, bytes dense)} of every tensor the two layouts hold
        differently (factors, static weights, masks vs positions, the recorded dense shape), dense or
        packed layer alike, counted at the current element sizes (parameters) and as bool masks /
        int32 positions; a tensor only one layout has is named as that layout names it."""
        raise NotImplementedError


def pack_model(model: nn.Module) -> List[str]:
    """Pack every PAD layer of ``model`` in place under its current masks; returns their names.

    Call before the DeepSpeed engine is built: the packed values are new parameters.
    """
    names = [n for n, m in model.named_modules() if isinstance(m, Packable) and not m.packed]
    layers = dict(model.named_modules())
    for name in names:
        layers[name].pack()
    return names


def unpack_model(model: nn.Module) -> List[str]:
    """Unpack every packed PAD layer of ``model`` in place; returns their names."""
    names = [n for n, m in model.named_modules() if isinstance(m, Packable) and m.packed]
    layers = dict(model.named_modules())
    for name in names:
        layers[name].unpack()
    return names


def is_packed(model: nn.Module) -> bool:
    return any(isinstance(m, PackedUnit) for m in model.modules())


def _each_packable(model: nn.Module):
    for name, m in model.named_modules():
        if isinstance(m, Packable):
            yield (name + "." if name else ""), m


def dense_sources(model: nn.Module) -> Dict[str, DenseSource]:
    """{packed parameter name: its dense source} over every packed layer of ``model`` (full names)."""
    out: Dict[str, DenseSource] = {}
    for prefix, layer in _each_packable(model):
        if layer.packed:
            for name, src in layer.dense_sources().items():
                out[prefix + name] = DenseSource(prefix + src.name, src.shape, src.take)
    return out


def storage_sizes(model: nn.Module) -> Dict[str, Tuple[int, int]]:
    """:meth:`Packable.storage_sizes` over every PAD layer of ``model`` (full names)."""
    return {prefix + k: v for prefix, layer in _each_packable(model) for k, v in layer.storage_sizes().items()}


def unit_sizes(unit: PADUnit, prefix: str, value_bytes: int) -> Dict[str, Tuple[int, int]]:
    """:meth:`Packable.storage_sizes` of a unit's own tensors, packed or dense (per-expert masks: only the
    recorded dense shape; their static weight is dense either way, the masks are the experts')."""
    shape_bytes = {prefix + "dense_shape": (8 * len(unit.weight_shape), 0)}
    if not unit.shared_mask:
        return shape_bytes
    p = unit.weight_shape.numel()
    packed = isinstance(unit, PackedUnit)
    dynamic = unit.positions.numel() if packed else int(torch.count_nonzero(unit.mask))
    static_kept = p if packed and not unit.static_packed else p - dynamic
    static_name = "static_values" if packed and unit.static_packed else "static_weight"
    return {prefix + static_name: (static_kept * value_bytes, p * value_bytes),
            prefix + ("positions" if packed else "mask"): (4 * dynamic, p), **shape_bytes}
