"""The local experts on their contiguous row segments (the dispatcher's compute stage).

Input: ``x`` [N, M] with local expert j's rows at ``x[o_j : o_j + n_j]`` (``sizes`` = the
``n_j``, host ints). Output: [N, M], expert j's outputs on the same rows.

- Two-linear FFN experts (:class:`FFNExpert`, the shape PAD-MoE upcycles into) whose linears
  are dense :class:`PADExpertLinear` s: each linear of all local experts is one grouped node
  (:func:`padnet_ds.pad.grouped.grouped_linear`) and the activation runs once on all rows.
- Anything else (user expert modules, other linear kinds): each expert module on its own
  segment, outputs concatenated.
Both compute exactly what DeepSpeed's ``Experts`` computes on the filled rows of its buffer.
"""
from __future__ import annotations

from typing import List, Optional, Sequence

import torch
from torch import Tensor, nn

from ..pad.grouped import grouped_linear
from .expert import FFNExpert, PADExpertLinear


def run_local_experts(experts: Sequence[nn.Module], x: Tensor, sizes: Sequence[int],
                      kernel: Optional[bool] = None) -> Tensor:
    """Expert j on rows ``o_j .. o_j + n_j`` of ``x``; ``kernel`` as in :func:`grouped_linear`."""
    if groupable(experts):
        h = grouped_pad_linear([e.fc1 for e in experts], x, sizes, kernel)
        # The local experts are deep copies of one template (DeepSpeed's Experts) and the
        # activation holds no tensors, so one call serves every expert's rows.
        h = experts[0].act(h)
        return grouped_pad_linear([e.fc2 for e in experts], h, sizes, kernel)
    outs: List[Tensor] = []
    lo = 0
    for expert, n in zip(experts, sizes):
        out = expert(x[lo:lo + n])
        outs.append(out[0] if isinstance(out, tuple) else out)  # DeepSpeed ignores an expert's bias output too
        lo += n
    return torch.cat(outs)


def groupable(experts: Sequence[nn.Module]) -> bool:
    """Whether every local expert is an FFN of dense, bound PAD linears with a tensor-free activation."""
    for e in experts:
        if type(e) is not FFNExpert or any(True for _ in e.act.parameters()) or any(True for _ in e.act.buffers()):
            return False
        for lin in (e.fc1, e.fc2):
            unit = lin.__dict__.get("unit") if type(lin) is PADExpertLinear else None
            if unit is None or lin.weight.shape != unit.weight_shape:
                return False
    return True


def grouped_pad_linear(linears: Sequence[PADExpertLinear], x: Tensor, sizes: Sequence[int],
                       kernel: Optional[bool] = None) -> Tensor:
    """One PAD linear of every local expert (one per expert, same unit) on its row segment."""
    unit = linears[0].__dict__["unit"]
    comps = [unit.composition(lin) for lin in linears]  # the held one when the mask is shared
    return grouped_linear(x, comps, [lin.weight for lin in linears], [lin.bias for lin in linears], sizes, kernel)
