"""PAD-MoE inside the DeepSpeed engine on real ranks (gloo): EP sharding, ZeRO, checkpoints."""
import os

import pytest
import torch

from padnet_ds.comm import world_size
from padnet_ds.engine.setup import build_engine, check_ds_config
from tests.distributed.toy import Toy, batches, ds_config, expert_state, replicated_state
from padnet_ds.testing import run_ranks

ROWS = 4  # sequences per rank and step


def sgd(lr):
    return lambda params: torch.optim.SGD(params, lr=lr)


def train_equivalence(ep_size, steps, clip):
    world = world_size()
    rank = torch.distributed.get_rank()
    model = Toy(ep_size=ep_size, dynamic=0.5)
    engine = build_engine(model, ds_config(2, ROWS * 2 // world, clip=clip), optimizer=sgd(0.2))
    x, y = batches(steps, 2 * ROWS)
    per = 2 * ROWS // world
    losses, norms = [], []
    for s in range(steps):
        xb, yb = x[s, rank * per:(rank + 1) * per], y[s, rank * per:(rank + 1) * per]
        pred, _ = engine(xb)
        loss = torch.nn.functional.mse_loss(pred, yb)
        engine.backward(loss)
        engine.step()
        losses.append(loss.item())
        norms.append(float(engine.get_global_grad_norm()))
    return dict(losses=losses, norms=norms, experts=expert_state(model), replicated=replicated_state(model),
                local_experts=len(model.moe.deepspeed_moe.experts.deepspeed_experts))


def test_two_ranks_ep2_zero2_equal_one_rank_ep1_with_clipping(pool):
    steps, clip = 4, 0.2
    r0, r1 = pool.run(train_equivalence, 2, steps, clip)
    (single,) = run_ranks(train_equivalence, 1, 1, steps, clip)
    assert r0["local_experts"] == r1["local_experts"] == 2 and single["local_experts"] == 4
    assert set(r0["experts"]) == {0, 1} and set(r1["experts"]) == {2, 3}
    assert min(single["norms"]) > clip, "clipping must be active for this test to mean anything"
    torch.testing.assert_close(r0["norms"], single["norms"], rtol=1e-4, atol=1e-5)
    mean_loss = [(a + b) / 2 for a, b in zip(r0["losses"], r1["losses"])]
    torch.testing.assert_close(mean_loss, single["losses"], rtol=1e-5, atol=1e-6)
    for name, t in r0["replicated"].items():
        assert torch.equal(t, r1["replicated"][name]), f"replicated {name} differs between ranks"
        torch.testing.assert_close(t, single["replicated"][name], rtol=1e-4, atol=1e-5)
    for gid, params in {**r0["experts"], **r1["experts"]}.items():
        for name, t in params.items():
            torch.testing.assert_close(t, single["experts"][gid][name], rtol=1e-4, atol=1e-5)
    start = Toy(dynamic=0.5)
    for name in ("moe.pad.fc1.static_weight", "moe.pad.fc2.phi"):
        assert not torch.allclose(r0["replicated"][name], dict(start.named_parameters())[name].detach()), \
            f"{name} did not train: the comparison above would be vacuous"


def train_layout(stage, bf16, steps):
    model = Toy(ep_size=2, seed=stage)
    engine = build_engine(model, ds_config(stage, ROWS, bf16=bf16, clip=1.0),
                          optimizer=lambda p: torch.optim.AdamW(p, lr=1e-2))
    x, y = batches(steps, ROWS, seed=7 + torch.distributed.get_rank())
    losses = []
    for s in range(steps):
        pred, aux = engine(x[s % 8].to(engine.module.inp.weight.dtype))
        loss = torch.nn.functional.mse_loss(pred.float(), y[s % 8]) + 0.01 * aux.float()
        engine.backward(loss)
        engine.step()
        losses.append(loss.item())
    return losses


@pytest.mark.parametrize("bf16", [False, True], ids=["fp32", "bf16"])
@pytest.mark.parametrize("stage", [0, 1, 2], ids=lambda s: f"zero{s}")
def test_zero_stages_fp32_and_bf16_learn(pool, stage, bf16):
    for losses in pool.run(train_layout, stage, bf16, 40):
        first, last = sum(losses[:8]) / 8, sum(losses[-8:]) / 8
        assert last < 0.7 * first, f"loss {first:.3f} -> {last:.3f} did not fall"


def checkpoint_roundtrip(ckpt_dir):
    def run(model, engine, xs, ys):
        out = []
        for xb, yb in zip(xs, ys):
            pred, aux = engine(xb)
            loss = torch.nn.functional.mse_loss(pred, yb) + 0.01 * aux
            engine.backward(loss)
            engine.step()
            out.append(loss.item())
        return out

    rank = torch.distributed.get_rank()
    x, y = batches(6, ROWS, seed=rank)
    cfg = ds_config(2, ROWS, clip=1.0)
    model = Toy(ep_size=2, seed=0)
    with torch.no_grad():  # a partial mask and a moved phi must survive the round trip
        model.moe.pad["fc1"].mask.copy_(torch.rand(model.moe.pad["fc1"].mask.shape,
                                                   generator=torch.Generator().manual_seed(0)) > 0.5)
    engine = build_engine(model, cfg, optimizer=lambda p: torch.optim.AdamW(p, lr=1e-2))
    run(model, engine, x[:3], y[:3])
    engine.save_checkpoint(ckpt_dir, tag="step3")
    saved = dict(replicated=replicated_state(model), experts=expert_state(model))
    after = run(model, engine, x[3:], y[3:])

    fresh = Toy(ep_size=2, seed=99)
    engine2 = build_engine(fresh, cfg, optimizer=lambda p: torch.optim.AdamW(p, lr=1e-2))
    engine2.load_checkpoint(ckpt_dir, tag="step3")
    loaded = dict(replicated=replicated_state(fresh), experts=expert_state(fresh))
    resumed = run(fresh, engine2, x[3:], y[3:])
    return dict(saved=saved, loaded=loaded, after=after, resumed=resumed, files=sorted(os.listdir(
        os.path.join(ckpt_dir, "step3"))))


def test_save_and_load_checkpoint_round_trip_the_layer_exactly(pool, tmp_path):
    results = pool.run(checkpoint_roundtrip, str(tmp_path))
    for res in results:
        for part in ("replicated", "experts"):
            for key, tensors in res["saved"][part].items():
                if isinstance(tensors, dict):
                    for name, t in tensors.items():
                        assert torch.equal(t, res["loaded"][part][key][name]), f"expert {key} {name}"
                else:
                    assert torch.equal(tensors, res["loaded"][part][key]), key
        assert res["after"] == res["resumed"], "optimizer state must resume bit-identically"
    files = results[0]["files"]
    assert [f for f in files if "expert" in f] == [f"layer_0_expert_{i}_mp_rank_00_model_states.pt" for i in range(4)]


def check_world_vs_ep():
    from tests.distributed import toy
    from padnet_ds import PADMoE
    fc1, fc2 = torch.nn.Linear(toy.H, toy.F_), torch.nn.Linear(toy.F_, toy.H)
    net = torch.nn.Sequential()
    net.moe = PADMoE.from_dense(fc1, fc2, torch.nn.GELU(), num_experts=4, ep_size=4, k=1)
    try:
        build_engine(net, ds_config(2, 2))
    except ValueError as err:
        return str(err)
    return "no error"


def test_world_size_not_divisible_by_ep_size_fails_on_every_rank_without_hanging():
    msgs = run_ranks(check_world_vs_ep, 2, timeout=120)
    assert all("world size 2 is not divisible by ep_size=4" in m for m in msgs), msgs


def test_zero3_and_cpu_fp16_are_rejected_with_the_setting_named():
    model = Toy()
    with pytest.raises(ValueError, match="zero_optimization.stage=3"):
        check_ds_config(ds_config(3, 2), model, 1)
    cfg = ds_config(2, 2)
    cfg["fp16"] = {"enabled": True}
    with pytest.raises(ValueError, match="fp16.enabled"):
        check_ds_config(cfg, model, 1)


def safe_roundtrip(stage, bf16, ckpt_dir):
    """Save with the engine build_engine makes, reload through its weights_only loader, step on."""
    from padnet_ds.files import safe_load

    rank = torch.distributed.get_rank()
    x, y = batches(4, ROWS, seed=rank)
    cfg = ds_config(stage, ROWS, bf16=bf16, clip=1.0)
    dtype = torch.bfloat16 if bf16 else torch.float32

    def run(engine, xs, ys):
        out = []
        for xb, yb in zip(xs, ys):
            pred, aux = engine(xb.to(dtype))
            loss = torch.nn.functional.mse_loss(pred.float(), yb) + 0.01 * aux.float()
            engine.backward(loss)
            engine.step()
            out.append(loss.item())
        return out

    engine = build_engine(Toy(ep_size=2, seed=0), cfg, optimizer=lambda p: torch.optim.AdamW(p, lr=1e-2))
    run(engine, x[:2], y[:2])
    engine.save_checkpoint(ckpt_dir, tag="t2")
    after = run(engine, x[2:], y[2:])
    engine2 = build_engine(Toy(ep_size=2, seed=99), cfg, optimizer=lambda p: torch.optim.AdamW(p, lr=1e-2))
    engine2.load_checkpoint(ckpt_dir, tag="t2")
    resumed = run(engine2, x[2:], y[2:])
    folder = os.path.join(ckpt_dir, "t2")
    for name in sorted(os.listdir(folder)):  # every file DeepSpeed wrote, on every rank
        safe_load(os.path.join(folder, name))
    return after, resumed, sorted(os.listdir(folder))


@pytest.mark.parametrize("bf16", [False, True], ids=["fp32", "bf16"])
@pytest.mark.parametrize("stage", [0, 1, 2], ids=lambda s: f"zero{s}")
def test_every_file_deepspeed_writes_loads_with_weights_only_and_resumes_exactly(pool, tmp_path, stage, bf16):
    for after, resumed, files in pool.run(safe_roundtrip, stage, bf16, str(tmp_path)):
        assert resumed == after
        assert any("optim_states" in f for f in files) and any("expert" in f for f in files), files
