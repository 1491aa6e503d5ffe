"""Layers, routings and result comparison for the dispatcher equivalence tests (1 and 2 ranks).

Every comparison runs the layer under test and its reference on the same input with the same
RNG state (random token selection and the top-2 Gumbel draw use it) and compares the output,
``l_aux``, ``exp_counts`` and the gradients of the input and of every parameter (gate, every
local expert's weights and biases, PAD static weights, phi) to 1e-6 in fp32.
"""
from __future__ import annotations

from typing import Dict, List, Optional

import torch
from deepspeed.moe.layer import MoE
from torch import nn

from padnet_ds import PADMoE
from padnet_ds.moe.expert import FFNExpert
from padnet_ds.moe.upcycle import perturb_experts

H, F_, E = 16, 32, 4  # rows of whole 16-byte units, for the grouped kernel
TOL = dict(rtol=1e-6, atol=1e-6)


def pad_layer(k: int, ep_size: int = 1, seed: int = 0, ratio: float = 0.5, **kw) -> PADMoE:
    """A PAD-MoE mid-training: perturbed experts, a partial seeded mask, phi != 0."""
    torch.manual_seed(seed)
    fc1, fc2 = nn.Linear(H, F_), nn.Linear(F_, H)
    kw.setdefault("capacity_factor", 1.0)  # tight, so that drop_tokens=True does drop
    kw.setdefault("min_capacity", 1)
    layer = PADMoE.from_dense(fc1, fc2, nn.GELU(), num_experts=E, ep_size=ep_size, k=k, **kw)
    perturb_experts(layer, 0.3, seed=seed)
    gen = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for unit in layer.pad_units():
            if unit.shared_mask:
                unit.mask.copy_(torch.rand(unit.mask.shape, generator=gen) < ratio)
            if isinstance(unit.phi, nn.Parameter):
                unit.phi.fill_(0.3)
        for owner in layer.deepspeed_moe.experts.deepspeed_experts:
            for lin in (owner.fc1, owner.fc2):
                if lin.mask is not None:
                    lin.mask.copy_(torch.rand(lin.mask.shape, generator=gen) < ratio)
        layer.deepspeed_moe.gate.wg.weight.normal_(0, 1, generator=gen)  # varied routing, some experts crowded
    return layer


def like(layer: PADMoE, **kw) -> PADMoE:
    """A copy of ``layer`` (same weights, masks, phi) built with other constructor arguments."""
    k = layer.deepspeed_moe.gate.k
    other = pad_layer(k, layer.ep_size, **{**_args(layer), **kw})
    other.load_state_dict(layer.state_dict())
    return other


def _args(layer: PADMoE) -> dict:
    gate = layer.deepspeed_moe.gate
    return dict(capacity_factor=gate.capacity_factor, min_capacity=gate.min_capacity, drop_tokens=gate.drop_tokens,
                use_rts=gate.use_rts, top2_2nd_expert_sampling=gate.top2_2nd_expert_sampling,
                mask_scope=layer.mask_scope, lambda_mode=layer.lambda_mode, use_residual=layer.use_residual)


def plain_moe(layer: PADMoE) -> MoE:
    """DeepSpeed's stock MoE with plain FFN experts holding ``layer``'s expert weights and gate."""
    gate = layer.deepspeed_moe.gate
    fc1, fc2 = nn.Linear(H, F_), nn.Linear(F_, H)
    plain = MoE(H, FFNExpert(fc1, fc2, nn.GELU()), num_experts=E, ep_size=layer.ep_size, k=gate.k,
                capacity_factor=gate.capacity_factor, min_capacity=gate.min_capacity, drop_tokens=gate.drop_tokens,
                use_rts=gate.use_rts, top2_2nd_expert_sampling=gate.top2_2nd_expert_sampling)
    with torch.no_grad():
        plain.deepspeed_moe.gate.wg.weight.copy_(gate.wg.weight)
        pairs = zip(layer.deepspeed_moe.experts.deepspeed_experts, plain.deepspeed_moe.experts.deepspeed_experts)
        for src, dst in pairs:
            for name in ("fc1", "fc2"):
                getattr(dst, name).weight.copy_(getattr(src, name).weight)
                getattr(dst, name).bias.copy_(getattr(src, name).bias)
    return plain


def fully_dynamic(layer: PADMoE) -> PADMoE:
    """``layer`` with every mask entry dynamic and lambdas fixed at 1: DeepSpeed's plain MoE exactly."""
    out = like(layer, lambda_mode="none")
    for masks in map(out.masks, out.pad_units()):
        for mask in masks:
            mask.fill_(True)
    return out


def tokens(routing: str, rank: int, ep_size: int, seed: int = 0) -> torch.Tensor:
    """Input [2, 9, H] for a routing case (see :func:`steer`)."""
    gen = torch.Generator().manual_seed(100 * seed + rank)
    x = torch.randn(2, 9, H, generator=gen)
    if routing == "skewed":
        # rank 0's tokens point along u, the others' along v (see steer)
        u, v = torch.eye(H)[0], torch.eye(H)[1]
        x = 0.1 * x + 5 * (u if rank == 0 else v)
    return x


def steer(layer: nn.Module, routing: str) -> None:
    """'skewed': rank 0 sends only to its own experts 0 and 1 (so nothing to the other ranks) and
    nobody sends anything to expert 3; 'random' keeps the seeded random gate."""
    if routing != "skewed":
        return
    u, v = torch.eye(H)[0], torch.eye(H)[1]
    gen = torch.Generator().manual_seed(7)
    w = 0.05 * torch.randn(E, H, generator=gen)
    w[0] += 3 * u
    w[1] += 3 * u
    w[2] -= 3 * u
    w[3] -= 10 * (u + v)
    with torch.no_grad():
        layer.deepspeed_moe.gate.wg.weight.copy_(w)


def run(layer: nn.Module, x: torch.Tensor, seed: int = 1, train: bool = True) -> Dict[str, Optional[torch.Tensor]]:
    """Forward + backward of a fixed random projection of the output plus l_aux; everything compared."""
    layer.train(train)
    layer.zero_grad(set_to_none=True)
    x = x.clone().requires_grad_(True)
    torch.manual_seed(seed)
    y, l_aux, counts = layer(x)
    proj = torch.linspace(-1, 1, y.numel()).view_as(y)
    ((y * proj).sum() + 0.5 * l_aux).backward()
    out = {"y": y.detach(), "l_aux": l_aux.detach(), "exp_counts": counts.detach().float(), "grad x": x.grad}
    for name, p in layer.named_parameters():  # PADMoE names its gate and experts as DeepSpeed's MoE does
        out[f"grad {name}"] = None if p.grad is None else p.grad.clone()
    return out


def differences(got: Dict, want: Dict, only: Optional[List[str]] = None) -> List[str]:
    """What differs beyond the tolerance (empty: equal); keys of ``want`` only, or ``only``."""
    problems = []
    for key in only or want:
        a, b = got.get(key), want.get(key)
        if b is None:
            if a is not None and a.any():
                problems.append(f"{key}: reference has no gradient, got one")
            continue
        if a is None:
            problems.append(f"{key}: missing")
            continue
        try:
            torch.testing.assert_close(a, b, **TOL)
        except AssertionError as err:
            problems.append(f"{key}: {str(err).splitlines()[0]} (max |diff| {float((a - b).abs().max()):.2e})")
    return problems


def dropped_routes(layer: PADMoE, x: torch.Tensor, seed: int = 1) -> int:
    """How many (token, choice) routes the gate drops for ``x`` (to show a case really drops)."""
    layer.train()
    torch.manual_seed(seed)
    with torch.no_grad():
        out = layer.deepspeed_moe.gate(x.reshape(-1, H), None, True, False)
    return int((out[3] < 0).sum())
