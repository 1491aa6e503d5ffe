"""The filled-row dispatch (one rank) against DeepSpeed's padded computation; 2 ranks: tests/distributed."""
import pytest
import torch
from torch import nn

from padnet_ds import PADMoE
from padnet_ds.models.encoder import MoEConfig
from padnet_ds.pad.compose import LAMBDA_MODES
from tests.moe.cases import H, differences, dropped_routes, fully_dynamic, like, pad_layer, plain_moe, run, steer, \
    tokens


def compare(layer, reference, x, train=True):
    problems = differences(run(layer, x, train=train), run(reference, x, train=train))
    assert not problems, "\n".join(problems)


@pytest.mark.parametrize("routing", ["random", "skewed"])
@pytest.mark.parametrize("drop_tokens", [True, False])
@pytest.mark.parametrize("k", [1, 2])
def test_filled_dispatch_equals_deepspeeds_padded_dispatch(k, drop_tokens, routing):
    layer = pad_layer(k, drop_tokens=drop_tokens)
    steer(layer, routing)
    x = tokens(routing, 0, 1)
    if drop_tokens and routing == "random":
        assert dropped_routes(layer, x) > 0, "the capacity must drop something for this case to mean anything"
    padded = like(layer, dispatch="padded")
    compare(layer, padded, x)
    if routing == "skewed":  # expert 3 receives nothing: zero gradients, as on an all-padding buffer
        got = run(layer, x)
        assert float(got["exp_counts"][3]) == 0
        empty = [v for n, v in got.items() if ".deepspeed_experts.3." in n]
        assert empty and all(v is not None and not v.any() for v in empty)


@pytest.mark.parametrize("drop_tokens", [True, False])
def test_top3_gating(drop_tokens):
    layer = pad_layer(3, drop_tokens=drop_tokens)  # TopKGate's general top-k policy
    compare(layer, like(layer, dispatch="padded"), tokens("random", 0, 1))


def test_unused_tokens_of_top1_gating():
    # (drop_tokens=True only: DeepSpeed 0.19.8's top-1 gate fails on used_token with drop_tokens=False,
    # its capacity becomes a float tensor that torch.topk refuses)
    layer = pad_layer(1)
    padded = like(layer, dispatch="padded")
    x = tokens("random", 0, 1)
    used = (torch.arange(18) % 3 != 0).float()  # top-1 routes only the used tokens
    outs = []
    for net in (layer, padded):
        torch.manual_seed(1)
        x_in = x.clone().requires_grad_(True)
        y, _, _ = net(x_in, used)
        y.pow(2).sum().backward()
        outs.append((y.detach(), x_in.grad))
    for got, want in zip(*outs):
        torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)
    assert not outs[0][0].reshape(18, -1)[::3].any(), "unused tokens get no expert output"


@pytest.mark.parametrize("k", [1, 2])
@pytest.mark.parametrize("drop_tokens", [True, False])
def test_fully_dynamic_pad_moe_equals_stock_deepspeed_moe(k, drop_tokens):
    layer = fully_dynamic(pad_layer(k, drop_tokens=drop_tokens))
    compare(layer, plain_moe(layer), tokens("random", 0, 1))


@pytest.mark.parametrize("k", [1, 2])
def test_dropless_equals_deepspeeds_no_drop_output(k):
    layer = pad_layer(k, dropless=True)
    assert not layer.deepspeed_moe.gate.drop_tokens
    x = tokens("random", 0, 1)
    compare(layer, like(layer, drop_tokens=False, dispatch="padded"), x)
    dyn = fully_dynamic(layer)
    compare(dyn, plain_moe(like(dyn, drop_tokens=False, dropless=False)), x)


@pytest.mark.parametrize("mode", LAMBDA_MODES)
@pytest.mark.parametrize("mask_scope", ["shared", "expert"])
def test_every_lambda_mode_and_mask_scope(mode, mask_scope):
    layer = pad_layer(2, lambda_mode=mode, mask_scope=mask_scope)
    compare(layer, like(layer, dispatch="padded"), tokens("random", 0, 1))


def test_residual_moe_eval_mode_and_the_grouped_kernel():
    layer = pad_layer(2, use_residual=True)
    padded = like(layer, dispatch="padded")
    x = tokens("random", 0, 1)
    compare(layer, padded, x)
    compare(layer, padded, x, train=False)  # eval capacity factor, no second-expert sampling
    layer.deepspeed_moe.kernel = True  # torch's grouped GEMM, also on CPU
    compare(layer, padded, x)


def test_imp_scores_equal_the_padded_dispatch():
    layer = pad_layer(2)
    padded = like(layer, dispatch="padded")
    x = tokens("random", 0, 1)
    scores = []
    for net in (layer, padded):
        seen = {}
        for unit in net.pad_units():
            unit.score_sink = lambda owner, g, name=unit.name: seen.__setitem__(name, g.clone())
        run(net, x)
        scores.append(seen)
    assert sorted(scores[0]) == ["fc1", "fc2"]
    for name in scores[1]:
        torch.testing.assert_close(scores[0][name], scores[1][name], rtol=1e-6, atol=1e-6)


def test_generic_expert_modules_run_on_their_filled_rows_only():
    torch.manual_seed(0)
    expert = nn.Sequential(nn.Linear(H, 24), nn.Tanh(), nn.Linear(24, H))
    kw = dict(num_experts=4, k=2, capacity_factor=2.0, min_capacity=1)
    layer = PADMoE(H, expert, **kw)
    padded = PADMoE(H, expert, dispatch="padded", **kw)
    padded.load_state_dict(layer.state_dict())
    x = tokens("random", 0, 1)
    rows = []
    hooks = [e.register_forward_hook(lambda m, inp, out: rows.append(inp[0].shape[0]))
             for e in layer.deepspeed_moe.experts.deepspeed_experts]
    compare(layer, padded, x)
    for h in hooks:
        h.remove()
    moe = layer.deepspeed_moe
    assert sum(rows[-4:]) == moe.last_rows == 2 * x.shape[0] * x.shape[1], "every routed row, once, no padding"
    assert moe.last_rows < 4 * int(moe.last_capacity), "DeepSpeed's buffer would have had padding rows"


def test_dispatch_settings_are_checked_and_reach_the_config():
    fc1, fc2 = nn.Linear(H, 8), nn.Linear(8, H)
    with pytest.raises(ValueError, match="dispatch='capacity'"):
        PADMoE.from_dense(fc1, fc2, nn.GELU(), num_experts=2, dispatch="capacity")
    with pytest.raises(ValueError, match="dropless=True needs dispatch='filled'"):
        PADMoE.from_dense(fc1, fc2, nn.GELU(), num_experts=2, dropless=True, dispatch="padded")
    layer = PADMoE.from_dense(fc1, fc2, nn.GELU(), **dict(MoEConfig(num_experts=2, dropless=True).moe_kwargs()))
    assert layer.dropless and not layer.deepspeed_moe.gate.drop_tokens
    assert "dispatch='filled', dropless=True" in repr(layer)
