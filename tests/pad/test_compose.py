import pytest
import torch

from padnet_ds.pad.compose import LAMBDA_MODES, PADUnit, check_lambda_mode, composed_linear


def reference(x, w_dyn, bias, w_static, mask, lam_d, lam_s, prune=False):
    """The spec's formula, written out with plain autograd."""
    if prune:
        w = mask * w_dyn
    else:
        w = lam_d * mask * w_dyn + lam_s * (1 - mask) * w_static
    return torch.nn.functional.linear(x, w, bias)


@pytest.mark.parametrize("mode", LAMBDA_MODES)
@pytest.mark.parametrize("with_bias", [True, False])
@pytest.mark.parametrize("scoring", [True, False])
def test_composed_linear_matches_formula_forward_backward_and_mask_gradient(mode, with_bias, scoring):
    torch.manual_seed(0)
    out_f, in_f, experts = 6, 5, 3
    unit = PADUnit(torch.randn(out_f, in_f), lambda_mode=mode, name="fc")
    with torch.no_grad():
        unit.mask.copy_(torch.rand(out_f, in_f) > 0.4)
        if isinstance(unit.phi, torch.nn.Parameter):
            unit.phi.fill_(0.3)
    w_dyn = [torch.randn(out_f, in_f, requires_grad=True) for _ in range(experts)]
    b = [torch.randn(out_f, requires_grad=True) if with_bias else None for _ in range(experts)]
    xs = [torch.randn(4, 2, in_f, requires_grad=True) for _ in range(experts)]
    seen = []
    if scoring:
        unit.score_sink = lambda owner, g: seen.append((owner, g.clone()))
    unit.hold()
    terms = unit.shared_linear_terms()
    assert (terms[2] is None) == (scoring or mode in ("s", "none", "prune"))  # lambda_d learned in both, d
    loss = sum((composed_linear(x, w, bb, *terms) ** 2).sum() for x, w, bb in zip(xs, w_dyn, b))
    loss.backward()
    unit.release()

    # Reference with a leaf float mask: its gradient is the IMP sensitivity dL/dM.
    leaf_mask = unit.mask.float().requires_grad_(True)
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
    ref_loss = sum((reference(x, w, bb, ref_static, leaf_mask, lam_d, lam_s, mode == "prune") ** 2).sum()
                   for x, w, bb in zip(x_ref, w_ref, b_ref))
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
    assert len(seen) == 1 and seen[0][0] is unit, "the shared mask's sensitivity arrives once per backward"
    torch.testing.assert_close(seen[0][1], leaf_mask.grad)
    assert seen[0][1].abs().sum() > 0


def test_all_ones_mask_with_unit_lambdas_is_exactly_the_dynamic_weight_and_zeros_the_static():
    torch.manual_seed(1)
    unit = PADUnit(torch.randn(4, 3), lambda_mode="none")
    w = torch.randn(4, 3)
    x = torch.randn(7, 3)
    s, m = unit.terms(unit.mask, unit)
    assert torch.equal(composed_linear(x, w, None, s, m), torch.nn.functional.linear(x, w))
    unit.mask.zero_()
    s, m = unit.terms(unit.mask, unit)
    assert torch.equal(composed_linear(x, w, None, s, m), torch.nn.functional.linear(x, unit.static_weight))


def test_backward_does_not_keep_the_composed_weight():
    unit = PADUnit(torch.randn(64, 32))
    w = torch.randn(64, 32, requires_grad=True)
    s, m, lam = unit.linear_terms(unit.mask, unit)
    y = composed_linear(torch.randn(8, 32), w, None, s, m, lam)
    saved = {t.data_ptr() for t in y.grad_fn.saved_tensors}
    # input, expert weight, the two shared terms and lambda_d: nothing composed per expert
    assert len(y.grad_fn.saved_tensors) == 5 and lam.numel() == 1
    assert w.data_ptr() in saved and s.data_ptr() in saved and m.data_ptr() in saved


def test_bad_lambda_mode_and_mask_shape_name_the_setting():
    with pytest.raises(ValueError, match="lambda_mode='bogus'"):
        check_lambda_mode("bogus")
    unit = PADUnit(torch.randn(4, 3), name="fc1")
    with pytest.raises(ValueError, match=r"fc1 has shape \(3, 4\), expected \(4, 3\)"):
        unit.set_mask(torch.ones(3, 4))
    unit.set_mask(torch.zeros(4, 3))
    assert not unit.mask.any()
