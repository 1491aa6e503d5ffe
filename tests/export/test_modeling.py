"""The exported model's parts against padnet-ds and DeepSpeed themselves, in one process (no engine)."""
import numpy as np
import pytest
import torch
from deepspeed.moe.sharded_moe import TopKGate
from torch import nn

from padnet_ds import PADMoE
from padnet_ds.export.modeling_padnet import PADMoE as ExportedMoE
from padnet_ds.export.modeling_padnet import lambda_pair, route, unpack_bits
from padnet_ds.export.tensors import linear_paths, moe_linear, pack_bits
from padnet_ds.export.text import linear_tensors
from padnet_ds.moe.upcycle import perturb_experts
from padnet_ds.pad.compose import LAMBDA_MODES
from padnet_ds.pad.compose import lambda_pair as training_lambda_pair

H, F_, E = 16, 40, 4


@pytest.mark.parametrize("k", [1, 2, 3])
@pytest.mark.parametrize("ties", [False, True])
def test_route_picks_deepspeeds_eval_experts_and_weights_bit_for_bit(k, ties):
    torch.manual_seed(k)
    gate = TopKGate(H, E, k=k, eval_capacity_factor=float(E), min_capacity=0, top2_2nd_expert_sampling=False)
    if ties:  # two experts with the same gate row: every token ties between them
        with torch.no_grad():
            gate.wg.weight[2] = gate.wg.weight[1]
    gate.eval()
    x = torch.randn(50, H)
    _, _, _, indices, _, weights, _ = gate(x, None, True)  # sparse routes: [k, S] expert ids and gate weights
    experts, ours = route(torch.nn.functional.linear(x.float(), gate.wg.weight.float()), k)
    assert torch.equal(experts.t().to(indices.dtype), indices)
    assert torch.equal(ours.t(), weights)


@pytest.mark.parametrize("mode", LAMBDA_MODES)
def test_the_exported_lambda_pair_is_the_training_one(mode):
    phi = torch.tensor([0.37])
    for ours, theirs in zip(lambda_pair(mode, phi), training_lambda_pair(mode, phi.view(()))):
        assert torch.equal(ours, theirs)


@pytest.mark.parametrize("numel", [1, 8, 13, 1000])
def test_unpack_bits_inverts_numpy_packbits(numel):
    masks = torch.rand(3, numel, generator=torch.Generator().manual_seed(numel)) < 0.4
    bits = pack_bits(masks)
    assert bits.dtype == torch.uint8 and bits.shape == (3, (numel + 7) // 8)
    assert torch.equal(bits, torch.from_numpy(np.packbits(masks.numpy(), axis=-1)))
    assert torch.equal(unpack_bits(bits, numel), masks)


class Holder(nn.Module):
    """A PADMoE at the path ``moe``, as a checkpoint names it."""

    def __init__(self, scope, k, share=0.45):
        super().__init__()
        torch.manual_seed(0)
        fc1, fc2 = nn.Linear(H, F_), nn.Linear(F_, H)
        self.moe = PADMoE.from_dense(fc1, fc2, nn.GELU(), num_experts=E, k=k, drop_tokens=False,
                                     top2_2nd_expert_sampling=False, mask_scope=scope)
        perturb_experts(self.moe, 0.3, seed=1)
        gen = torch.Generator().manual_seed(2)
        with torch.no_grad():
            for i, unit in enumerate(self.moe.pad_units()):
                unit.phi.fill_(0.4 - 0.9 * i)  # lambdas away from 1, different per linear
                if unit.shared_mask:
                    unit.set_mask(torch.rand(unit.weight_shape, generator=gen) < share)
                else:
                    for lin in self.moe.local_expert_linears(unit):
                        lin.set_mask(torch.rand(unit.weight_shape, generator=gen) < share)


def exported_block(holder: Holder, k: int, compose: str) -> ExportedMoE:
    """The export's MoE block made from ``holder``'s state dict, as export does from a checkpoint."""
    state = holder.state_dict()
    prefix = "moe.deepspeed_moe.experts.deepspeed_experts."
    experts = [{k[len(f"{prefix}{e}."):]: t for k, t in state.items() if k.startswith(f"{prefix}{e}.")}
               for e in range(E)]
    replicated = {k: t for k, t in state.items() if not k.startswith(prefix)}
    specs, tensors = {}, {}
    for path in linear_paths(experts[0]):
        weight, bias = moe_linear(replicated, "moe", path, experts, path)
        specs[path] = dict(weight.spec("both"), bias=True)
        tensors.update({f"{path}.{n.rpartition(path + '.')[2]}": t for n, t in
                        linear_tensors(path, weight, bias).items()})
    scope = holder.moe.mask_scope
    block = ExportedMoE(H, specs, dict(num_experts=E, k=k, mask_scope=scope, lambda_mode="both"), nn.GELU(), compose)
    tensors["gate.weight"] = state["moe.deepspeed_moe.gate.wg.weight"]
    block.load_state_dict(tensors, strict=True)
    return block.eval()


@pytest.mark.parametrize("scope", ["shared", "expert"])
@pytest.mark.parametrize("packed", [False, True], ids=["dense", "packed"])
@pytest.mark.parametrize("k", [1, 2])
def test_exported_moe_block_computes_the_padmoe_layer_in_eval(scope, packed, k):
    holder = Holder(scope, k)
    if packed:
        holder.moe.pack()
    holder.eval()
    x = torch.randn(3, 11, H)
    with torch.no_grad():
        want, _, _ = holder.moe(x)
        for compose in ("load", "forward"):
            got = exported_block(holder, k, compose)(x)
            torch.testing.assert_close(got, want, rtol=0, atol=2e-6)


@pytest.mark.parametrize("packed", [False, True], ids=["dense", "packed"])
def test_a_fully_dynamic_moe_exports_without_mask_or_static_values(packed):
    holder = Holder("shared", 2, share=1.1)  # every mask entry 1: a plain MoE of upcycled experts
    if packed:
        holder.moe.pack()
    holder.eval()
    block = exported_block(holder, 2, "load")
    names = {name for name, _ in block.named_parameters()} | {name for name, _ in block.named_buffers()}
    assert not any("mask_bits" in n or "static_values" in n for n in names), names
    assert all(len(block.fc1.values[e]) == H * F_ for e in range(E))
    x = torch.randn(3, 11, H)
    with torch.no_grad():
        torch.testing.assert_close(block(x), holder.moe(x)[0], rtol=0, atol=2e-6)


def test_stored_values_that_do_not_fit_the_mask_are_an_error():
    block = exported_block(Holder("shared", 2).eval(), 2, "load")
    with torch.no_grad():
        block.fc1.values[1] = nn.Parameter(block.fc1.values[1][:-1].clone(), requires_grad=False)
    block.fc1.forget()
    with pytest.raises(ValueError, match="values.1 holds .* values but its mask has .* dynamic entries"):
        block(torch.randn(2, 3, H))
