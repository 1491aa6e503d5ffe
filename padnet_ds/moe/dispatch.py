"""Token dispatch on filled rows only: DeepSpeed's routing, without its capacity padding.

DeepSpeed's ``MOELayer`` places the routed tokens in a ``[E, C, M]`` capacity buffer, sends
all of it through the all-to-all and runs every local expert on ``ep_size x C`` rows, the
unfilled ones zeros (capacity factor 1.25 pads at least 20% of the rows even under perfect
balance; ``drop_tokens=False`` pads every expert to the largest count in the group). Those
rows' outputs are never read and their gradients are zero, so leaving them out changes
nothing but the work. :class:`FilledMOELayer` sends and computes the filled rows only.

Notation (one rank of an expert-parallel group of P ranks):

    x [S, M]     this rank's tokens;  E experts, L = E / P local ones, global expert e = p * L + j
    route (i, t) token t's i-th choice (i < k): expert e[i, t] (-1 where the capacity dropped it),
                 slot l[i, t] in that expert's capacity buffer, gate weight g[i, t]
    f[e]         routes this rank keeps for e; their slots are 0 .. f[e] - 1 (every TopKGate policy
                 fills an expert's buffer from slot 0), so o[e] + l[i, t] with o[e] = f[0] + ... + f[e-1]
                 numbers the kept routes 0 .. R - 1 grouped by expert, in DeepSpeed's slot order
    c[q, j]      routes rank q sends to local expert j of this rank;  n_j = sum_q c[q, j],  N = sum_j n_j

Forward, stage by stage:

    route      DeepSpeed's TopKGate, unchanged: l_aux, exp_counts, capacity and dropping
    permute    send[o[e] + l] = x[t] for each kept route                       [R, M], grouped by destination rank
    counts     all-to-all of f over the EP group -> c                          [P, L]
    exchange   all-to-all of the rows, split sizes sum_j f[p*L + j] out and sum_j c[q, j] in   [N, M], by (q, j)
    regroup    (source q, local j) -> (local j, source q): expert j's n_j rows contiguous     [N, M]
    compute    expert j on its rows (moe/segments.py: FFN experts grouped over local experts)
    return     regroup back, all-to-all back with the split sizes swapped       [R, M]
    combine    y[t] = sum over t's kept routes i of g[i, t] * out[o[e[i, t]] + l[i, t]]      [S, M]

Backward is each stage's adjoint (autograd): the all-to-alls run in reverse, the permutations
gather with their inverses, the combine's index_add becomes a gather. Outputs and every
gradient are those of DeepSpeed's padded computation (tests/moe, tests/distributed).

Dropless (``dropless=True``): the gate runs with ``drop_tokens=False`` and without its
expert-parallel group, so it skips the all-reduce that pads every expert to the group's
largest count (the capacity is not used here); routing, ``l_aux`` and ``exp_counts`` are
unchanged and the output equals DeepSpeed's ``drop_tokens=False`` output.
"""
from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator, List, Optional, Tuple

import torch
from deepspeed.moe.sharded_moe import MOELayer
from deepspeed.utils import groups
from deepspeed.utils.bwc import bwc_tensor_model_parallel_world_size
from torch import Tensor

from .segments import run_local_experts

DISPATCHES = ("filled", "padded")


class FilledMOELayer(MOELayer):
    """DeepSpeed's ``MOELayer`` (same gate, experts, group, timers) with the filled-row dispatch.

    ``dispatch="padded"`` runs DeepSpeed's own forward (the reference); so do Tutel and
    tensor-parallel experts, whose dispatch works on the capacity buffer (dropless raises there).
    """

    def __init__(self, layer: MOELayer, dispatch: str = "filled", dropless: bool = False) -> None:
        super().__init__(layer.gate, layer.experts, layer.ep_group_name, layer.ep_size, layer.num_local_experts,
                         use_tutel=layer.use_tutel)
        self.dispatch = dispatch
        self.dropless = dropless
        self.kernel: Optional[bool] = None  # grouped GEMM kernel: None = by device (pad/grouped.py)
        self.last_rows: Optional[int] = None  # routes this rank sent in the latest forward (R)
        # the gate's capacity C then (DeepSpeed's buffer has E x C rows; dropless: this rank's largest count)
        self.last_capacity: Optional[Tensor] = None

    def forward(self, *inputs: Tensor, **kwargs) -> Tensor:
        tensor_parallel = bwc_tensor_model_parallel_world_size(groups.mpu) > 1
        if self.dropless and (self.use_tutel or tensor_parallel):
            raise ValueError("PADMoE(dropless=True) does not support Tutel or tensor-parallel experts (their dispatch "
                             "works on the capacity buffer): set use_tutel=False and no tensor parallelism, or "
                             "dropless=False")
        if self.dispatch == "padded" or self.use_tutel or tensor_parallel:
            return super().forward(*inputs, **kwargs)
        if self.ep_size > 1 and self.ep_group is None:
            raise RuntimeError(f"this MoE layer has ep_size={self.ep_size} but no expert-parallel group yet: build the "
                               "model through deepspeed.initialize (or call layer.set_deepspeed_parallelism())")
        with self._timer("moe"):
            return self._forward(inputs[0], inputs[1] if len(inputs) > 1 else None)

    def _forward(self, x: Tensor, used_token: Optional[Tensor]) -> Tensor:
        d_model = x.shape[-1]
        tokens = x.reshape(-1, d_model)  # [..., M] -> [S, M]
        with self._gate_group():
            self.l_aux, capacity, n_experts, indices, locations, gates, self.exp_counts = self.gate(
                tokens, used_token, True, False)
        route_of_row, f = permute(indices, locations, n_experts)
        plan = Exchange(f, self.ep_size, self.num_local_experts, self.ep_group)
        route_of_row = route_of_row[:plan.sent]
        token_of_row = torch.remainder(route_of_row, tokens.shape[0])  # a route's flat index is i * S + t
        self.last_rows, self.last_capacity = plan.sent, capacity  # for fill fractions (bench.moe_step)
        rows = tokens.index_select(0, token_of_row)  # [R, M]
        with self._timer("1st_a2a"):
            rows = _all_to_all(rows, plan.recv_splits, plan.send_splits, self.ep_group)  # [N, M] by (q, j)
        rows = plan.regroup(rows)  # [N, M] by (j, q)
        out = run_local_experts(self.experts.deepspeed_experts, rows, plan.sizes, self.kernel)
        out = plan.regroup_back(out)  # [N, M] by (q, j)
        with self._timer("2nd_a2a"):
            out = _all_to_all(out, plan.send_splits, plan.recv_splits, self.ep_group)  # [R, M]
        row_gates = gates.reshape(-1).index_select(0, route_of_row)  # [k, S] -> [k*S] -> [R]
        # The gates are fp32 (TopKGate): weight and sum in fp32, as DeepSpeed's combine does.
        weighted = out * row_gates.unsqueeze(1)  # [R, M]
        combined = weighted.new_zeros(tokens.shape).index_add(0, token_of_row, weighted)  # [S, M]
        return combined.to(out.dtype).reshape(x.shape)  # [S, M] -> [..., M]

    @contextmanager
    def _gate_group(self) -> Iterator[None]:
        # Dropless: the gate's drop_tokens=False capacity is an all-reduce MAX over the EP group that
        # nothing here reads; without the group it stays local (pg_utils.is_parallel(None) is False).
        if not self.dropless:
            yield
            return
        group, self.gate.ep_group = self.gate.ep_group, None
        try:
            yield
        finally:
            self.gate.ep_group = group

    @contextmanager
    def _timer(self, name: str) -> Iterator[None]:
        # DeepSpeed's wall_clock_breakdown reads these three times off every MOELayer.
        if not self.wall_clock_breakdown:
            yield
            return
        self.timers(name).start()
        try:
            yield
        finally:
            self.timers(name).stop()
            attr = {"moe": "time_moe", "1st_a2a": "time_falltoall", "2nd_a2a": "time_salltoall"}[name]
            setattr(self, attr, self.timers(name).elapsed(reset=False))


def permute(indices: Tensor, locations: Tensor, n_experts: int) -> Tuple[Tensor, Tensor]:
    """(the route of every send row, kept routes per global expert ``f`` [E]), without a host sync.

    The first tensor has k*S + 1 entries; only the first R = sum(f) are meaningful (the rest is
    scratch, the last one where every dropped route lands), so cut it once R is on the host.
    """
    n_routes = indices.numel()
    expert = indices.reshape(-1).long()  # [k, S] -> [k*S], route i*S + t
    kept = expert >= 0
    # f[e] by counting expert + 1, so that dropped routes (-1) fall in bin 0
    f = torch.zeros(n_experts + 1, dtype=torch.long, device=expert.device)
    f = f.index_add_(0, expert + 1, torch.ones_like(expert))[1:]
    start = torch.cumsum(f, 0) - f  # o[e]
    row = torch.where(kept, start[expert.clamp(min=0)] + locations.reshape(-1).long(), n_routes)
    route_of_row = torch.empty(n_routes + 1, dtype=torch.long, device=expert.device)
    route_of_row.scatter_(0, row, torch.arange(n_routes, device=expert.device))
    return route_of_row, f


class Exchange:
    """Split sizes and regrouping of one forward, from the kept counts ``f`` of every rank.

    ``counts``: one all-to-all of ``f`` [E] = [P, L] gives ``c`` [P, L] (``c[q, j]`` = f[p*L + j] on
    rank q, p this rank), then one host copy of both (the all-to-all of the rows needs its split
    sizes on the host, as every dropless dispatcher does).
    """

    def __init__(self, f: Tensor, ep_size: int, n_local: int, group) -> None:
        if ep_size > 1:
            c = torch.empty_like(f)
            torch.distributed.all_to_all_single(c, f, group=group)
        else:
            c = f
        host = torch.cat([f, c]).tolist()
        f_host, c_host = host[:f.numel()], host[f.numel():]

        def per_rank(counts: List[int]) -> List[int]:
            return [sum(counts[q * n_local:(q + 1) * n_local]) for q in range(ep_size)]

        self.send_splits = per_rank(f_host)  # rows to each EP rank
        self.recv_splits = per_rank(c_host)  # rows from each EP rank
        self.sizes = [sum(c_host[q * n_local + j] for q in range(ep_size)) for j in range(n_local)]  # n_j
        self.sent, self.received = sum(self.send_splits), sum(self.recv_splits)
        self._order = None
        if ep_size > 1 and n_local > 1:
            self._order = _block_transpose(c.view(ep_size, n_local), self.received)  # [E] -> [P, L]

    def regroup(self, rows: Tensor) -> Tensor:
        """(source q, local j) -> (local j, source q) row order."""
        return rows if self._order is None else _Permute.apply(rows, *self._order)

    def regroup_back(self, rows: Tensor) -> Tensor:
        return rows if self._order is None else _Permute.apply(rows, *reversed(self._order))


def _block_transpose(c: Tensor, total: int) -> Tuple[Tensor, Tensor]:
    """Row orders of a [P, L] grid of row blocks (block (q, j) has c[q, j] rows): (q, j)-major -> (j, q)-major.

    Returns (order, inverse): ``rows_jq = rows_qj[order]`` and ``rows_qj = rows_jq[inverse]``.
    """
    def starts(lengths: Tensor) -> Tensor:
        return torch.cumsum(lengths, 0) - lengths

    qj_len = c.reshape(-1)  # [P, L] -> [P*L], blocks in (q, j) order
    jq_len = c.t().reshape(-1)  # [L, P] -> [L*P], blocks in (j, q) order
    qj_start = starts(qj_len).view_as(c)  # [P*L] -> [P, L]: where block (q, j) starts in (q, j) order
    jq_start = starts(jq_len).view(c.shape[1], c.shape[0]).t()  # [L*P] -> [L, P] -> [P, L]: ... in (j, q) order
    rows = torch.arange(total, device=c.device)
    shift = (qj_start - jq_start)  # [P, L]: row i of a block moves by its block's shift
    order = rows + torch.repeat_interleave(shift.t().reshape(-1), jq_len, output_size=total)  # [L, P] -> [L*P]
    inverse = rows - torch.repeat_interleave(shift.reshape(-1), qj_len, output_size=total)  # [P, L] -> [P*L]
    return order, inverse


class _Permute(torch.autograd.Function):
    """``x[order]`` for a permutation ``order``; the gradient gathers with its inverse (no index_add)."""

    @staticmethod
    def forward(ctx, x: Tensor, order: Tensor, inverse: Tensor) -> Tensor:
        ctx.save_for_backward(inverse)
        return x.index_select(0, order)

    @staticmethod
    def backward(ctx, grad: Tensor):
        (inverse,) = ctx.saved_tensors
        return grad.index_select(0, inverse), None, None


def _all_to_all(rows: Tensor, out_splits: List[int], in_splits: List[int], group) -> Tensor:
    """All-to-all of rows with split sizes over ``group``: [sum(in_splits), M] -> [sum(out_splits), M]."""
    if group is None or torch.distributed.get_world_size(group) == 1:
        return rows
    return _AllToAll.apply(rows, out_splits, in_splits, group)


class _AllToAll(torch.autograd.Function):
    """Rows with split sizes; the gradient travels back with the split sizes swapped.

    (torch.distributed.nn.functional.all_to_all_single does this too, but is deprecated in
    favour of a private module; DeepSpeed's own _AllToAll has no split sizes.)
    """

    @staticmethod
    def forward(ctx, rows: Tensor, out_splits: List[int], in_splits: List[int], group) -> Tensor:
        ctx.splits, ctx.group = (in_splits, out_splits), group
        out = rows.new_empty((sum(out_splits), *rows.shape[1:]))
        torch.distributed.all_to_all_single(out, rows.contiguous(), out_splits, in_splits, group=group)
        return out

    @staticmethod
    def backward(ctx, grad: Tensor):
        back_out, back_in = ctx.splits
        return _AllToAll.apply(grad, back_out, back_in, ctx.group), None, None, None
