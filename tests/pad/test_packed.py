"""Packed PAD composition (pad.packed) against the dense composition under the same masks."""
import gc
import weakref

import pytest
import torch

from padnet_ds.pad.compose import LAMBDA_MODES, PADUnit
from padnet_ds.pad.packed import (check_packed, complement_of, effective_weight, gather_at, mask_of, pack_unit,
                                  positions_of, scatter_at, unpack_unit)

OUT, IN, EXPERTS = 6, 5, 3


def close(got, want):
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)


class Owner(torch.nn.Module):
    """Stands in for an expert linear: a dense mask (dense unit) or positions (packed unit)."""

    def __init__(self, mask=None, positions=None):
        super().__init__()
        self.mask, self.positions = mask, positions


def setup(mode, per_expert, seed=0, dense_static=False):
    """A dense unit with random masks, its packed twin and the experts' dense weights."""
    torch.manual_seed(seed)
    dense = PADUnit(torch.randn(OUT, IN), lambda_mode=mode, shared_mask=not per_expert, name="fc")
    with torch.no_grad():
        dense.phi.fill_(0.3)
    if per_expert:
        masks = [torch.rand(OUT, IN) > 0.4 for _ in range(EXPERTS)]
        owners = [Owner(mask=m) for m in masks]
    else:
        dense.mask.copy_(torch.rand(OUT, IN) > 0.4)
        masks, owners = [dense.mask] * EXPERTS, [dense] * EXPERTS
    packed = pack_unit(dense, dense_static)
    positions = [positions_of(m) for m in masks]
    packed_owners = [Owner(positions=p) for p in positions] if per_expert else [packed] * EXPERTS
    weights = [torch.randn(OUT, IN) for _ in range(EXPERTS)]
    return dense, owners, packed, packed_owners, positions, weights


def run(unit, owners, factors, biases, xs, called):
    """Forward the called experts, backward a fixed loss; returns outputs and input grads."""
    unit.hold()
    ys = [unit.composition(owners[e]).linear(xs[e], factors[e], biases[e]) for e in called]
    unit.release()
    sum((y ** 2).sum() for y in ys).backward()
    return ys


@pytest.mark.parametrize("mode", LAMBDA_MODES)
@pytest.mark.parametrize("layout", ["shared", "expert", "shared_dense_static"])
def test_packed_forward_and_every_gradient_equal_the_dense_composition(mode, layout):
    per_expert = layout == "expert"
    dense, owners, packed, packed_owners, positions, weights = setup(mode, per_expert,
                                                                     dense_static=layout == "shared_dense_static")
    rows = [4, 0, 3]  # expert 1 receives no tokens
    called = [0, 1] if per_expert else [0, 1, 2]  # per-expert: expert 2 is not called at all
    xs = [torch.randn(r, 2, IN) for r in rows]
    results = []
    for unit, own, factors in ((dense, owners, weights),
                               (packed, packed_owners, [gather_at(w, p) for w, p in zip(weights, positions)])):
        fs = [f.clone().requires_grad_(True) for f in factors]
        bs = [torch.randn(OUT, generator=torch.Generator().manual_seed(e)).requires_grad_(True)
              for e in range(EXPERTS)]
        x = [t.clone().requires_grad_(True) for t in xs]
        ys = run(unit, own, fs, bs, x, called)
        results.append(dict(ys=ys, fs=fs, bs=bs, x=x, unit=unit))
    d, p = results
    for yd, yp in zip(d["ys"], p["ys"]):
        close(yp, yd)
    for e in called:
        close(p["x"][e].grad, d["x"][e].grad)
        close(p["bs"][e].grad, d["bs"][e].grad)
        # dL/dW_e is zero outside the mask, so the packed gradient holds all of it
        assert not d["fs"][e].grad[~mask_of(positions[e], (OUT, IN))].any()
        close(p["fs"][e].grad, gather_at(d["fs"][e].grad, positions[e]))
    assert all(p["fs"][e].grad is None for e in range(EXPERTS) if e not in called)
    if dense.static_weight.requires_grad:
        if not packed.static_packed:
            close(packed.static_weight.grad, dense.static_weight.grad)
        else:
            static_pos = complement_of(packed.positions, OUT * IN)
            assert not dense.static_weight.grad.view(-1)[packed.positions.long()].any()
            close(scatter_at(packed.static_values.grad, static_pos, (OUT, IN)), dense.static_weight.grad)
    else:
        assert mode == "prune" and not packed.static_tensor().requires_grad
    if isinstance(dense.phi, torch.nn.Parameter):
        assert dense.phi.grad.abs().max() > 0
        close(packed.phi.grad, dense.phi.grad)


def test_autocast_bf16_packed_equals_dense():
    dense, owners, packed, packed_owners, positions, weights = setup("both", False, seed=3)
    grads = []
    packed_factor = gather_at(weights[0], positions[0])
    for unit, own, factor in ((dense, owners, weights[0]), (packed, packed_owners, packed_factor)):
        f = factor.clone().requires_grad_(True)
        x = torch.randn(8, IN, generator=torch.Generator().manual_seed(1)).requires_grad_(True)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            unit.hold()
            y = unit.composition(own[0]).linear(x, f, None)
            unit.release()
        assert y.dtype == torch.bfloat16
        y.float().pow(2).sum().backward()
        grads.append((y.float(), x.grad, f.grad, unit.static_tensor().grad, unit.phi.grad))
    (yd, xd, fd, sd, phid), (yp, xp, fp, sp, phip) = grads
    assert fp.dtype == xp.dtype == sp.dtype == torch.float32
    close(yp, yd)
    close(xp, xd)
    close(fp, gather_at(fd, positions[0]))
    close(sp, gather_at(sd, complement_of(packed.positions, OUT * IN)))
    close(phip, phid)


def test_no_grad_forward_equals_training_forward_and_effective_weight():
    dense, owners, packed, _, positions, weights = setup("both", False, seed=4)
    v = gather_at(weights[0], positions[0]).requires_grad_(True)
    x = torch.randn(3, IN)
    y_train = packed.composition().linear(x, v, None)
    with torch.no_grad():
        y_eval = packed.composition().linear(x, v, None)
        w_dense = dense.composition().compose(weights[0]).clone()
    assert y_train.requires_grad and not y_eval.requires_grad
    close(y_eval, y_train.detach())
    close(effective_weight(packed, v), w_dense)


def test_packed_backward_breaks_no_cycle_and_keeps_no_dense_factor():
    dense = PADUnit(torch.randn(64, 32))
    dense.mask.copy_(torch.rand(64, 32) < 0.5)
    unit = pack_unit(dense)
    v = torch.randn(unit.positions.numel(), requires_grad=True)
    unit.hold()
    comp = unit.composition()
    ys = [comp.linear(torch.randn(8, 32), v, None) for _ in range(3)]
    unit.release()
    for y in ys:
        saved = [t.data_ptr() for t in y.grad_fn.saved_tensors]
        assert len(saved) == 2 and v.data_ptr() in saved  # input and packed values only
    gc.disable()
    try:
        ref = weakref.ref(comp)
        del comp, ys, y
        assert ref() is None  # freed by reference counting alone
    finally:
        gc.enable()


def test_positions_mask_and_complement_round_trip():
    torch.manual_seed(5)
    for density in (0.0, 0.3, 1.0):
        mask = torch.rand(7, 9) < density
        pos = positions_of(mask)
        assert pos.dtype == torch.int32
        assert torch.equal(pos.long(), mask.view(-1).nonzero().squeeze(1))
        assert torch.equal(mask_of(pos, mask.shape), mask)
        assert torch.equal(complement_of(pos, mask.numel()), (~mask).view(-1).nonzero().squeeze(1))
        w = torch.randn(4, 7, 9)
        vals = gather_at(w, pos, batch_dims=1)
        assert vals.shape == (4, pos.numel())
        back = scatter_at(vals, pos, (7, 9), into=w.flip(0))
        assert torch.equal(back[:, mask], w[:, mask]) and torch.equal(back[:, ~mask], w.flip(0)[:, ~mask])
        assert not scatter_at(vals, pos, (7, 9))[:, ~mask].any()


def test_pack_and_unpack_unit_round_trip_exactly():
    dense, _, packed, _, _, _ = setup("both", False, seed=6)
    back = unpack_unit(packed)
    assert torch.equal(back.mask, dense.mask)
    assert torch.equal(back.static_weight[~back.mask], dense.static_weight[~dense.mask])
    assert not back.static_weight[back.mask].any()
    assert torch.equal(back.phi, dense.phi) and isinstance(back.phi, torch.nn.Parameter)
    w = torch.randn(OUT, IN)
    with torch.no_grad():
        close(back.composition().compose(w), dense.composition().compose(w))


def test_mismatched_packed_values_and_edits_of_a_final_mask_name_the_weight():
    dense, _, packed, _, _, _ = setup("both", False, seed=7)
    with pytest.raises(ValueError, match=r"PAD weight 'fc' is packed: its mask is final"):
        packed.set_mask(torch.ones(OUT, IN))
    with pytest.raises(ValueError, match="already packed"):
        pack_unit(packed)
    pos = packed.positions
    with pytest.raises(ValueError, match=rf"layer x: {pos.numel() - 1} packed dynamic values, but its mask has "
                                         rf"{pos.numel()} dynamic entries"):
        check_packed("layer x", (OUT, IN), pos, pos.numel() - 1, "dynamic")
    with pytest.raises(ValueError, match="ascending, distinct"):
        check_packed("layer x", (OUT, IN), pos.flip(0), pos.numel(), "dynamic")
    with pytest.raises(ValueError, match="int32"):
        check_packed("layer x", (OUT, IN), pos.long(), pos.numel(), "dynamic")
