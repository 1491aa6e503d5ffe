"""Each benchmark's ``--quick`` mode runs and writes its JSON keys as finite numbers (no timing asserts).

The single-process benchmarks run in the default suite; the ones that spawn gloo ranks (or run
everything) take a minute or more each on a 2-core machine and are marked ``slow``.
"""
import json

import pytest

from bench.common import finite


def _load(path):
    return json.loads(path.read_text())


def _check(data, *keys):
    for key in keys:
        assert key in data, f"missing key {key}"
        assert finite(data[key]), f"{key}={data[key]!r} is not a finite number"
    assert data["quick"] is True


def test_gemm_quick(tmp_path):
    from bench import gemm

    out = tmp_path / "gemm.json"
    gemm.main(["--quick", "--reps", "1", "--warmup", "0", "--out", str(out)])
    data = _load(out)
    _check(data, "gemm_efficiency")
    assert 0 < data["gemm_efficiency"] < 10
    assert finite(data["grouped_kernel_vs_loop_per_shape"]["h256"])


def test_authors_layer_quick(tmp_path):
    from bench import authors_layer

    out = tmp_path / "authors.json"
    authors_layer.main(["--quick", "--reps", "1", "--warmup", "0", "--out", str(out)])
    _check(_load(out), "layer_ratio_vs_authors")


def test_authors_layer_reimplementation_routes_every_token_to_k_experts():
    import torch

    from bench.authors_layer import AuthorsPadMoE

    layer = AuthorsPadMoE(16, 32, experts=4, k=2)
    x = torch.randn(3, 5, 16, requires_grad=True)
    y, aux = layer(x)
    assert y.shape == x.shape and torch.isfinite(aux)
    gates, _ = layer.gating(x.reshape(-1, 16))
    assert torch.equal((gates > 0).sum(1), torch.full((15,), 2))
    (y.pow(2).mean() + aux).backward()
    assert layer.w1.grad is not None and layer.static1.grad is not None and layer.phi1.grad is not None


@pytest.mark.slow
def test_moe_step_quick(tmp_path):
    from bench import moe_step

    out = tmp_path / "moe_step.json"
    moe_step.main(["--quick", "--reps", "3", "--warmup", "1", "--out", str(out)])
    data = _load(out)
    _check(data, "step_ratio_vs_deepspeed_moe", "step_ratio_packed_vs_deepspeed_moe")
    assert set(data["step_ratio_packed_per_shape"]) == {"h256"}
    for key in ("fill_fraction_per_shape", "fill_fraction_no_drop_per_shape",
                "step_ratio_dropless_vs_deepspeed_no_drop_per_shape"):
        assert finite(data[key]["h256"]), key
    # k=2, capacity factor 1.25: at most 1/1.25 of DeepSpeed's rows can hold a token
    assert 0.5 < data["fill_fraction_per_shape"]["h256"] <= 0.8 + 1e-9
    q1, q2, q3 = data["step_ratio_round_quartiles_per_shape"]["h256"]
    assert all(map(finite, (q1, q2, q3))) and 0 < q1 <= q2 <= q3
    for share in data["results"]["h256"]["overhead_share_of_moe_step"].values():
        assert finite(share)


@pytest.mark.slow
def test_memory_quick(tmp_path):
    from bench import memory

    out = tmp_path / "memory.json"
    memory.main(["--quick", "--out", str(out)])
    data = _load(out)
    _check(data, "memory_ratio_r05", "memory_ratio_r03", "deployment_ratio_r05", "activation_ratio_r05",
           "memory_ratio_packed_r05", "memory_ratio_packed_r03", "checkpoint_bytes_ratio_packed_r05")
    assert data["memory_ratio_r05"] >= 1.0 and data["deployment_ratio_r05"] < 1.0
    # packed: the experts' share shrinks with the ratio, so r=0.3 holds less than r=0.5 holds less than dense
    assert data["memory_ratio_packed_r03"] < data["memory_ratio_packed_r05"] < data["memory_ratio_r05"]


@pytest.mark.slow
def test_scaling_quick(tmp_path):
    from bench import scaling

    out = tmp_path / "scaling.json"
    scaling.main(["--quick", "--reps", "1", "--warmup", "1", "--out", str(out)])
    _check(_load(out), "weak_scaling")


@pytest.mark.slow
def test_imp_recovery_quick(tmp_path):
    from bench import imp_recovery

    out = tmp_path / "imp_recovery.json"
    imp_recovery.main(["--quick", "--out", str(out)])
    data = _load(out)
    _check(data, "imp_recovery_precision", "imp_recovery_precision_random", "imp_recovery_precision_magnitude",
           "imp_recovery_loss_ratio", "imp_recovery_loss_ratio_random")
    # random: hypergeometric around r* (sd 0.008 per seed over 8192 entries); IMP must do clearly better
    assert abs(data["imp_recovery_precision_random"] - data["r_star"]) < 0.03
    assert data["imp_recovery_precision"] > data["imp_recovery_precision_random"] + 0.15
    assert len(data["precision"]["imp"]["per_seed"]) == 2 and data["anatomy"]


@pytest.mark.slow
def test_run_all_quick(tmp_path):
    from bench import run_all

    out = tmp_path / "bench-results.json"
    summary = run_all.main(["--quick", "--out", str(out), "--results-dir", str(tmp_path / "results")])
    data = _load(out)
    assert data == json.loads(json.dumps(summary, default=str))
    keys = ["step_ratio_vs_deepspeed_moe", "layer_ratio_vs_authors", "memory_ratio_r05", "memory_ratio_r03",
            "memory_ratio_packed_r05", "memory_ratio_packed_r03", "step_ratio_packed_vs_deepspeed_moe",
            "checkpoint_bytes_ratio_packed_r05",
            "gemm_efficiency", "weak_scaling", "dyconv_ratio", "imp_recovery_precision", "imp_recovery_loss_ratio"]
    for key in keys:
        assert finite(data[key]), f"{key}={data[key]!r}"
    assert "partitioner_overhead" in data and "shapes" in data and data["machine"]["cpus"] and data["quick"] is True


def test_quartiles_of_paired_ratios():
    from bench.common import quartiles

    assert quartiles([1.0, 2.0, 3.0, 4.0, 5.0]) == [2.0, 3.0, 4.0]
    assert quartiles([1.2]) == [1.2, 1.2, 1.2]
