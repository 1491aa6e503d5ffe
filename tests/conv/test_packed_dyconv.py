"""Packed DY-Conv: the K kernels hold only their dynamic entries; same outputs and gradients."""
import copy

import pytest
import torch

from padnet_ds.conv import PADDynamicConv2d
from padnet_ds.pad.compose import LAMBDA_MODES
from padnet_ds.pad.packed import complement_of, gather_at, pack_model

CFG = dict(in_ch=6, out_ch=4, kernel_size=3, stride=2, padding=1, groups=2, bias=True)


def close(got, want):
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)


def dense_and_packed(mode, seed=0):
    torch.manual_seed(seed)
    dense = PADDynamicConv2d(**CFG, num_kernels=3, temperature=4.0, lambda_mode=mode, reduction=4)
    dense.pad.set_mask(torch.rand(dense.pad.weight_shape) < 0.4)
    with torch.no_grad():
        if isinstance(dense.pad.phi, torch.nn.Parameter):
            dense.pad.phi.fill_(-0.4)
    packed = copy.deepcopy(dense)
    packed.pack()
    return dense, packed


def forward_backward(layer, x, autocast=False):
    x = x.clone().requires_grad_(True)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        out = layer(x)
    r = torch.randn(out.shape, generator=torch.Generator().manual_seed(1))
    (out.float() * r).sum().backward()
    return out.detach().float(), x.grad, {n: p.grad for n, p in layer.named_parameters()}


@pytest.mark.parametrize("mode", LAMBDA_MODES)
def test_packed_dyconv_output_and_gradients_equal_the_dense_layer(mode):
    dense, packed = dense_and_packed(mode)
    pos = packed.pad.positions
    x = torch.randn(5, 6, 9, 9)
    out_d, x_d, g_d = forward_backward(dense, x)
    out_p, x_p, g_p = forward_backward(packed, x)
    close(out_p, out_d)
    close(x_p, x_d)
    assert set(g_p) == (set(g_d) - {"weight", "pad.static_weight"}) | {"values"} | (
        {"pad.static_values"} if "pad.static_weight" in g_d else set())
    close(g_p["values"], gather_at(g_d["weight"], pos, batch_dims=1))
    if "pad.static_weight" in g_d:
        static_pos = complement_of(pos, dense.pad.mask.numel())
        close(g_p["pad.static_values"], gather_at(g_d["pad.static_weight"], static_pos))
    for name in set(g_d) & set(g_p):
        close(g_p[name], g_d[name])
    if mode in ("both", "s", "d"):
        assert g_p["pad.phi"].abs().max() > 0
    assert packed.dynamic_ratio() == pytest.approx(dense.dynamic_ratio())
    assert packed.values.shape == (3, pos.numel())


def test_packed_dyconv_bf16_autocast_matches_dense_to_bf16_precision():
    dense, packed = dense_and_packed("both", seed=2)
    x = torch.randn(4, 6, 9, 9)
    out_d, x_d, g_d = forward_backward(dense, x, autocast=True)
    out_p, x_p, g_p = forward_backward(packed, x, autocast=True)
    # the aggregation GEMM runs over different operands (K x n values vs K x P masked kernels) in bf16
    for got, want in ((out_p, out_d), (x_p, x_d),
                      (g_p["values"], gather_at(g_d["weight"], packed.pad.positions, batch_dims=1))):
        torch.testing.assert_close(got, want, rtol=0.02, atol=0.02 * float(want.abs().max()))


def test_unpack_restores_the_dense_layer_and_pack_model_finds_dyconv():
    dense, _ = dense_and_packed("both", seed=4)
    model = torch.nn.Sequential(copy.deepcopy(dense))
    assert pack_model(model) == ["0"]
    layer = model[0]
    layer.unpack()
    assert torch.equal(layer.pad.mask, dense.pad.mask)
    mask = dense.pad.mask
    assert torch.equal(layer.weight[:, mask], dense.weight[:, mask])
    x = torch.randn(2, 6, 9, 9)
    close(forward_backward(layer, x)[0], forward_backward(dense, x)[0])
    with pytest.raises(ValueError, match="not packed"):
        layer.unpack()


def test_dyconv_dense_sources_and_storage_sizes():
    from padnet_ds.pad.packed import dense_sources, storage_sizes

    dense, packed = dense_and_packed("both", seed=5)
    sources = dense_sources(packed)
    params = dict(dense.named_parameters())
    assert sorted(sources) == ["pad.static_values", "values"]
    for name, src in sources.items():
        assert torch.equal(src.take(params[src.name]), dict(packed.named_parameters())[name])
    assert len(storage_sizes(dense)) == 4  # kernels, static weight, mask, (packed: the dense shape)
    assert sum(v[0] for v in storage_sizes(dense).values()) == sum(v[0] for v in storage_sizes(packed).values())
    tensors = dict(packed.state_dict(keep_vars=True))
    assert sum(v[0] for v in storage_sizes(packed).values()) == sum(tensors[k].numel() * tensors[k].element_size()
                                                                    for k in storage_sizes(packed))
