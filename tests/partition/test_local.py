"""Partitioner pieces in one process (no DeepSpeed engine): scores, selection, schedule, config."""
import pytest
import torch
import torch.nn.functional as F

from padnet_ds.pad.compose import PADUnit
from padnet_ds.pad.packed import pack_model
from padnet_ds.partition import PartitionConfig, Partitioner
from padnet_ds.partition.schedule import step_due, target_ratio
from padnet_ds.partition.select import SAMPLE, kth_largest, select_each, select_global, top_k
from tests.partition.toy import PToy, data


def leaf_gradients(model, batches):
    """dL/dM by autograd with every mask replaced by a float leaf (no score sink involved)."""
    leaves = {}
    originals = {}

    def view(unit):
        def mask_view(mask, owner):
            key = id(owner)
            if key not in leaves:
                leaves[key] = mask.float().requires_grad_(True)
            return leaves[key]
        return mask_view

    units = [m for m in model.modules() if isinstance(m, PADUnit)]
    for unit in units:
        originals[unit] = unit.mask_view
        unit.mask_view = view(unit)
    try:
        for x, y in batches:
            pred, _ = model(x)
            F.mse_loss(pred, y).backward()
    finally:
        for unit in units:
            unit.mask_view = originals[unit]
    return leaves


def test_accumulated_scores_equal_autograd_gradient_wrt_the_mask_leaf():
    torch.manual_seed(0)
    model = PToy(phi=0.4)
    with torch.no_grad():  # partial masks, so both the static and the dynamic term matter
        for layer in model.moes:
            for unit in layer.pad_units():
                for m in layer.masks(unit):
                    m.copy_(torch.rand(m.shape) < 0.6)
    x, y = data(3, 4, seed=1)
    batches = [(x[i], y[i]) for i in range(3)]
    part = Partitioner(model, PartitionConfig(ratio=0.5, warmup_steps=0, interval=3, steps=1))
    part.before_step(0)
    for xb, yb in batches:
        pred, _ = model(xb)
        F.mse_loss(pred, yb).backward()
    got = {id(o): s for site, sums in zip(part.sites, part.book.local()) for o, s in zip(site.owners, sums)}
    model.zero_grad()
    want = leaf_gradients(model, batches)
    assert len(got) == len(want) == 2 + 2 * 4  # shared layer: 2 units; per-expert layer: 2 units x 4 experts
    for key, grad in want.items():
        assert grad.grad.abs().max() > 0
        torch.testing.assert_close(got[key], grad.grad, rtol=1e-5, atol=1e-7)
    assert part.book.calls == 3 * (2 + 8)


def test_scoring_is_off_outside_the_windows():
    model = PToy()
    cfg = PartitionConfig(ratio=0.5, warmup_steps=2, interval=3, steps=2)
    part = Partitioner(model, cfg)
    units = {id(s.unit): s.unit for s in part.sites}.values()
    on = []
    for g in range(10):
        part.before_step(g)
        on.append(all(u.score_sink is not None for u in units))
    assert on == [False, False, True, True, True, True, True, True, False, False]
    assert [g for g in range(20) if step_due(cfg, g) is not None] == [5, 8]


def run_schedule(model, cfg, steps, lr=0.05):
    opt = torch.optim.SGD(model.parameters(), lr=lr)
    part = Partitioner(model, cfg)
    x, y = data(steps, 4, seed=3)
    entries = []
    for g in range(steps):
        part.before_step(g)
        pred, aux = model(x[g])
        (F.mse_loss(pred, y[g]) + 0.01 * aux).backward()
        opt.step()
        opt.zero_grad()
        e = part.after_step(g + 1)
        if e is not None:
            entries.append(e)
    return part, entries


@pytest.mark.parametrize("scope", ["global", "layer"])
def test_schedule_ends_at_the_target_ratio(scope):
    model = PToy()
    cfg = PartitionConfig(ratio=0.3, warmup_steps=1, interval=2, steps=3, scope=scope)
    part, entries = run_schedule(model, cfg, 9)
    assert [e["global_step"] for e in entries] == [3, 5, 7] and part.done
    assert [e["ratio"] for e in entries] == pytest.approx([0.3 ** (t / 3) for t in (1, 2, 3)])
    masks = [m for s in part.sites for m in s.masks]
    total = sum(m.numel() for m in masks)
    assert abs(part.overall_ratio() * total - 0.3 * total) <= len(masks)
    ratios = [float(m.float().mean()) for m in masks]
    if scope == "layer":
        assert all(abs(r * m.numel() - 0.3 * m.numel()) <= 1 for r, m in zip(ratios, masks))
    else:
        assert max(ratios) - min(ratios) > 0.05, "a global threshold gives unequal per-mask ratios"
    assert entries[-1]["achieved"] == pytest.approx(part.overall_ratio())
    assert set(entries[-1]["layers"]) == set(part.layer_ratios())
    assert sum(entries[0]["layers"][n]["flipped"] for n in entries[0]["layers"]) > 0


def test_linear_schedule_and_ratio_one_is_off():
    cfg = PartitionConfig(ratio=0.4, schedule="linear", steps=4)
    assert [target_ratio(cfg, t) for t in range(5)] == pytest.approx([1, 0.85, 0.7, 0.55, 0.4])
    part = Partitioner(PToy(), PartitionConfig())
    assert not part.active and part.done
    part.before_step(500)
    assert part.after_step(150) is None and part.log == []
    assert all(s.unit.score_sink is None for s in part.sites)


def test_partitioning_right_after_upcycling_raises_the_symmetry_trap_error():
    model = PToy(perturb=0.0)
    cfg = PartitionConfig(ratio=0.5, warmup_steps=0, interval=1, steps=2)
    with pytest.raises(RuntimeError, match=r"symmetry trap.*partition.warmup_steps > 0"):
        run_schedule(model, cfg, 2)
    before = PartitionConfig(ratio=0.5, mode="before_training", perturb_std=0.0, steps=1, scoring_batches=1)
    model = PToy(perturb=0.0)
    x, y = data(1, 4, seed=0)
    with pytest.raises(RuntimeError, match=r"every imp score is zero.*partition.perturb_std > 0"):
        Partitioner(model, before).run_before_training(model, [(x[0], y[0])],
                                                        lambda m, b: F.mse_loss(m(b[0])[0], b[1]))
    assert all(bool(m.all()) for layer in model.moes for u in layer.pad_units() for m in layer.masks(u))


def test_identical_experts_with_unequal_lambdas_carry_information():
    # W_e == W_static but lambda_d != lambda_s: dL/dM = (lambda_d - lambda_s) W_static sum_e G_e != 0
    model = PToy(perturb=0.0, phi=0.4)
    part, entries = run_schedule(model, PartitionConfig(ratio=0.5, warmup_steps=0, interval=1, steps=1), 1)
    assert len(entries) == 1 and abs(entries[0]["achieved"] - 0.5) < 0.01


def test_before_training_single_process_leaves_weights_and_grads_alone():
    model = PToy()
    start = {n: p.detach().clone() for n, p in model.named_parameters()}
    x, y = data(3, 4, seed=0)
    cfg = PartitionConfig(ratio=0.5, mode="before_training", perturb_std=0.3, steps=2, scoring_batches=2)
    part = Partitioner(model, cfg)
    entries = part.run_before_training(model, [(x[i], y[i]) for i in range(3)],
                                       lambda m, b: F.mse_loss(m(b[0])[0], b[1]))
    assert [e["step"] for e in entries] == [1, 2] and part.done and model.training
    assert entries[-1]["achieved"] == pytest.approx(0.5, abs=1e-3)
    for n, p in model.named_parameters():
        assert torch.equal(p, start[n]) and p.grad is None and p.requires_grad, n


def test_top_k_is_exact_and_breaks_ties_by_index():
    s = torch.tensor([0.5, 1.0, 0.5, 0.5, 2.0, 0.0])
    assert top_k(s, 3).tolist() == [True, True, False, False, True, False]
    assert top_k(s, 0).sum() == 0 and top_k(s, 6).all()
    a, b = torch.rand(10, 10), torch.rand(7)
    keep = select_global([a, b], 0.35)
    assert sum(int(k.sum()) for k in keep) == 37  # round(0.35 * 107)
    each = select_each(torch.rand(4, 5, 6), 0.5, 4)
    assert each.reshape(4, -1).sum(1).tolist() == [15] * 4


def test_bracketed_threshold_equals_kthvalue_on_large_inputs_with_ties():
    torch.manual_seed(0)
    n = 8 * SAMPLE + 12345  # large enough for the sampled bracket
    inputs = {"uniform": torch.rand(n), "ties": (torch.rand(n) * 7).floor(), "constant": torch.full((n,), 0.25),
              "zeros then values": torch.cat([torch.zeros(n // 2), torch.randn(n - n // 2).abs()]),
              "sorted": torch.arange(n, dtype=torch.float32)}
    for name, flat in inputs.items():
        for k in (1, 5, n // 3, n // 2, n - 3, n):
            want = torch.kthvalue(flat, n - k + 1).values
            assert kth_largest(flat, k).item() == want.item(), (name, k)
        chosen = top_k(flat, n // 2)
        assert int(torch.count_nonzero(chosen)) == n // 2, name


@pytest.mark.parametrize("field,value,message", [
    ("ratio", 1.5, r"partition.ratio=1.5 must be in \(0, 1\]"),
    ("ratio", 0.0, r"partition.ratio=0.0 must be in \(0, 1\]"),
    ("mode", "during", r"partition.mode='during' is not one of in_training, before_training"),
    ("schedule", "cosine", "partition.schedule='cosine'"),
    ("scope", "model", "partition.scope='model'"),
    ("method", "snip", "partition.method='snip'"),
    ("steps", 0, r"partition.steps=0 must be an integer >= 1"),
    ("interval", 0, "partition.interval=0"),
    ("warmup_steps", -1, "partition.warmup_steps=-1"),
    ("scoring_batches", 0, "partition.scoring_batches=0"),
    ("perturb_std", -0.1, "partition.perturb_std=-0.1 must be >= 0"),
])
def test_config_errors_name_the_field(field, value, message):
    with pytest.raises(ValueError, match=message):
        PartitionConfig(**{field: value})


def test_before_training_requires_an_explicit_perturbation():
    with pytest.raises(ValueError, match="partition.perturb_std=None must be stated"):
        PartitionConfig(ratio=0.5, mode="before_training")
    PartitionConfig(ratio=0.5, mode="before_training", perturb_std=0.0)
    PartitionConfig(ratio=1.0, mode="before_training")


def test_units_outside_moe_are_partitioned_too():
    conv = pytest.importorskip("padnet_ds.conv.dyconv")
    net = torch.nn.Sequential(conv.PADDynamicConv2d(3, 4, 3, padding=1, num_kernels=3, temperature=1.0),
                              torch.nn.ReLU(), conv.PADDynamicConv2d(4, 2, 3, padding=1, num_kernels=3,
                                                                      temperature=1.0))
    for method in ("imp", "magnitude", "random"):
        part = Partitioner(net, PartitionConfig(ratio=0.5, warmup_steps=0, interval=1, steps=1, scope="layer",
                                                method=method))
        assert [s.name for s in part.sites] == ["0.pad", "2.pad"]
        part.before_step(0)
        net(torch.randn(2, 3, 6, 6)).square().mean().backward()
        entry = part.after_step(1)
        assert all(abs(v["ratio"] - 0.5) <= 1 / s.numel for v, s in zip(entry["layers"].values(), part.sites))
        for s in part.sites:
            s.masks[0].fill_(True)


def test_partition_steps_on_a_packed_model_are_refused_with_the_reason():
    model = PToy()
    part, _ = run_schedule(model, PartitionConfig(ratio=0.5, warmup_steps=0, interval=1, steps=1), 1)
    masks = {s.name: [m.clone() for m in s.masks] for s in part.sites}
    assert pack_model(model) == ["moes.0", "moes.1"]
    x, y = data(1, 4, seed=0)
    # a fresh partitioner on the packed model (a resumed run) reads its masks and ratios...
    resumed = Partitioner(model, PartitionConfig(ratio=0.5, warmup_steps=0, interval=1, steps=2, method="magnitude"))
    for site in resumed.sites:
        assert site.packed and all(torch.equal(a, b) for a, b in zip(site.masks, masks[site.name]))
    assert resumed.overall_ratio() == pytest.approx(part.overall_ratio())
    # ...but refuses to change them, before any score or collective
    with pytest.raises(RuntimeError, match=r"partition step 1 \(global step 1\) refused: the model is packed "
                                           r"\(moes\.0\.pad\.fc1.*masks are final"):
        resumed.after_step(1)
    scoring = Partitioner(model, PartitionConfig(ratio=0.5, warmup_steps=0, interval=1, steps=2))
    with pytest.raises(RuntimeError, match=r"scoring for partition step 1 .* refused.*partition\.pack: auto"):
        scoring.before_step(0)
    assert all(s.unit.score_sink is None for s in scoring.sites)
    before = PartitionConfig(ratio=0.5, mode="before_training", perturb_std=0.3, steps=1, scoring_batches=1)
    with pytest.raises(RuntimeError, match="before_training partitioning refused"):
        Partitioner(model, before).run_before_training(model, [(x[0], y[0])],
                                                        lambda m, b: F.mse_loss(m(b[0])[0], b[1]))
    assert not any(p.grad is not None for p in model.parameters())
