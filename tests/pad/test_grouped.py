"""The grouped PAD linear over row segments against the per-expert ``Composition.linear``."""
import pytest
import torch

from padnet_ds.pad.compose import LAMBDA_MODES, PADUnit
from padnet_ds.pad.grouped import grouped_linear
from tests.pad.test_compose import Owner

OUT, IN = 12, 8  # the grouped kernel wants rows of whole 16-byte units
SIZES = [3, 0, 4, 2]  # local expert 1 gets no rows


def setup(mode, per_expert, with_bias, seed=0):
    torch.manual_seed(seed)
    unit = PADUnit(torch.randn(OUT, IN), lambda_mode=mode, shared_mask=not per_expert, name="fc")
    with torch.no_grad():
        if isinstance(unit.phi, torch.nn.Parameter):
            unit.phi.fill_(0.3)
    n = len(SIZES)
    if per_expert:
        owners = [Owner(torch.rand(OUT, IN) > 0.4) for _ in range(n)]
    else:
        unit.mask.copy_(torch.rand(OUT, IN) > 0.4)
        owners = [unit] * n
    weights = [torch.randn(OUT, IN, requires_grad=True) for _ in range(n)]
    biases = [torch.randn(OUT, requires_grad=True) if with_bias else None for _ in range(n)]
    x = torch.randn(sum(SIZES), IN)
    return unit, owners, weights, biases, x


def run(unit, owners, weights, biases, x, grouped, kernel=False, scoring=False):
    params = [unit.static_weight, unit.phi, *weights, *(b for b in biases if b is not None)]
    for p in params:
        p.grad = None
    x = x.clone().requires_grad_(True)
    seen = []
    unit.score_sink = (lambda owner, g: seen.append((id(owner), g.clone()))) if scoring else None
    unit.hold()
    if grouped:
        y = grouped_linear(x, [unit.composition(o) for o in owners], weights, biases, SIZES, kernel=kernel)
    else:
        bounds = torch.tensor([0] + SIZES).cumsum(0).tolist()
        y = torch.cat([unit.composition(o).linear(x[lo:hi], w, b)
                       for o, w, b, lo, hi in zip(owners, weights, biases, bounds[:-1], bounds[1:])])
    unit.release()
    (y * torch.linspace(-1, 1, y.numel()).view_as(y)).sum().backward()
    grads = [None if p.grad is None else p.grad.clone() for p in params]
    return y.detach(), x.grad, grads, sorted(seen, key=lambda s: s[0])


@pytest.mark.parametrize("mode", LAMBDA_MODES)
@pytest.mark.parametrize("per_expert", [False, True])
@pytest.mark.parametrize("kernel", [False, True])
def test_grouped_linear_equals_the_per_expert_linears_forward_backward_and_scores(mode, per_expert, kernel):
    unit, owners, weights, biases, x = setup(mode, per_expert, with_bias=True)
    got = run(unit, owners, weights, biases, x, grouped=True, kernel=kernel, scoring=True)
    want = run(unit, owners, weights, biases, x, grouped=False, scoring=True)
    torch.testing.assert_close(got[0], want[0], rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(got[1], want[1], rtol=1e-6, atol=1e-6)
    for g, w in zip(got[2], want[2]):
        assert (g is None) == (w is None)
        if w is not None:
            torch.testing.assert_close(g, w, rtol=1e-6, atol=1e-6)
    assert [o for o, _ in got[3]] == [o for o, _ in want[3]] and got[3], "dL/dM reaches each mask's sink"
    for (_, g), (_, w) in zip(got[3], want[3]):
        torch.testing.assert_close(g, w, rtol=1e-6, atol=1e-6)
    # the expert without rows gets exact zeros, as on DeepSpeed's all-padding buffer
    assert not weights[1].grad.any() and not biases[1].grad.any()


def test_without_bias_and_without_any_rows():
    unit, owners, weights, biases, x = setup("both", False, with_bias=False)
    got = run(unit, owners, weights, biases, x, grouped=True)
    want = run(unit, owners, weights, biases, x, grouped=False)
    for g, w in zip(got[2], want[2]):
        torch.testing.assert_close(g, w, rtol=1e-6, atol=1e-6)
    for p in [unit.static_weight, *weights]:
        p.grad = None
    unit.hold()
    empty = torch.zeros(0, IN, requires_grad=True)
    y = grouped_linear(empty, [unit.composition()] * 4, weights, biases, [0, 0, 0, 0])
    unit.release()
    y.sum().backward()
    # zeros, not None: what DeepSpeed's buffer of padding rows gives, and what ZeRO expects of every expert
    assert y.shape == (0, OUT) and empty.grad.shape == (0, IN)
    assert all(p.grad is not None and not p.grad.any() for p in [unit.static_weight, *weights])


def test_autocast_runs_the_gemms_in_bf16_and_returns_fp32_gradients():
    unit, owners, weights, biases, x = setup("both", False, with_bias=True)
    x = x.clone().requires_grad_(True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        unit.hold()
        y = grouped_linear(x, [unit.composition()] * 4, weights, biases, SIZES)
        unit.release()
    assert y.dtype == torch.bfloat16
    y.float().pow(2).sum().backward()
    assert x.grad.dtype == weights[0].grad.dtype == unit.static_weight.grad.dtype == torch.float32
    ref = run(unit, owners, weights, biases, x.detach(), grouped=False)
    torch.testing.assert_close(y.float(), ref[0], rtol=0.05, atol=0.05)


def test_mismatched_sizes_are_refused_with_the_counts_named():
    unit, owners, weights, biases, x = setup("both", False, with_bias=True)
    with pytest.raises(ValueError, match="add up to 8 rows, x has 9"):
        grouped_linear(x, [unit.composition()] * 4, weights, biases, [3, 1, 2, 2])
