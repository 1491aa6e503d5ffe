"""Forward+backward of our PAD-MoE layer against a re-implementation of the authors' PadMoE layer.

    python -m bench.authors_layer [--quick] [--shapes h256,h768] [--out bench/results/authors_layer.json]

Single process, one thread, E=8, k=2, all experts local (ep_size 1), the per-rank token count
of ``bench.moe_step``. ``AuthorsPadMoE`` below is written from the paper's description of the
authors' computation (not from their code):

- noisy top-k gating as in Shazeer et al. (2017): ``H = x Wg + N(0,1) * softplus(x Wn)``, keep
  the top k, softmax over them; balance loss ``cv^2(importance) + cv^2(load)`` with the smooth
  load estimate (normal CDF of being in the top k);
- SparseDispatcher-style routing: the tokens of each expert are gathered by index (no capacity,
  no padding, no dropped tokens), the expert runs on exactly its tokens, and the gate-weighted
  outputs are scatter-added back (``index_add``);
- the PAD composition dense and from scratch for every expert in every call:
  ``W = lambda_d * M * W_e + lambda_s * (1 - M) * W_static`` with float masks, plain autograd.

Variants, timed interleaved after warm-up (medians):
  ours       PADMoE as in moe_step (capacity factor 1.25, DeepSpeed TopKGate, drop_tokens)
  ours_cf1   PADMoE with capacity factor 1.0 (the same GEMM rows as the authors' layer on average)
  authors    AuthorsPadMoE
``layer_ratio_vs_authors`` = ours / authors (lower is better).
"""
from __future__ import annotations

import math
from typing import Any, Dict

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from . import common


class AuthorsPadMoE(nn.Module):
    """PAD-MoE computed the way the paper's code does it: dense per-expert composition, index routing."""

    def __init__(self, hidden: int, ffn: int, experts: int = 8, k: int = 2, ratio: float = 0.5, phi: float = 0.3,
                 noise_eps: float = 1e-2, seed: int = 0) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.experts, self.k, self.noise_eps = experts, k, noise_eps

        def uniform(*shape, fan_in):
            bound = 1 / math.sqrt(fan_in)
            return nn.Parameter((torch.rand(*shape, generator=g) * 2 - 1) * bound)

        self.w_gate = nn.Parameter(torch.randn(hidden, experts, generator=g) * 0.02)
        self.w_noise = nn.Parameter(torch.zeros(hidden, experts))
        self.static1, self.static2 = uniform(ffn, hidden, fan_in=hidden), uniform(hidden, ffn, fan_in=ffn)
        self.w1 = nn.Parameter(self.static1.detach() + 0.1 * self.static1.detach().std()
                               * torch.randn(experts, ffn, hidden, generator=g))
        self.w2 = nn.Parameter(self.static2.detach() + 0.1 * self.static2.detach().std()
                               * torch.randn(experts, hidden, ffn, generator=g))
        self.b1, self.b2 = uniform(experts, ffn, fan_in=hidden), uniform(experts, hidden, fan_in=ffn)
        self.register_buffer("mask1", (torch.rand(ffn, hidden, generator=g) < ratio).float())
        self.register_buffer("mask2", (torch.rand(hidden, ffn, generator=g) < ratio).float())
        self.phi1 = nn.Parameter(torch.full((), phi))
        self.phi2 = nn.Parameter(torch.full((), phi))
        self.register_buffer("mean", torch.tensor([0.0]))
        self.register_buffer("std", torch.tensor([1.0]))

    @staticmethod
    def cv_squared(x: Tensor) -> Tensor:
        if x.shape[0] == 1:
            return x.new_zeros(())
        return x.float().var() / (x.float().mean() ** 2 + 1e-10)

    def prob_in_top_k(self, clean: Tensor, noisy: Tensor, noise_std: Tensor, top_values: Tensor) -> Tensor:
        batch = clean.size(0)
        m = top_values.size(1)
        flat = top_values.flatten()
        pos_if_in = torch.arange(batch, device=clean.device) * m + self.k
        threshold_if_in = flat.gather(0, pos_if_in).unsqueeze(1)
        threshold_if_out = flat.gather(0, pos_if_in - 1).unsqueeze(1)
        normal = torch.distributions.Normal(self.mean, self.std)
        is_in = noisy > threshold_if_in
        prob_if_in = normal.cdf((clean - threshold_if_in) / noise_std)
        prob_if_out = normal.cdf((clean - threshold_if_out) / noise_std)
        return torch.where(is_in, prob_if_in, prob_if_out)

    def gating(self, x: Tensor):
        clean = x @ self.w_gate
        if self.training:
            noise_std = F.softplus(x @ self.w_noise) + self.noise_eps
            noisy = clean + torch.randn_like(clean) * noise_std
            logits = noisy
        else:
            logits = clean
        top_logits, top_idx = logits.topk(min(self.k + 1, self.experts), dim=1)
        top_k_gates = F.softmax(top_logits[:, :self.k], dim=1)
        gates = torch.zeros_like(logits).scatter(1, top_idx[:, :self.k], top_k_gates)
        if self.training and self.k < self.experts:
            load = self.prob_in_top_k(clean, noisy, noise_std, top_logits).sum(0)
        else:
            load = (gates > 0).sum(0)
        loss = self.cv_squared(gates.sum(0)) + self.cv_squared(load)
        return gates, loss

    def composed(self, e: int, w: Tensor, static: Tensor, mask: Tensor, phi: Tensor) -> Tensor:
        lam_d = 2 * torch.sigmoid(phi)
        lam_s = 2 - lam_d
        return lam_d * mask * w[e] + lam_s * (1 - mask) * static

    def forward(self, hidden_states: Tensor):
        shape = hidden_states.shape
        x = hidden_states.reshape(-1, shape[-1])
        gates, aux = self.gating(x)
        # SparseDispatcher: (token, expert) pairs with a non-zero gate, sorted by expert.
        nz = torch.nonzero(gates)
        order = nz[:, 1].sort(stable=True).indices
        batch_index = nz[order, 0]
        expert_index = nz[order, 1]
        part_sizes = (gates > 0).sum(0).tolist()
        gate_values = gates[batch_index, expert_index].unsqueeze(1)
        expert_inputs = x[batch_index].split(part_sizes, dim=0)
        outputs = []
        for e in range(self.experts):
            w1 = self.composed(e, self.w1, self.static1, self.mask1, self.phi1)
            w2 = self.composed(e, self.w2, self.static2, self.mask2, self.phi2)
            h = F.gelu(F.linear(expert_inputs[e], w1, self.b1[e]))
            outputs.append(F.linear(h, w2, self.b2[e]))
        stitched = torch.cat(outputs, 0) * gate_values
        y = x.new_zeros(x.shape).index_add(0, batch_index, stitched)
        return y.reshape(shape), aux


def ours(hidden: int, ffn: int, capacity_factor: float, ratio: float = 0.5, phi: float = 0.3):
    from .moe_step import make_models

    return make_models(hidden, ffn, 1, variants=("pad",), ratio=ratio, phi=phi, capacity_factor=capacity_factor)["pad"]


def fwd_bwd(module: nn.Module, x: Tensor):
    def run():
        for p in module.parameters():
            p.grad = None
        x.grad = None
        y, aux = module(x)
        (y.float().pow(2).mean() + 0.01 * aux).backward()

    return run


def main(argv=None) -> Dict[str, Any]:
    common.setup_env()
    ap = common.parser(__doc__, "authors_layer")
    common.add_shape_args(ap)
    args = ap.parse_args(argv)
    common.quiet_deepspeed()
    shapes = common.chosen_shapes(args)
    warm, reps = common.warmup(args, 3, 1), common.reps(args, 15, 3)
    res = {}
    for s in shapes:
        shape = common.SHAPES[s]
        h, f = shape["hidden"], shape["ffn"]
        torch.manual_seed(0)
        x = torch.randn(shape["batch"], shape["seq"], h, requires_grad=True)
        variants = {"ours": fwd_bwd(ours(h, f, 1.25), x), "ours_cf1": fwd_bwd(ours(h, f, 1.0), x),
                    "authors": fwd_bwd(AuthorsPadMoE(h, f), x)}
        samples = common.interleave(variants, warm, reps)
        med = {n: common.median(v) for n, v in samples.items()}
        res[s] = dict(median_s=med, ratio_vs_authors={n: t / med["authors"] for n, t in med.items()},
                      tokens=common.tokens(shape))
        print(f"\n[{s}] PAD-MoE layer fwd+bwd, hidden {h} / FFN {f}, {common.tokens(shape)} tokens, E=8, k=2, "
              f"1 process, {torch.get_num_threads()} thread(s); median of {reps} after {warm} warm-up")
        print(common.table(["variant", "ms", "vs authors"], [[n, t * 1e3, t / med["authors"]] for n, t in med.items()]))
    first = shapes[0]
    result = dict(config=dict(shapes=shapes, warmup=warm, reps=reps, threads=torch.get_num_threads()),
                  shapes={s: dict(common.SHAPES[s], experts=8, k=2, ep_size=1) for s in shapes},
                  machine=common.machine(), quick=args.quick, results=res,
                  layer_ratio_vs_authors=res[first]["ratio_vs_authors"]["ours"],
                  layer_ratio_per_shape={s: r["ratio_vs_authors"]["ours"] for s, r in res.items()},
                  layer_ratio_cf1_per_shape={s: r["ratio_vs_authors"]["ours_cf1"] for s, r in res.items()})
    out = common.write_json(args.out, result)
    print("\n" + ", ".join(f"{s}: ours/authors = {r['ratio_vs_authors']['ours']:.3f}" for s, r in res.items())
          + f"; wrote {out}")
    return result


if __name__ == "__main__":
    main()
