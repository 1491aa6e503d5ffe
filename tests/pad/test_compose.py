import pytest
import torch

from padnet_ds.pad.compose import LAMBDA_MODES, PADUnit, check_lambda_mode


def reference(x, w_dyn, bias, w_static, mask, lam_d, lam_s, prune=False):
    """The spec's formula, written out with plain autograd."""
    if prune:
        w = mask * w_dyn
    else:
        w = lam_d * mask * w_dyn + lam_s * (1 - mask) * w_static
    return torch.nn.functional.linear(x, w, bias)


def random_unit(seed, out_f, in_f, phi):
    """A unit with a random static weight, phi set and a random half-dynamic mask."""
    torch.manual_seed(seed)
    unit = PADUnit(torch.randn(out_f, in_f))
    with torch.no_grad():
        unit.phi.fill_(phi)
    unit.mask.copy_(torch.rand(out_f, in_f) > 0.5)
    return unit


class Owner(torch.nn.Module):
    """Stands in for an expert linear with its own mask (mask_scope='expert')."""

    def __init__(self, mask):
        super().__init__()
        self.register_buffer("mask", mask)


@pytest.mark.parametrize("mode", LAMBDA_MODES)
@pytest.mark.parametrize("with_bias", [True, False])
@pytest.mark.parametrize("scoring", [True, False])
@pytest.mark.parametrize("per_expert", [False, True])
def test_composed_linear_matches_formula_forward_backward_and_mask_gradient(mode, with_bias, scoring, per_expert):
    torch.manual_seed(0)
    out_f, in_f, experts = 6, 5, 3
    unit = PADUnit(torch.randn(out_f, in_f), lambda_mode=mode, shared_mask=not per_expert, name="fc")
    with torch.no_grad():
        if isinstance(unit.phi, torch.nn.Parameter):
            unit.phi.fill_(0.3)
    if per_expert:
        owners = [Owner(torch.rand(out_f, in_f) > 0.4) for _ in range(experts)]
        masks = [o.mask for o in owners]
    else:
        unit.mask.copy_(torch.rand(out_f, in_f) > 0.4)
        owners, masks = [unit] * experts, [unit.mask] * experts
    w_dyn = [torch.randn(out_f, in_f, requires_grad=True) for _ in range(experts)]
    b = [torch.randn(out_f, requires_grad=True) if with_bias else None for _ in range(experts)]
    xs = [torch.randn(4, 2, in_f, requires_grad=True) for _ in range(experts)]
    seen = []
    if scoring:
        unit.score_sink = lambda owner, g: seen.append((owner, g.clone()))
    unit.hold()
    loss = sum((unit.composition(o).linear(x, w, bb) ** 2).sum() for o, x, w, bb in zip(owners, xs, w_dyn, b))
    unit.release()
    loss.backward()

    # Reference with leaf float masks: their gradient is the IMP sensitivity dL/dM.
    leaf_masks = [m.float().requires_grad_(True) for m in (masks if per_expert else masks[:1])]
    leaf_of = leaf_masks if per_expert else leaf_masks * experts
    ref_static = unit.static_weight.detach().clone().requires_grad_(unit.static_weight.requires_grad)
    ref_phi = unit.phi.detach().clone().requires_grad_(isinstance(unit.phi, torch.nn.Parameter))
    ref_unit_lams = {"both": lambda p: (2 * torch.sigmoid(p), 2 - 2 * torch.sigmoid(p)),
                     "s": lambda p: (torch.tensor(1.0), 2 * torch.sigmoid(p)),
                     "d": lambda p: (2 * torch.sigmoid(p), torch.tensor(1.0)),
                     "none": lambda p: (torch.tensor(1.0), torch.tensor(1.0)),
                     "prune": lambda p: (torch.tensor(1.0), torch.tensor(0.0))}[mode]
    lam_d, lam_s = ref_unit_lams(ref_phi)
    w_ref = [w.detach().clone().requires_grad_(True) for w in w_dyn]
    b_ref = [bb.detach().clone().requires_grad_(True) if bb is not None else None for bb in b]
    x_ref = [x.detach().clone().requires_grad_(True) for x in xs]
    ref_loss = sum((reference(x, w, bb, ref_static, m, lam_d, lam_s, mode == "prune") ** 2).sum()
                   for x, w, bb, m in zip(x_ref, w_ref, b_ref, leaf_of))
    ref_loss.backward()

    torch.testing.assert_close(loss, ref_loss)
    for got, want in zip(w_dyn + xs, w_ref + x_ref):
        torch.testing.assert_close(got.grad, want.grad)
    if with_bias:
        for got, want in zip(b, b_ref):
            torch.testing.assert_close(got.grad, want.grad)
    if unit.static_weight.requires_grad:
        torch.testing.assert_close(unit.static_weight.grad, ref_static.grad)
    if isinstance(unit.phi, torch.nn.Parameter):
        torch.testing.assert_close(unit.phi.grad, ref_phi.grad)
    if not scoring:
        assert not seen
        return
    expected_owners = owners if per_expert else [unit]
    assert sorted(map(id, (o for o, _ in seen))) == sorted(map(id, expected_owners)), \
        "each mask's sensitivity arrives once per backward"
    for owner, grad in seen:
        want = leaf_masks[expected_owners.index(owner)].grad
        torch.testing.assert_close(grad, want)
        assert grad.abs().sum() > 0


def test_no_grad_forward_equals_the_training_forward_and_builds_no_graph():
    unit = random_unit(2, 6, 5, -0.4)
    w, x = torch.randn(6, 5, requires_grad=True), torch.randn(3, 5)
    y_train = unit.composition().linear(x, w, None)
    with torch.no_grad():
        y_eval = unit.composition().linear(x, w, None)
    assert y_train.requires_grad and not y_eval.requires_grad
    torch.testing.assert_close(y_eval, y_train.detach())


def test_non_contiguous_expert_chunks_give_the_results_of_contiguous_input():
    # DeepSpeed hands each local expert a dim-1 chunk of the dispatched (ep, experts, capacity, d) buffer.
    unit = random_unit(4, 6, 5, 0.3)
    ws = [torch.randn(6, 5, requires_grad=True) for _ in range(3)]
    bs = [torch.randn(6, requires_grad=True) for _ in range(3)]
    data = torch.randn(2, 3, 4, 5)
    results = []
    for contiguous in (False, True):
        for p in [unit.static_weight, unit.phi, *ws, *bs]:
            p.grad = None
        buf = data.clone().requires_grad_(True)
        chunks = [c.contiguous() if contiguous else c for c in buf.chunk(3, dim=1)]
        assert contiguous or not chunks[1].is_contiguous()
        unit.hold()
        ys = [unit.composition().linear(c, w, b) for c, w, b in zip(chunks, ws, bs)]
        unit.release()
        y = torch.cat(ys, dim=1)
        y.pow(2).sum().backward()
        results.append([y.detach(), buf.grad, unit.static_weight.grad, unit.phi.grad,
                        *(w.grad for w in ws), *(b.grad for b in bs)])
    for got, want in zip(*results):
        torch.testing.assert_close(got, want)


def test_autocast_forward_and_backward_match_the_formula_in_bf16():
    unit = random_unit(3, 16, 8, 0.2)
    w = torch.randn(16, 8, requires_grad=True)
    x = torch.randn(4, 8, requires_grad=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        unit.hold()
        y = unit.composition().linear(x, w, None)
        unit.release()
    assert y.dtype == torch.bfloat16
    y.float().pow(2).sum().backward()
    assert w.grad.dtype == x.grad.dtype == unit.static_weight.grad.dtype == torch.float32

    m = unit.mask.float()
    ref_w, ref_x = w.detach().clone().requires_grad_(True), x.detach().clone().requires_grad_(True)
    ref_s = unit.static_weight.detach().clone().requires_grad_(True)
    lam_d = 2 * torch.sigmoid(torch.tensor(0.2))
    reference(ref_x, ref_w, None, ref_s, m, lam_d, 2 - lam_d).pow(2).sum().backward()
    for got, want in ((w.grad, ref_w.grad), (x.grad, ref_x.grad), (unit.static_weight.grad, ref_s.grad)):
        torch.testing.assert_close(got, want, rtol=0.05, atol=0.05 * float(want.abs().max()))


def test_all_ones_mask_with_unit_lambdas_is_exactly_the_dynamic_weight_and_zeros_the_static():
    torch.manual_seed(1)
    unit = PADUnit(torch.randn(4, 3), lambda_mode="none")
    w = torch.randn(4, 3)
    x = torch.randn(7, 3)
    assert torch.equal(unit.composition().linear(x, w, None), torch.nn.functional.linear(x, w))
    unit.mask.zero_()
    assert torch.equal(unit.composition().linear(x, w, None), torch.nn.functional.linear(x, unit.static_weight))


def test_backward_keeps_no_composed_weight_per_expert_and_breaks_no_cycle():
    import gc
    import weakref

    unit = PADUnit(torch.randn(64, 32))
    w = torch.randn(64, 32, requires_grad=True)
    unit.hold()
    comp = unit.composition()
    ys = [comp.linear(torch.randn(8, 32), w, None) for _ in range(3)]
    unit.release()
    for y in ys:
        # input and expert weight only: the shared terms live once per layer in the composition
        saved = [t.data_ptr() for t in y.grad_fn.saved_tensors]
        assert len(saved) == 2 and w.data_ptr() in saved
    assert comp.static.data_ptr() != comp.workspace.data_ptr()
    gc.disable()
    try:
        ref = weakref.ref(comp)
        del comp, ys, y
        # freed by reference counting alone (no reference cycle through the hub node)
        assert ref() is None
    finally:
        gc.enable()


def test_bad_lambda_mode_and_mask_shape_name_the_setting():
    with pytest.raises(ValueError, match="lambda_mode='bogus'"):
        check_lambda_mode("bogus")
    unit = PADUnit(torch.randn(4, 3), name="fc1")
    with pytest.raises(ValueError, match=r"fc1 has shape \(3, 4\), expected \(4, 3\)"):
        unit.set_mask(torch.ones(3, 4))
    unit.set_mask(torch.zeros(4, 3))
    assert not unit.mask.any()
