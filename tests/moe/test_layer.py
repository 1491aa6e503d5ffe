import copy

import pytest
import torch
from deepspeed.moe.layer import MoE
from torch import nn

from padnet_ds import PADMoE
from padnet_ds.moe.expert import FFNExpert
from padnet_ds.moe.upcycle import perturb_experts

H, F_, E = 12, 24, 4


def dense(seed=0):
    torch.manual_seed(seed)
    return nn.Linear(H, F_), nn.Linear(F_, H)


def upcycled(k=2, **kw):
    fc1, fc2 = dense()
    kw.setdefault("drop_tokens", False)
    return fc1, fc2, PADMoE.from_dense(fc1, fc2, nn.GELU(), num_experts=E, k=k, **kw)


def dense_out(fc1, fc2, x):
    return fc2(nn.functional.gelu(fc1(x)))


@pytest.mark.parametrize("k", [1, 2])
def test_upcycled_layer_reproduces_the_dense_ffn(k):
    fc1, fc2, layer = upcycled(k=k)
    x = torch.randn(3, 10, H)
    for train in (True, False):
        layer.train(train)
        torch.manual_seed(5)
        y, l_aux, counts = layer(x)
        if k == 2:  # top-2 gates are renormalised to sum to 1; top-1 scales by its gate value
            torch.testing.assert_close(y, dense_out(fc1, fc2, x), atol=1e-5, rtol=1e-5)
        assert int(counts.sum()) == 30 * k
        assert l_aux.ndim == 0


def test_perturbed_experts_with_all_zero_masks_reproduce_the_static_ffn():
    fc1, fc2, layer = upcycled()
    perturb_experts(layer, 0.5, seed=3)
    x = torch.randn(2, 9, H)
    y_dyn, _, _ = layer(x)
    assert (y_dyn - dense_out(fc1, fc2, x)).abs().max() > 1e-3, "perturbation must change the experts"
    for unit in layer.pad_units():
        unit.mask.zero_()  # in place: must take effect at the next forward, no stale composition
    for train in (True, False):
        layer.train(train)
        y, _, _ = layer(x)
        torch.testing.assert_close(y, dense_out(fc1, fc2, x), atol=1e-5, rtol=1e-5)
    assert layer.dynamic_ratio() == 0.0


def copy_into_plain_moe(layer: PADMoE) -> MoE:
    fc1, fc2 = dense()
    plain = MoE(H, FFNExpert(fc1, fc2, nn.GELU()), num_experts=E, k=2, drop_tokens=False)
    with torch.no_grad():
        plain.deepspeed_moe.gate.wg.weight.copy_(layer.deepspeed_moe.gate.wg.weight)
        for src, dst in zip(layer.deepspeed_moe.experts.deepspeed_experts,
                            plain.deepspeed_moe.experts.deepspeed_experts):
            for name in ("fc1", "fc2"):
                getattr(dst, name).weight.copy_(getattr(src, name).weight)
                getattr(dst, name).bias.copy_(getattr(src, name).bias)
    return plain


def test_all_ones_mask_in_mode_none_is_deepspeeds_plain_moe_forward_and_gradients():
    fc1, fc2 = dense()
    layer = PADMoE.from_dense(fc1, fc2, nn.GELU(), num_experts=E, k=2, drop_tokens=False, lambda_mode="none")
    perturb_experts(layer, 0.3, seed=1)
    plain = copy_into_plain_moe(layer)
    x = torch.randn(4, 8, H)
    torch.manual_seed(11)
    y1, a1, c1 = layer(x)
    torch.manual_seed(11)
    y2, a2, c2 = plain(x)
    torch.testing.assert_close(y1, y2)
    torch.testing.assert_close(a1, a2)
    assert torch.equal(c1, c2)
    (y1.square().mean() + a1).backward()
    (y2.square().mean() + a2).backward()
    torch.testing.assert_close(layer.deepspeed_moe.gate.wg.weight.grad, plain.deepspeed_moe.gate.wg.weight.grad)
    for src, dst in zip(layer.deepspeed_moe.experts.deepspeed_experts, plain.deepspeed_moe.experts.deepspeed_experts):
        for name in ("fc1", "fc2"):
            torch.testing.assert_close(getattr(src, name).weight.grad, getattr(dst, name).weight.grad)
            torch.testing.assert_close(getattr(src, name).bias.grad, getattr(dst, name).bias.grad)
    for unit in layer.pad_units():  # fully dynamic: the static weights take no part
        assert unit.static_weight.grad is None or not unit.static_weight.grad.any()


def test_parameter_placement_and_names():
    _, _, layer = upcycled()
    expert_params = {n for n, p in layer.named_parameters() if getattr(p, "allreduce", True) is False}
    assert expert_params == {n for n, _ in layer.named_parameters() if ".deepspeed_experts." in n}
    replicated = [n for n, _ in layer.named_parameters() if n.startswith("pad.")]
    assert sorted(replicated) == ["pad.fc1.phi", "pad.fc1.static_weight", "pad.fc2.phi", "pad.fc2.static_weight"]
    assert not any("expert" in n for n in replicated + [n for n, _ in layer.named_buffers()])
    assert [u.mask.dtype for u in layer.pad_units()] == [torch.bool, torch.bool]
    assert isinstance(layer, MoE)


def test_per_expert_masks_govern_each_expert_separately():
    fc1, fc2, layer = upcycled(mask_scope="expert")
    perturb_experts(layer, 0.5, seed=2)
    experts = layer.deepspeed_moe.experts.deepspeed_experts
    for e in experts:
        e.fc1.mask.zero_()
        e.fc2.mask.zero_()
    x = torch.randn(2, 7, H)
    y, _, _ = layer(x)
    torch.testing.assert_close(y, dense_out(fc1, fc2, x), atol=1e-5, rtol=1e-5)
    experts[0].fc1.set_mask(torch.ones(F_, H))
    assert layer.dynamic_ratio() == pytest.approx(1 / (2 * E))
    assert any(".deepspeed_experts.0.fc1.mask" in n for n, _ in layer.named_buffers())


def test_residual_moe_is_a_pad_expert_too():
    fc1, fc2, layer = upcycled(use_residual=True)
    x = torch.randn(2, 5, H)
    y, _, _ = layer(x)
    # residual MLP and experts are all copies of the dense FFN: the coefficient mix is the identity
    torch.testing.assert_close(y, dense_out(fc1, fc2, x), atol=1e-5, rtol=1e-5)
    assert layer.mlp in layer.expert_modules()


def test_deepcopy_keeps_experts_bound_to_their_own_units():
    _, _, layer = upcycled()
    clone = copy.deepcopy(layer)
    assert clone.deepspeed_moe.experts.deepspeed_experts[0].fc1.unit is clone.pad["fc1"]
    clone.pad["fc1"].mask.zero_()
    assert layer.pad["fc1"].mask.all()


@pytest.mark.parametrize("kwargs, match", [
    (dict(num_experts=4, k=5), "k=5 must be between 1 and num_experts=4"),
    (dict(num_experts=6, ep_size=4), "num_experts=6 is not divisible by ep_size=4"),
    (dict(num_experts=4, lambda_mode="dynamic"), "lambda_mode='dynamic'"),
    (dict(num_experts=4, mask_scope="layer"), "mask_scope='layer'"),
    (dict(num_experts=4, noisy_gate_policy="Gumbel"), "noisy_gate_policy='Gumbel'"),
])
def test_bad_arguments_name_the_setting(kwargs, match):
    fc1, fc2 = dense()
    with pytest.raises(ValueError, match=match):
        PADMoE.from_dense(fc1, fc2, nn.GELU(), **kwargs)


def test_expert_without_linear_and_wrong_mask_shape_are_rejected():
    with pytest.raises(ValueError, match="contains no nn.Linear"):
        PADMoE(H, nn.GELU(), num_experts=2)
    _, _, layer = upcycled()
    with pytest.raises(ValueError, match="fc1 has shape"):
        layer.pad["fc1"].set_mask(torch.ones(H, F_))


def test_eval_is_deterministic_although_training_samples_the_second_expert():
    fc1, fc2 = dense()
    layer = PADMoE.from_dense(fc1, fc2, nn.GELU(), num_experts=E, k=2, top2_2nd_expert_sampling=True)
    perturb_experts(layer, 0.5, seed=4)
    with torch.no_grad():
        layer.deepspeed_moe.gate.wg.weight.mul_(0.01)  # near-uniform gate: sampling flips the 2nd expert often
    x = torch.randn(4, 16, H)
    layer.eval()
    torch.testing.assert_close(layer(x)[0], layer(x)[0], rtol=0, atol=0)
    layer.train()
    outs = [layer(x)[2] for _ in range(5)]
    assert any(not torch.equal(outs[0], o) for o in outs[1:]), "training should still sample the 2nd expert"
    assert layer.deepspeed_moe.gate.top2_2nd_expert_sampling
