"""A tiny PAD-MoE regression model and its data, shared by the multi-rank tests."""
from __future__ import annotations

import torch
from torch import nn

from padnet_ds import PADMoE
from padnet_ds.moe.upcycle import global_expert_ids, perturb_experts

IN, H, F_, E = 8, 16, 32, 4


class Toy(nn.Module):

    def __init__(self, ep_size: int = 1, k: int = 2, seed: int = 0, perturb: float = 0.3, dynamic: float = 1.0,
                 **moe_kwargs):
        super().__init__()
        torch.manual_seed(seed)
        self.inp = nn.Linear(IN, H)
        fc1, fc2 = nn.Linear(H, F_), nn.Linear(F_, H)
        moe_kwargs.setdefault("drop_tokens", False)
        moe_kwargs.setdefault("top2_2nd_expert_sampling", False)
        self.moe = PADMoE.from_dense(fc1, fc2, nn.GELU(), num_experts=E, ep_size=ep_size, k=k, **moe_kwargs)
        self.out = nn.Linear(H, 1)
        perturb_experts(self.moe, perturb, seed=seed)
        gen = torch.Generator().manual_seed(seed + 1)
        with torch.no_grad():  # a seeded partial mask, identical on every rank
            for unit in self.moe.pad_units():
                unit.mask.copy_(torch.rand(unit.mask.shape, generator=gen) < dynamic)

    def forward(self, x):
        y, aux, counts = self.moe(self.inp(x))
        return self.out(y).squeeze(-1), aux


def batches(steps: int, rows: int, seed: int = 123):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(steps, rows, 6, IN, generator=g)
    y = 0.8 * x[..., 0] - 0.5 * x[..., 1] + 0.3 * torch.tanh(x[..., 2] * x[..., 3])
    return x, y


def train_steps(engine, xs, ys) -> list:
    """One optimizer step per (x, y) batch on the Toy's MSE + 0.01 l_aux; the losses."""
    out = []
    for xb, yb in zip(xs, ys):
        pred, aux = engine(xb.to(engine.module.inp.weight.dtype))
        loss = torch.nn.functional.mse_loss(pred.float(), yb) + 0.01 * aux.float()
        engine.backward(loss)
        engine.step()
        out.append(loss.item())
    return out


def ds_config(stage: int, micro: int, accum: int = 1, bf16: bool = False, clip: float = 0.0) -> dict:
    return {
        "train_micro_batch_size_per_gpu": micro,
        "gradient_accumulation_steps": accum,
        "zero_optimization": {"stage": stage},
        "bf16": {"enabled": bf16},
        "gradient_clipping": clip,
        "steps_per_print": 10**9,
        "zero_allow_untested_optimizer": True,
    }


def expert_state(model: Toy) -> dict:
    """{global expert id: {name: tensor}} for the experts this rank holds."""
    out = {}
    for gid, expert in zip(global_expert_ids(model.moe), model.moe.deepspeed_moe.experts.deepspeed_experts):
        out[gid] = {n: p.detach().float().clone() for n, p in expert.named_parameters()}
    return out


def replicated_state(model: Toy) -> dict:
    return {n: t.detach().float().clone() for n, t in list(model.named_parameters()) + list(model.named_buffers())
            if ".deepspeed_experts." not in n}
