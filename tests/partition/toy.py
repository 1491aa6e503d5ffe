"""Two PAD-MoE layers, one with a shared mask and one with per-expert masks, for partition tests."""
from __future__ import annotations

import torch
from torch import nn

from padnet_ds import PADMoE
from padnet_ds.moe.upcycle import global_expert_ids, perturb_experts

IN, H, F_, E = 8, 12, 24, 4


class PToy(nn.Module):

    def __init__(self, ep_size: int = 1, seed: int = 0, perturb: float = 0.3, scopes=("shared", "expert"),
                 phi: float = 0.0):
        super().__init__()
        torch.manual_seed(seed)
        self.inp = nn.Linear(IN, H)
        self.moes = nn.ModuleList()
        for i, scope in enumerate(scopes):
            fc1, fc2 = nn.Linear(H, F_), nn.Linear(F_, H)
            layer = PADMoE.from_dense(fc1, fc2, nn.GELU(), num_experts=E, ep_size=ep_size, k=2,
                                      drop_tokens=False, top2_2nd_expert_sampling=False, mask_scope=scope)
            perturb_experts(layer, perturb, seed=seed + i)
            with torch.no_grad():
                for unit in layer.pad_units():
                    unit.phi.fill_(phi)
            self.moes.append(layer)
        self.out = nn.Linear(H, 1)

    def forward(self, x):
        h = self.inp(x)
        aux = 0.0
        for layer in self.moes:
            y, a, _ = layer(h)
            h, aux = h + y, aux + a
        return self.out(h).squeeze(-1), aux


def data(steps: int, rows: int, seed: int):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(steps, rows, 5, IN, generator=g)
    y = 0.8 * x[..., 0] - 0.5 * x[..., 1] + 0.3 * torch.tanh(x[..., 2] * x[..., 3])
    return x, y


def ds_config(stage: int, micro: int, accum: int = 1) -> dict:
    return {"train_micro_batch_size_per_gpu": micro, "gradient_accumulation_steps": accum,
            "zero_optimization": {"stage": stage}, "gradient_clipping": 0.0, "steps_per_print": 10**9,
            "zero_allow_untested_optimizer": True}


def masks_by_expert(model: PToy) -> dict:
    """{mask key: bool tensor}; per-expert masks keyed by global expert id, so ranks can be merged."""
    out = {}
    for li, layer in enumerate(model.moes):
        for unit in layer.pad_units():
            if unit.shared_mask:
                out[f"{li}.{unit.name}"] = unit.mask.clone()
            else:
                for gid, lin in zip(global_expert_ids(layer), layer.local_expert_linears(unit)):
                    out[f"{li}.{unit.name}.e{gid}"] = lin.mask.clone()
    return out


def params(model: nn.Module) -> dict:
    return {n: p.detach().clone() for n, p in model.named_parameters()}
