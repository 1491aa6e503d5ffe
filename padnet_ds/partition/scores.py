"""Local (this rank's) partition scores: IMP sensitivities, magnitudes, random draws.

IMP scores come from ordinary backward passes: while scoring is on, each PAD unit's
``score_sink`` receives ``dL/dM`` for one mask once per backward, and :class:`ScoreBook`
adds it into an fp32 buffer. The sink fires inside autograd, before DeepSpeed reduces or
partitions any gradient, so the sums are the same under ZeRO 0, 1 and 2, and they run
over micro-batches and gradient-accumulation boundaries alike. ``engine.backward`` has
already divided the loss by the accumulation steps, so a window's sum is the gradient of
the loss DeepSpeed optimizes on this rank (times the number of optimizer steps).
"""
from __future__ import annotations

from typing import Callable, Dict, List, Optional, Tuple

import torch
from torch import Tensor, nn

from .sites import Site

LossScale = Callable[[], float]


def loss_scale_fn(engine) -> Optional[LossScale]:
    """The current fp16 loss scale of ``engine`` (None when the engine does not scale the loss)."""
    if engine is None or not getattr(engine, "fp16_enabled", lambda: False)():
        return None
    opt = engine.optimizer
    return lambda: float(getattr(opt, "cur_scale", None) or getattr(opt, "loss_scale", 1.0))


class ScoreBook:
    """fp32 sums of ``dL/dM`` per local mask, fed by the units' score sinks."""

    def __init__(self, sites: List[Site], loss_scale: Optional[LossScale] = None) -> None:
        self.sites = sites
        self.loss_scale = loss_scale
        self._where: Dict[int, Tuple[int, int]] = {id(o): (i, j) for i, s in enumerate(sites)
                                                   for j, o in enumerate(s.owners)}
        self.sums: List[List[Optional[Tensor]]] = [[None] * len(s.masks) for s in sites]
        self.calls = 0  # sink calls since the last reset: 0 at a partition step means nothing was scored
        self.skipped = 0  # fp16 overflow contributions dropped (the optimizer skips those steps too)
        # Per site: did any scored pass since the last reset see experts that differ from the static
        # side? If not, the sums hold rounding noise, not information (the symmetry trap).
        self.diverged: List[bool] = [False] * len(sites)
        self.on = False

    def switch(self, on: bool) -> None:
        if on == self.on:
            return
        self.on = on
        sink = self.sink if on else None
        for unit in {id(s.unit): s.unit for s in self.sites}.values():
            unit.score_sink = sink

    def note_weights(self) -> None:
        """Call before the passes to be scored: records which sites' experts differ from the static
        side (checked until true once per window, so it costs one weight pass per window)."""
        for i, site in enumerate(self.sites):
            if not self.diverged[i]:
                self.diverged[i] = deviation(site) > 0.0

    def sink(self, owner: nn.Module, grad: Tensor) -> None:
        i, j = self._where[id(owner)]
        if self.loss_scale is not None:
            if not torch.isfinite(grad).all():
                self.skipped += 1
                return
            grad = grad.float() / self.loss_scale()
        buf = self.sums[i][j]
        if buf is None:
            buf = self.sums[i][j] = torch.zeros(grad.shape, dtype=torch.float32, device=grad.device)
        buf.add_(grad)
        self.calls += 1

    def local(self) -> List[List[Tensor]]:
        """The sums, with zeros for masks that saw no backward pass."""
        return [[b if b is not None else torch.zeros(m.shape, dtype=torch.float32, device=m.device)
                 for b, m in zip(bufs, site.masks)] for bufs, site in zip(self.sums, self.sites)]

    def reset(self) -> None:
        self.sums = [[None] * len(s.masks) for s in self.sites]
        self.calls = 0
        self.skipped = 0
        self.diverged = [False] * len(self.sites)

    def state_dict(self) -> dict:
        return {"sums": [[None if b is None else b.detach().cpu().clone() for b in bufs] for bufs in self.sums],
                "calls": self.calls, "skipped": self.skipped, "diverged": list(self.diverged)}

    def load_state_dict(self, state: dict) -> None:
        self.sums = [[None if b is None else b.to(device=m.device, dtype=torch.float32)
                      for b, m in zip(bufs, site.masks)] for bufs, site in zip(state["sums"], self.sites)]
        self.calls = int(state["calls"])
        self.skipped = int(state.get("skipped", 0))
        self.diverged = [bool(d) for d in state.get("diverged", [True] * len(self.sites))]


@torch.no_grad()
def magnitudes(site: Site) -> List[Tensor]:
    """Per local mask: ``sum_e |lambda_d W_e - lambda_s W_static|`` over the factors this rank holds."""
    lam_d, lam_s = (float(v) for v in site.unit.lambdas())
    static = site.unit.static_weight.float()
    out = []
    for mask, factors in zip(site.masks, site.factors):
        acc = torch.zeros(mask.shape, dtype=torch.float32, device=mask.device)
        for w in factors:
            acc.add_((lam_d * w.float() - lam_s * static).abs())
        out.append(acc)
    return out


def deviation(site: Site) -> float:
    """Largest of this rank's :func:`magnitudes`: exactly 0 while every expert still equals the
    static weight with equal lambdas (the symmetry trap), whatever the rounding of the scores."""
    return max((float(m.max()) for m in magnitudes(site)), default=0.0)


def random_scores(sites: List[Site], gen: torch.Generator) -> List[Tensor]:
    """Global random scores (every expert of every site), identical on every rank drawing from ``gen``."""
    out = []
    for site in sites:
        shape = tuple(site.masks[0].shape)
        full = shape if site.replicated else (site.num_experts, *shape)
        out.append(torch.rand(full, generator=gen).to(site.masks[0].device))
    return out
