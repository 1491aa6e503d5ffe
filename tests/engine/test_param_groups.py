import pytest
from torch import nn

from padnet_ds import PADMoE
from padnet_ds.engine.setup import param_groups


def is_expert_param(p):
    return getattr(p, "allreduce", True) is False  # DeepSpeed's mark on expert parameters


class Net(nn.Module):

    def __init__(self):
        super().__init__()
        self.norm = nn.LayerNorm(8)
        self.moe = PADMoE.from_dense(nn.Linear(8, 16), nn.Linear(16, 8), nn.GELU(), num_experts=4, k=2)


def _split(groups):
    """{(expert?, weight_decay): set of parameter ids}."""
    out = {}
    for g in groups:
        for p in g["params"]:
            out.setdefault((is_expert_param(p), g["weight_decay"]), set()).add(id(p))
    return out


def test_no_weight_decay_puts_every_replicated_parameter_in_one_group():
    # ZeRO pays per parameter group and step; phi and the static weights must not open a second one.
    net = Net()
    groups = param_groups(net, weight_decay=0.0)
    replicated = [g for g in groups if not any(is_expert_param(p) for p in g["params"])]
    assert len(replicated) == 1
    ids = {id(p) for p in replicated[0]["params"]}
    unit = next(iter(net.moe.pad_units()))
    assert {id(unit.static_weight), id(unit.phi), id(net.norm.weight), id(net.norm.bias)} <= ids
    assert all(g["weight_decay"] == 0.0 for g in groups)
    assert sum(len(g["params"]) for g in groups) == sum(1 for p in net.parameters() if p.requires_grad)


@pytest.mark.parametrize("wd", [0.01, 0.1])
def test_weight_decay_spares_phi_biases_and_norms(wd):
    net = Net()
    split = _split(param_groups(net, weight_decay=wd))
    unit = next(iter(net.moe.pad_units()))
    assert id(unit.static_weight) in split[(False, wd)]
    assert {id(unit.phi), id(net.norm.weight), id(net.norm.bias)} <= split[(False, 0.0)]
    expert_w = [p for n, p in net.named_parameters() if is_expert_param(p) and n.endswith("weight")]
    expert_b = [p for n, p in net.named_parameters() if is_expert_param(p) and n.endswith("bias")]
    assert {id(p) for p in expert_w} <= split[(True, wd)] and {id(p) for p in expert_b} <= split[(True, 0.0)]
