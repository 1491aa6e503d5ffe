"""PADMoE.pack(): the packed layer computes what the dense layer computes, and holds less."""
import copy

import pytest
import torch
from torch import nn

from padnet_ds import PADMoE
from padnet_ds.moe.expert import PackedExpertLinear, PADExpertLinear
from padnet_ds.moe.upcycle import perturb_experts
from padnet_ds.pad.compose import LAMBDA_MODES
from padnet_ds.pad.packed import complement_of, gather_at, is_packed, pack_model, positions_of, unpack_model

H, F_, E = 12, 24, 4


def close(got, want):
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)


def partial_layer(seed=0, **kw):
    """An upcycled, perturbed layer with random partial masks and phi moved off 0."""
    torch.manual_seed(seed)
    fc1, fc2 = nn.Linear(H, F_), nn.Linear(F_, H)
    kw.setdefault("drop_tokens", False)
    kw.setdefault("k", 2)
    layer = PADMoE.from_dense(fc1, fc2, nn.GELU(), num_experts=E, **kw)
    perturb_experts(layer, 0.3, seed=seed)
    gen = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for unit in layer.pad_units():
            if isinstance(unit.phi, nn.Parameter):
                unit.phi.fill_(0.3)
            for m in layer.masks(unit):
                m.copy_(torch.rand(m.shape, generator=gen) < 0.5)
        if layer.use_residual:
            for lin in (layer.mlp.fc1, layer.mlp.fc2):
                if lin.mask is not None:
                    lin.mask.copy_(torch.rand(lin.mask.shape, generator=gen) < 0.5)
    return layer


def forward_backward(layer, x, autocast=False):
    x = x.clone().requires_grad_(True)
    torch.manual_seed(7)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        y, l_aux, counts = layer(x)
    (y.float().square().mean() + l_aux.float()).backward()
    return dict(y=y.detach().float(), l_aux=l_aux.detach(), counts=counts, x=x.grad,
                grads={n: p.grad for n, p in layer.named_parameters()})


def positions_for(dense, name):
    """The dynamic positions (int32) of the dense parameter ``name``'s mask."""
    owner = dense.get_submodule(name.rpartition(".")[0])
    if name.startswith("pad."):
        return positions_of(owner.mask)
    mask = owner.mask if owner.mask is not None else dense.pad[name.split(".")[-2]].mask
    return positions_of(mask)


def assert_packed_matches(dense, packed, res_d, res_p):
    close(res_p["y"], res_d["y"])
    close(res_p["l_aux"], res_d["l_aux"])
    assert torch.equal(res_p["counts"], res_d["counts"])
    close(res_p["x"], res_d["x"])
    checked = 0
    for name, gd in res_d["grads"].items():
        owner_name, _, leaf = name.rpartition(".")
        owner = dense.get_submodule(owner_name)
        if leaf == "static_weight" and (owner_name + ".static_values") in res_p["grads"]:
            # shared mask: the static weight is held (and trained) only where the mask is 0
            unit = packed.get_submodule(owner_name)
            pos = complement_of(unit.positions, unit.weight_shape.numel())
            assert not gd.view(-1)[unit.positions.long()].any()
            close(res_p["grads"][owner_name + ".static_values"], gather_at(gd, pos))
        elif isinstance(owner, PADExpertLinear) and leaf == "weight":
            pos = positions_for(dense, name)
            got = res_p["grads"][owner_name + ".values"]
            if gd is None:
                assert got is None
            else:
                full = torch.zeros_like(gd).view(-1).index_copy_(0, pos.long(), gather_at(gd, pos))
                assert torch.equal(full.view_as(gd), gd), f"{name}: gradient outside the mask"
                close(got, gather_at(gd, pos))
        elif gd is None:
            assert res_p["grads"][name] is None
        else:
            close(res_p["grads"][name], gd)
        checked += 1
    assert checked == len(res_p["grads"])


@pytest.mark.parametrize("mode", LAMBDA_MODES)
@pytest.mark.parametrize("scope", ["shared", "expert"])
def test_packed_layer_forward_and_gradients_equal_the_dense_layer(mode, scope):
    dense = partial_layer(lambda_mode=mode, mask_scope=scope)
    packed = copy.deepcopy(dense)
    packed.pack()
    x = torch.randn(3, 10, H)
    assert_packed_matches(dense, packed, forward_backward(dense, x), forward_backward(packed, x))


def test_experts_that_receive_no_tokens_and_the_residual_mlp():
    dense = partial_layer(seed=2, k=1, use_residual=True)
    with torch.no_grad():  # expert 3 never wins the gate
        dense.deepspeed_moe.gate.wg.weight[3].fill_(0.0)
        dense.deepspeed_moe.gate.wg.weight[:3].add_(3.0)
    packed = copy.deepcopy(dense)
    packed.pack()
    x = torch.rand(2, 6, H)
    res_d, res_p = forward_backward(dense, x), forward_backward(packed, x)
    assert int(res_d["counts"][3]) == 0
    assert_packed_matches(dense, packed, res_d, res_p)
    assert isinstance(packed.mlp.fc1, PackedExpertLinear)


@pytest.mark.parametrize("scope", ["shared", "expert"])
def test_bf16_autocast_packed_equals_dense(scope):
    dense = partial_layer(seed=3, mask_scope=scope)
    packed = copy.deepcopy(dense)
    packed.pack()
    x = torch.randn(2, 8, H)
    res_d, res_p = forward_backward(dense, x, autocast=True), forward_backward(packed, x, autocast=True)
    assert_packed_matches(dense, packed, res_d, res_p)


@pytest.mark.parametrize("scope", ["shared", "expert"])
def test_packed_state_placement_and_size(scope):
    packed = partial_layer(mask_scope=scope)
    dense = copy.deepcopy(packed)  # (deepcopy drops DeepSpeed's parameter tags: pack the original)
    packed.pack()
    state = packed.state_dict()
    assert not any(k.endswith((".weight", ".mask")) and "gate" not in k for k in state), "dense factors or masks left"
    for n, p in packed.named_parameters():
        expert = ".deepspeed_experts." in n
        assert (getattr(p, "allreduce", True) is False) == expert, n
        if expert:
            assert p.group_name == dense.expert_group_name
    assert not any("expert" in k for k in state if k.startswith("pad."))
    positions = [k for k in state if k.endswith("positions")]
    assert all(state[k].dtype == torch.int32 for k in positions)
    if scope == "shared":
        assert sorted(positions) == ["pad.fc1.positions", "pad.fc2.positions"]
    else:  # one set per expert, in the expert's own state (and checkpoint file)
        assert len(positions) == 2 * E and all(".deepspeed_experts." in k for k in positions)
    # values: the dynamic entries of every expert; static: where the shared mask is 0
    dyn = sum(int(m.sum()) for u in dense.pad_units() for m in dense.masks(u))
    per_expert = dyn if scope == "expert" else dyn * E
    assert sum(p.numel() for n, p in packed.named_parameters() if n.endswith(".values")) == per_expert
    static = sum(p.numel() for n, p in packed.named_parameters() if n.startswith("pad.") and "static" in n)
    full = sum(u.weight_shape.numel() for u in dense.pad_units())
    assert static == (full - dyn if scope == "shared" else full)
    assert packed.dynamic_ratio() == pytest.approx(dense.dynamic_ratio())
    assert packed.masks(packed.pad["fc1"])[0].dtype == torch.bool


def test_unpack_gives_back_the_dense_layer_and_pack_model_walks_the_model():
    dense = partial_layer(seed=5)
    model = nn.Sequential()
    model.moe = partial_layer(seed=5)
    assert pack_model(model) == ["moe"] and is_packed(model) and model.moe.packed
    assert pack_model(model) == []
    assert unpack_model(model) == ["moe"] and not is_packed(model)
    back = model.moe
    for unit, orig in zip(back.pad_units(), dense.pad_units()):
        assert torch.equal(unit.mask, orig.mask)
        assert torch.equal(unit.static_weight[~unit.mask], orig.static_weight[~orig.mask])
    for eb, ed in zip(back.deepspeed_moe.experts.deepspeed_experts, dense.deepspeed_moe.experts.deepspeed_experts):
        for name in ("fc1", "fc2"):
            mask = dense.pad[name].mask
            assert torch.equal(getattr(eb, name).weight[mask], getattr(ed, name).weight[mask])
            assert getattr(eb, name).weight.allreduce is False
    x = torch.randn(2, 5, H)
    close(forward_backward(back, x)["y"], forward_backward(dense, x)["y"])
    with pytest.raises(ValueError, match="not packed"):
        back.unpack()
    back.pack()
    with pytest.raises(ValueError, match="already packed"):
        back.pack()
    with pytest.raises(ValueError, match="'fc1' is packed: its mask is final"):
        back.pad["fc1"].set_mask(torch.ones(F_, H))


@pytest.mark.parametrize("scope", ["shared", "expert"])
def test_dense_sources_and_storage_sizes_describe_both_layouts(scope):
    from padnet_ds.pad.packed import dense_sources, storage_sizes

    packed = partial_layer(seed=6, mask_scope=scope, use_residual=True)
    dense = copy.deepcopy(packed)
    packed.pack()
    dense_params = dict(dense.named_parameters())
    sources = dense_sources(packed)
    assert sorted(sources) == sorted(n for n, p in packed.named_parameters() if n.endswith("values"))
    for name, p in packed.named_parameters():
        if name in sources:  # where every packed value sits in the dense layout
            src = sources[name]
            assert dense_params[src.name].shape == src.shape
            assert torch.equal(src.take(dense_params[src.name]), p), name
        else:
            assert torch.equal(dense_params[name], p), name
    # both layouts report the same sizes for the tensors they hold differently
    sizes_dense, sizes_packed = storage_sizes(dense), storage_sizes(packed)
    assert sum(v[0] for v in sizes_dense.values()) == sum(v[0] for v in sizes_packed.values())
    assert sum(v[1] for v in sizes_dense.values()) == sum(v[1] for v in sizes_packed.values())
    tensors = dict(packed.state_dict(keep_vars=True))
    assert sum(v[0] for v in sizes_packed.values()) == sum(tensors[k].numel() * tensors[k].element_size()
                                                           for k in sizes_packed)
    dense_tensors = dict(dense.state_dict(keep_vars=True))
    assert sum(v[1] for v in sizes_dense.values()) == sum(dense_tensors[k].numel() * dense_tensors[k].element_size()
                                                          for k in sizes_dense if k in dense_tensors)
    assert all(sizes_dense[k][1] == 0 for k in sizes_dense if k not in dense_tensors)  # packed units' dense shapes
