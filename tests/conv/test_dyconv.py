import math
from typing import Optional

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from padnet_ds.conv import (PADDynamicConv2d, conv_param_counts, set_temperature, temperature_at,
                            total_param_counts)


# Hand-written references: one sample at a time, nothing shared with the layer's code.
def attention(x: Tensor, fc1: nn.Linear, fc2: nn.Linear, tau: float) -> Tensor:
    return torch.softmax(fc2(torch.relu(fc1(x.mean(dim=(2, 3))))) / tau, dim=1)


def per_sample_conv(x: Tensor, pi: Tensor, kernels: Tensor, bias: Optional[Tensor], compose, stride=1, padding=0,
                    dilation=1, groups=1) -> Tensor:
    """Loop over samples: ``compose(W~(x_b))`` is the kernel sample ``b`` is convolved with."""
    outs = []
    for b in range(x.shape[0]):
        agg = sum(pi[b, k] * kernels[k] for k in range(kernels.shape[0]))
        bb = None if bias is None else sum(pi[b, k] * bias[k] for k in range(bias.shape[0]))
        outs.append(F.conv2d(x[b:b + 1], compose(agg), bb, stride, padding, dilation, groups))
    return torch.cat(outs)


CONFIGS = [
    dict(in_ch=6, out_ch=8, kernel_size=3, stride=1, padding=1, groups=1, bias=False),
    dict(in_ch=6, out_ch=4, kernel_size=3, stride=2, padding=0, dilation=2, groups=2, bias=True),
    dict(in_ch=32, out_ch=16, kernel_size=1, stride=1, padding=0, groups=1, bias=True),
]


def make(cfg, lambda_mode="both", num_kernels=3, seed=0, temperature=4.0):
    torch.manual_seed(seed)
    layer = PADDynamicConv2d(**cfg, num_kernels=num_kernels, temperature=temperature, lambda_mode=lambda_mode,
                             reduction=4).double()
    x = torch.randn(5, cfg["in_ch"], 9, 9, dtype=torch.float64, requires_grad=True)
    return layer, x


def conv_args(layer):
    return dict(stride=layer.stride, padding=layer.padding, dilation=layer.dilation, groups=layer.groups)


def reference(layer, x, mask, compose_fn):
    pi = attention(x, layer.attention.fc1, layer.attention.fc2, layer.temperature)
    return per_sample_conv(x, pi, layer.weight, layer.bias, compose_fn, **conv_args(layer))


def grads(tensors):
    return [None if t.grad is None else t.grad.clone() for t in tensors]


def run(fn, tensors, seed=1):
    for t in tensors:
        t.grad = None
    out = fn()
    r = torch.randn(out.shape, generator=torch.Generator().manual_seed(seed), dtype=out.dtype)
    (out * r).sum().backward()
    return out.detach(), grads(tensors)


def assert_close_all(got, want):
    for g, w in zip(got, want):
        if w is None:
            assert g is None or torch.count_nonzero(g) == 0
        else:
            torch.testing.assert_close(g, w, rtol=1e-9, atol=1e-10)


def random_mask(layer, p=0.4, seed=3):
    g = torch.Generator().manual_seed(seed)
    mask = torch.rand(layer.pad.weight_shape, generator=g) < p
    layer.pad.set_mask(mask)
    return mask.double()


@pytest.mark.parametrize("cfg", CONFIGS)
def test_all_ones_none_is_plain_dyconv(cfg):
    layer, x = make(cfg, "none")
    assert bool(layer.pad.mask.all())
    params = [x, layer.weight, layer.attention.fc1.weight, layer.attention.fc1.bias, layer.attention.fc2.weight,
              layer.attention.fc2.bias] + ([layer.bias] if layer.bias is not None else [])
    got_out, got = run(lambda: layer(x), params)
    want_out, want = run(lambda: reference(layer, x, None, lambda w: w), params)
    torch.testing.assert_close(got_out, want_out, rtol=1e-10, atol=1e-12)
    assert_close_all(got, want)
    assert all(g is not None and g.abs().sum() > 0 for g in got[1:])  # the check is not vacuous


@pytest.mark.parametrize("cfg", CONFIGS[:2])
def test_all_zeros_is_static_conv(cfg):
    cfg = dict(cfg, bias=False)
    layer, x = make(cfg, "none")
    layer.pad.set_mask(torch.zeros(layer.pad.weight_shape, dtype=torch.bool))
    out, (g_kernels, g_static) = run(lambda: layer(x), [layer.weight, layer.pad.static_weight])
    want = F.conv2d(x, layer.pad.static_weight, None, **conv_args(layer))
    torch.testing.assert_close(out, want, rtol=1e-10, atol=1e-12)
    assert torch.count_nonzero(g_kernels) == 0 and g_static.abs().sum() > 0


@pytest.mark.parametrize("mode", ["both", "s", "d", "prune"])
@pytest.mark.parametrize("cfg", CONFIGS)
def test_batched_equals_per_sample_loop(cfg, mode):
    layer, x = make(cfg, mode)
    with torch.no_grad():
        layer.pad.phi.fill_(0.6)
    m = random_mask(layer)
    params = [p for p in (x, *layer.parameters()) if p.requires_grad]

    def compose(agg):
        lam_d, lam_s = layer.pad.lambdas()
        return lam_d * m * agg + lam_s * (1 - m) * layer.pad.static_weight

    got_out, got = run(lambda: layer(x), params)
    want_out, want = run(lambda: reference(layer, x, m, compose), params)
    torch.testing.assert_close(got_out, want_out, rtol=1e-10, atol=1e-12)
    assert_close_all(got, want)
    if mode == "both":
        assert layer.pad.phi.grad is not None and layer.pad.phi.grad.abs() > 0


def test_attention_sums_to_one_and_sharpens():
    layer, x = make(CONFIGS[0], num_kernels=4)
    entropies, peaks = [], []
    for tau in (30.0, 10.0, 3.0, 1.0):
        set_temperature(layer, tau)
        pi = layer.kernel_attention(x).detach()
        torch.testing.assert_close(pi.sum(1), torch.ones(x.shape[0], dtype=pi.dtype))
        entropies.append(float(-(pi * pi.log()).sum(1).mean()))
        peaks.append(float(pi.max(1).values.mean()))
    assert entropies[0] > math.log(4) - 0.05  # tau=30: nearly uniform, as DY-Conv starts
    assert all(a > b for a, b in zip(entropies, entropies[1:]))
    assert all(a < b for a, b in zip(peaks, peaks[1:]))


@pytest.mark.parametrize("cfg", CONFIGS[:2])
def test_score_sink_sees_mask_gradient(cfg):
    layer, x = make(cfg, "both")
    with torch.no_grad():
        layer.pad.phi.fill_(-0.8)
    m = random_mask(layer, seed=7)
    collected = []
    layer.pad.score_sink = lambda owner, g: collected.append((owner, g.clone()))
    run(lambda: layer(x), [])
    layer.pad.score_sink = None

    leaf = m.clone().requires_grad_(True)
    phi = layer.pad.phi.detach()
    lam_d = 2 * torch.sigmoid(phi)
    lam_s = 2 - lam_d
    ws = layer.pad.static_weight.detach()
    with torch.no_grad():
        pi = attention(x, layer.attention.fc1, layer.attention.fc2, layer.temperature)
    out = per_sample_conv(x.detach(), pi, layer.weight.detach(), None if layer.bias is None else layer.bias.detach(),
                          lambda agg: lam_d * leaf * agg + lam_s * (1 - leaf) * ws, **conv_args(layer))
    r = torch.randn(out.shape, generator=torch.Generator().manual_seed(1), dtype=out.dtype)
    (want,) = torch.autograd.grad((out * r).sum(), leaf)

    assert len(collected) == 1
    owner, got = collected[0]
    assert owner is layer.pad
    assert want.abs().sum() > 0
    torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-10)


@pytest.mark.parametrize("mode", ["both", "none"])
def test_from_conv_reproduces_conv(mode):
    torch.manual_seed(0)
    conv = nn.Conv2d(6, 8, 3, stride=2, padding=1, bias=True).double()
    layer = PADDynamicConv2d.from_conv(conv, num_kernels=4, lambda_mode=mode)
    random_mask(layer)  # every kernel equals W_static, so any mask gives the conv back
    x = torch.randn(3, 6, 10, 10, dtype=torch.float64)
    torch.testing.assert_close(layer(x), conv(x), rtol=1e-10, atol=1e-12)
    assert layer.weight.dtype == torch.float64 and layer.bias.shape == (4, 8)


def test_param_counts_k4_r03():
    layer = PADDynamicConv2d(4, 10, 3, num_kernels=4)
    p = 10 * 4 * 9
    mask = torch.zeros(p, dtype=torch.bool)
    mask[torch.randperm(p)[: int(0.3 * p)]] = True
    layer.pad.set_mask(mask.view(layer.pad.weight_shape))
    c = conv_param_counts(layer)
    assert c["fully_dynamic"] == 4 * p and c["mask_entries"] == p
    assert c["dynamic_ratio"] == pytest.approx(0.3)
    assert c["pad"] == pytest.approx(1.9 * p)
    assert c["pad"] / c["fully_dynamic"] == pytest.approx(0.475)
    assert c["pad_dense_static"] == pytest.approx(2.2 * p)
    model = nn.Sequential(layer, PADDynamicConv2d(10, 10, 1, num_kernels=4))  # second layer fully dynamic
    t = total_param_counts(model)
    assert t["layers"] == 2 and t["fully_dynamic"] == 4 * (p + 100)
    assert t["pad"] == pytest.approx(1.9 * p + 400)
    assert t["dynamic_ratio"] == pytest.approx((0.3 * p + 100) / (p + 100))


def test_temperature_schedule():
    assert temperature_at(0) == 30.0
    assert temperature_at(5) == pytest.approx(15.5)
    assert temperature_at(2.5, anneal_epochs=5) == pytest.approx(15.5)
    assert temperature_at(10) == 1.0 and temperature_at(25) == 1.0
    assert temperature_at(3, anneal_epochs=0) == 1.0
    model = nn.Sequential(PADDynamicConv2d(4, 4, 3), nn.ReLU(), PADDynamicConv2d(4, 4, 3))
    assert set_temperature(model, 7.0) == 2
    assert all(m.temperature == 7.0 for m in model if isinstance(m, PADDynamicConv2d))
    with pytest.raises(ValueError):
        set_temperature(model, 0.0)


def test_layer_accessors():
    layer = PADDynamicConv2d(4, 4, 3, name="blk")
    assert layer.pad_units() == [layer.pad] and layer.pad.name == "blk"
    assert layer.dynamic_ratio() == 1.0
    with pytest.raises(ValueError):
        PADDynamicConv2d(4, 6, 3, groups=4)
