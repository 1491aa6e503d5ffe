"""The switch to packed storage inside a run (engine/packing.py) and the checks on packed checkpoints."""
import gc
import weakref

import pytest
import torch

from padnet_ds.commit import write_tag
from padnet_ds.engine import optim_state
from padnet_ds.engine.packing import check_packed_checkpoint, switch_to_packed
from padnet_ds.engine.setup import build_engine
from padnet_ds.pad.packed import dense_sources
from padnet_ds.settings import ConfigError
from tests.checkpoints import resign
from tests.distributed.toy import Toy, batches, ds_config

ROWS = 4


def steps(engine, xs, ys):
    out = []
    for xb, yb in zip(xs, ys):
        pred, aux = engine(xb.to(engine.module.inp.weight.dtype))
        loss = torch.nn.functional.mse_loss(pred.float(), yb) + 0.01 * aux.float()
        engine.backward(loss)
        engine.step()
        out.append(loss.item())
    return out


def run(configs, switch_at, total):
    """Each (stage, bf16): losses of a run that packs after ``switch_at`` steps and of one that never does."""
    x, y = batches(total, ROWS, seed=torch.distributed.get_rank())
    results = {}
    for stage, bf16 in configs:
        out = {}
        for packs in (True, False):
            model = Toy(ep_size=2, dynamic=0.5)

            def build(model=model):  # AdamW with weight decay and a decaying learning rate, as a run has
                return build_engine(model, ds_config(stage, ROWS, bf16=bf16, clip=1.0), weight_decay=0.01,
                                    optimizer=lambda g: torch.optim.AdamW(g, lr=1e-2),
                                    lr_scheduler=lambda o: torch.optim.lr_scheduler.LambdaLR(o, lambda s: 0.9 ** s))

            engine = build()
            losses = steps(engine, x[:switch_at], y[:switch_at])
            gone = None
            if packs:
                dense = {n: p.detach().float().clone() for n, p in model.named_parameters()}
                before = weakref.ref(engine)
                engine = switch_to_packed(engine, build)
                gc.collect()
                gone = before() is None
                sources = dense_sources(model)
                kept = all(torch.equal(p.detach().float(), s.take(dense[s.name]).to(p.dtype).float())
                           for n, p in model.named_parameters() if (s := sources.get(n)) is not None)
                out["checks"] = dict(gone=gone, kept=kept, packed=model.moe.packed, lr=engine.get_lr(),
                                     step=optim_state.step_count(engine), global_steps=engine.global_steps)
            losses += steps(engine, x[switch_at:], y[switch_at:])
            out["packed" if packs else "dense"] = losses
            if not packs:
                out["dense_lr"], out["dense_step"] = engine.get_lr(), optim_state.step_count(engine)
        results[(stage, bf16)] = out
    return results


def test_switch_to_packed_mid_run_loses_nothing(pool):
    configs = [(0, False), (1, False), (2, False), (2, True)]
    for res in pool.run(run, configs, 3, 6):
        for cfg, r in res.items():
            c = r["checks"]
            assert c["packed"] and c["kept"], cfg
            assert c["gone"], f"{cfg}: the dense engine is still alive after the switch"
            assert c["step"] == 3 and c["global_steps"] == 3, cfg
            torch.testing.assert_close(r["packed"], r["dense"], rtol=1e-5, atol=1e-6, msg=f"{cfg}")
            assert r["dense_step"] == 6


def write_packed_checkpoint(folder):
    model = Toy(ep_size=2, dynamic=0.5)
    model.moe.pack()
    engine = build_engine(model, ds_config(2, ROWS), optimizer=lambda g: torch.optim.AdamW(g, lr=1e-2))
    x, y = batches(1, ROWS)
    steps(engine, x, y)
    with write_tag(folder, "step1") as stage:
        engine.save_checkpoint(folder, tag=stage.dir.name, save_latest=False)


def test_a_checkpoint_whose_packed_values_miss_their_mask_is_refused_and_left_alone(pool, tmp_path):
    from padnet_ds.engine.checkpoint_reader import read_checkpoint

    pool.run(write_packed_checkpoint, str(tmp_path / "checkpoints"))
    expert_file = tmp_path / "checkpoints" / "step1" / "layer_0_expert_2_mp_rank_00_model_states.pt"
    check_packed_checkpoint(read_checkpoint(str(tmp_path)))  # intact: no error
    state = torch.load(expert_file, weights_only=False)
    key = next(k for k in state if k.endswith("2.fc1.values"))
    state[key] = state[key][:-3]
    torch.save(state, expert_file)
    resign(expert_file.parent, expert_file.name)
    damaged = expert_file.read_bytes()
    with pytest.raises(ConfigError, match=rf"{key} holds {state[key].numel()} packed values but its mask "
                                          rf"\(moe\.pad\.fc1\.positions\) has {state[key].numel() + 3} dynamic"):
        check_packed_checkpoint(read_checkpoint(str(tmp_path)))
    assert expert_file.read_bytes() == damaged
