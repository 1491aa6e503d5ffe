"""A planted-structure PAD-MoE problem: a teacher whose experts differ only at known entries.

Notation, per PAD unit u (each expert linear of each layer): ``W_s`` the shared static weight,
``P`` the planted set (exactly ``round(r* n)`` of the unit's ``n`` entries, the same for every
expert: a shared mask), ``z_e`` standard normal per expert. The teacher's experts are

    W_T(e) = W_s + margin * std(W_s) * z_e * 1_P          (mask M* = 1_P, lambda_d = lambda_s = 1)

so off ``P`` every teacher expert equals ``W_s`` and on ``P`` the experts differ from it and
from each other by about one weight standard deviation. A student upcycled from ``W_s`` (every
expert a copy, mask all ones) and trained on the teacher's outputs reaches zero loss by moving
its experts on ``P`` alone; a partition that keeps ``P`` dynamic and makes the rest static
loses nothing, so the precision of the student's final mask against ``P`` says whether the
partitioner found the entries that matter (a random mask's expected precision is ``r*``).

The student's gate is the teacher's, frozen: expert e of the student sees the tokens expert e
of the teacher saw and so can learn exactly that expert. Routing is deterministic (no noisy
gate, no sampled second expert, no dropped tokens), so teacher and student route alike at any
``ep_size``.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Dict, List, Tuple

import torch
from torch import Tensor, nn

from padnet_ds import PADMoE
from padnet_ds.moe.upcycle import global_expert_ids
from padnet_ds.pad.compose import PADUnit


@dataclass(frozen=True)
class Problem:
    hidden: int = 32
    ffn: int = 64
    experts: int = 4
    k: int = 2
    layers: int = 2
    ratio: float = 0.3  # r*: planted fraction of every PAD unit
    margin: float = 1.0  # planted deviation, in standard deviations of W_s
    seed: int = 0  # draws W_s, the gate, P, z_e and the data
    batch: int = 8  # micro-batch (sequences) per rank
    seq: int = 16
    train_batches: int = 64  # per rank, cycled
    eval_batches: int = 16  # per rank, held out


class Stack(nn.Module):
    """``layers`` PAD-MoE FFN layers with residual connections: x -> x + moe_l(x)."""

    def __init__(self, p: Problem, ep_size: int = 1) -> None:
        super().__init__()
        gen = torch.Generator().manual_seed(p.seed)
        self.moes = nn.ModuleList()
        for _ in range(p.layers):
            fc1, fc2 = _linear(p.hidden, p.ffn, gen), _linear(p.ffn, p.hidden, gen)
            layer = PADMoE.from_dense(fc1, fc2, nn.GELU(), num_experts=p.experts, ep_size=ep_size, k=p.k,
                                      drop_tokens=False, top2_2nd_expert_sampling=False)
            with torch.no_grad():
                gate = layer.deepspeed_moe.gate.wg.weight
                gate.copy_(torch.randn(gate.shape, generator=gen) / p.hidden ** 0.5)
            gate.requires_grad_(False)
            self.moes.append(layer)

    def forward(self, x: Tensor) -> Tensor:
        for layer in self.moes:
            y, _, _ = layer(x)
            x = x + y
        return x

    def units(self) -> Dict[str, Tuple[PADMoE, PADUnit]]:
        """{module path of the PAD unit (as the partitioner's sites name it): (layer, unit)}, in layer order."""
        return {f"moes.{i}.pad.{key}": (layer, unit) for i, layer in enumerate(self.moes)
                for key, unit in layer.pad.items()}


def _linear(n_in: int, n_out: int, gen: torch.Generator) -> nn.Linear:
    lin = nn.Linear(n_in, n_out)
    bound = n_in ** -0.5  # nn.Linear's default range, drawn from our generator
    with torch.no_grad():
        lin.weight.uniform_(-bound, bound, generator=gen)
        lin.bias.uniform_(-bound, bound, generator=gen)
    return lin


def planted_sets(p: Problem, model: Stack) -> Dict[str, Tensor]:
    """{unit name: bool tensor}: exactly ``round(r* n)`` entries per unit, drawn from ``p.seed``."""
    gen = torch.Generator().manual_seed(p.seed + 1)
    out = {}
    for name, (_, unit) in model.units().items():
        n = unit.mask.numel()
        keep = torch.zeros(n, dtype=torch.bool)
        keep[torch.randperm(n, generator=gen)[:int(round(p.ratio * n))]] = True
        out[name] = keep.view(unit.mask.shape)
    return out


@torch.no_grad()
def make_teacher(p: Problem) -> Tuple[Stack, Dict[str, Tensor]]:
    """The teacher (ep_size 1) and its planted sets; deviations seeded by (unit, global expert)."""
    teacher = Stack(p)
    planted = planted_sets(p, teacher)
    for u, (name, (layer, unit)) in enumerate(teacher.units().items()):
        unit.set_mask(planted[name])
        scale = p.margin * float(unit.static_weight.std())
        for gid, lin in zip(global_expert_ids(layer), layer.local_expert_linears(unit)):
            gen = torch.Generator().manual_seed(p.seed * 1_000_003 + u * 1009 + gid)
            z = torch.randn(lin.weight.shape, generator=gen)
            lin.weight.copy_(unit.static_weight + scale * z * planted[name])
    return teacher.eval(), planted


@torch.no_grad()
def teacher_data(p: Problem, teacher: Stack, world: int) -> Dict[str, Tensor]:
    """Inputs and teacher outputs: ``train_x/y`` [world, train_batches, batch, seq, hidden], ``eval_x/y`` alike."""
    gen = torch.Generator().manual_seed(p.seed + 2)
    out = {}
    for split, n in (("train", p.train_batches), ("eval", p.eval_batches)):
        x = torch.randn(world, n, p.batch, p.seq, p.hidden, generator=gen)
        out[f"{split}_x"] = x
        out[f"{split}_y"] = teacher(x.view(-1, p.seq, p.hidden)).view(x.shape)
    return out


def make_student(p: Problem, ep_size: int) -> Stack:
    """Upcycled from the teacher's static weights (every expert a copy, mask all ones), with its gate.

    Drawn from the same seed as :func:`make_teacher`'s model, so ``W_s``, the biases and the gate
    are the teacher's on every rank without sending any weights.
    """
    return Stack(p, ep_size)


def precision(masks: Dict[str, Tensor], planted: Dict[str, Tensor]) -> Dict[str, Any]:
    """|M and P| / |M| (the fraction of dynamic entries that are planted): per unit, per layer, overall."""
    counts: Dict[str, List[int]] = {}
    for name, m in masks.items():
        m = m.detach().to("cpu", torch.bool)
        counts[name] = [int(torch.count_nonzero(m & planted[name])), int(torch.count_nonzero(m))]

    def ratio(names) -> float:
        hit, dyn = (sum(counts[n][i] for n in names) for i in (0, 1))
        return hit / dyn if dyn else float("nan")

    layers: Dict[str, List[str]] = {}
    for name in counts:
        layers.setdefault(name.split(".pad.")[0], []).append(name)
    return {"units": {n: ratio([n]) for n in counts}, "layers": {k: ratio(v) for k, v in layers.items()},
            "overall": ratio(list(counts))}


def masks_of(model: Stack) -> Dict[str, Tensor]:
    return {name: unit.mask for name, (_, unit) in model.units().items()}


@torch.no_grad()
def deviation_split(model: Stack, planted: Dict[str, Tensor]) -> Tuple[float, float]:
    """``sum (lambda_d W_e - lambda_s W_s)^2`` over this rank's experts, (on ``P``, off ``P``).

    The share on ``P`` is 1 when the student's experts moved only where the teacher's differ,
    and ``r*`` when they show no preference.
    """
    on = off = 0.0
    for name, (layer, unit) in model.units().items():
        lam_d, lam_s = (float(v.detach()) for v in unit.lambdas())
        where = planted[name].to(unit.static_weight.device)
        for lin in layer.local_expert_linears(unit):
            d2 = (lam_d * lin.weight.float() - lam_s * unit.static_weight.float()).pow(2)
            on, off = on + float(d2[where].sum()), off + float(d2[~where].sum())
    return on, off
