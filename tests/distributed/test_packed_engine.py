"""Packed PAD-MoE in the DeepSpeed engine on real gloo ranks: EP sharding, ZeRO 2, checkpoints."""
import os

import torch

from padnet_ds.comm import world_size
from padnet_ds.engine.setup import build_engine
from padnet_ds.testing import run_ranks
from tests.distributed.toy import (
    Toy,
    batches,
    ds_config,
    expert_state,
    replicated_state,
    train_steps,
)

ROWS = 4  # sequences per rank and step at 2 ranks


def adamw(params):
    return torch.optim.AdamW(params, lr=1e-2, weight_decay=0.0)


def train(ep_size, steps, clip, variants):
    """Each variant (dense / packed, same masks) trained on the same global batches."""
    world, rank = world_size(), torch.distributed.get_rank()
    per = 2 * ROWS // world
    x, y = batches(steps, 2 * ROWS)
    out = {}
    for variant in variants:
        model = Toy(ep_size=ep_size, dynamic=0.5)
        if variant == "packed":
            model.moe.pack()
        engine = build_engine(model, ds_config(2, per, clip=clip), optimizer=adamw)
        losses, norms = [], []
        for s in range(steps):
            # no l_aux: it is not additive over ranks (a product of per-rank token shares)
            pred, _ = engine(x[s, rank * per:(rank + 1) * per])
            loss = torch.nn.functional.mse_loss(pred, y[s, rank * per:(rank + 1) * per])
            engine.backward(loss)
            engine.step()
            losses.append(loss.item())
            norms.append(float(engine.get_global_grad_norm()))
        out[variant] = dict(losses=losses, norms=norms, experts=expert_state(model),
                            replicated=replicated_state(model), packed=model.moe.packed)
        del engine
    return out


def test_packed_two_ranks_ep2_zero2_equal_one_rank_and_the_dense_layer(pool):
    steps, clip = 4, 0.3
    r0, r1 = pool.run(train, 2, steps, clip, ("packed", "dense"))
    (single,) = run_ranks(train, 1, 1, steps, clip, ("packed",))
    p0, p1, ps = r0["packed"], r1["packed"], single["packed"]
    assert p0["packed"] and ps["packed"] and not r0["dense"]["packed"]
    assert set(p0["experts"]) == {0, 1} and set(p1["experts"]) == {2, 3}
    assert min(ps["norms"]) > clip, "clipping must be active for this test to mean anything"
    torch.testing.assert_close(p0["norms"], ps["norms"], rtol=1e-5, atol=1e-6)
    mean = [(a + b) / 2 for a, b in zip(p0["losses"], p1["losses"])]
    torch.testing.assert_close(mean, ps["losses"], rtol=1e-5, atol=1e-6)
    # packed and dense under the same masks and AdamW: same losses (Adam leaves the entries outside the mask at 0)
    torch.testing.assert_close(p0["losses"], r0["dense"]["losses"], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(p1["losses"], r1["dense"]["losses"], rtol=1e-5, atol=1e-6)
    assert any(n.endswith("static_values") for n in p0["replicated"])
    for name, t in p0["replicated"].items():
        assert torch.equal(t, p1["replicated"][name]), f"replicated {name} differs between ranks"
        torch.testing.assert_close(t, ps["replicated"][name], rtol=1e-4, atol=1e-5)
    for gid, params in {**p0["experts"], **p1["experts"]}.items():
        assert {"fc1.values", "fc2.values"} <= set(params)
        for name, t in params.items():
            torch.testing.assert_close(t, ps["experts"][gid][name], rtol=1e-4, atol=1e-5)
    start = Toy(dynamic=0.5)
    start.moe.pack()
    first = dict(start.named_parameters())
    for name in ("moe.pad.fc1.static_values", "moe.pad.fc2.phi"):
        assert not torch.allclose(p0["replicated"][name], first[name].detach()), f"{name} did not train"


def checkpoint_roundtrip(ckpt_dir):
    rank = torch.distributed.get_rank()
    x, y = batches(6, ROWS, seed=rank)
    cfg = ds_config(2, ROWS, clip=1.0)
    model = Toy(ep_size=2, dynamic=0.5)
    model.moe.pack()
    engine = build_engine(model, cfg, optimizer=adamw)
    train_steps(engine, x[:3], y[:3])
    engine.save_checkpoint(ckpt_dir, tag="step3")
    saved = dict(replicated=replicated_state(model), experts=expert_state(model))
    after = train_steps(engine, x[3:], y[3:])

    fresh = Toy(ep_size=2, dynamic=0.5)  # same masks (so the same packed sizes), values moved off
    fresh.moe.pack()
    with torch.no_grad():
        for p in fresh.parameters():
            p.add_(1.0)
    engine2 = build_engine(fresh, cfg, optimizer=adamw)
    engine2.load_checkpoint(ckpt_dir, tag="step3")
    loaded = dict(replicated=replicated_state(fresh), experts=expert_state(fresh))
    resumed = train_steps(engine2, x[3:], y[3:])
    return dict(saved=saved, loaded=loaded, after=after, resumed=resumed,
                files=sorted(os.listdir(os.path.join(ckpt_dir, "step3"))),
                dynamic={u.name: u.positions.numel() for u in model.moe.pad_units()})


def test_packed_checkpoint_round_trips_exactly_with_one_file_per_expert(pool, tmp_path):
    results = pool.run(checkpoint_roundtrip, str(tmp_path))
    for res in results:
        for name, t in res["saved"]["replicated"].items():
            assert torch.equal(t, res["loaded"]["replicated"][name]), name
        for gid, params in res["saved"]["experts"].items():
            for name, t in params.items():
                assert torch.equal(t, res["loaded"]["experts"][gid][name]), f"expert {gid} {name}"
        assert res["after"] == res["resumed"], "optimizer state must resume bit-identically"
    files = [f for f in results[0]["files"] if "expert" in f]
    assert files == [f"layer_0_expert_{i}_mp_rank_00_model_states.pt" for i in range(4)]
    dynamic = results[0]["dynamic"]
    for i, f in enumerate(files):
        state = torch.load(os.path.join(tmp_path, "step3", f), map_location="cpu", weights_only=False)
        values = {k.rpartition(".deepspeed_experts.")[2]: v for k, v in state.items() if k.endswith(".values")}
        assert {k: v.numel() for k, v in values.items()} == {f"{i}.fc1.values": dynamic["fc1"],
                                                             f"{i}.fc2.values": dynamic["fc2"]}
        assert not any(k.endswith(".weight") for k in state), "a packed expert file holds no dense weight"
