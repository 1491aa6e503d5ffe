"""engine.optim_files: a checkpoint's optimizer state read from DeepSpeed's files alone (no process group), checked
against the live engine's own whole-parameter state (engine.optim_state, DeepSpeed's safe_get_full_*), for ZeRO
0/1/2, fp32 and bf16, ep_size 1 and 2; the portable files round trip; damaged and missing shards."""
from pathlib import Path

import pytest
import torch

from padnet_ds.engine import optim_state
from padnet_ds.engine.checkpoint_reader import MODEL_STATES
from padnet_ds.engine.layout import LAYOUT_KEY, Layout, global_names, of_engine
from padnet_ds.errors import CheckpointError
from padnet_ds.files import safe_load
from padnet_ds.engine.optim_files import OptimizerState, read_deepspeed, read_portable, write_portable, zero_file
from padnet_ds.engine.setup import build_engine
from tests.distributed.toy import Toy, batches, ds_config

LAYOUTS = [(2, 2, False), (2, 1, False), (1, 2, False), (0, 2, False), (0, 1, False), (2, 2, True), (0, 2, True)]


def train_and_save(root, stage, ep, bf16):
    """3 AdamW steps, a checkpoint with the layout record; returns this rank's live state by global name."""
    import torch.distributed as dist

    cfg = ds_config(stage, 4, bf16=bf16, clip=1.0)
    engine = build_engine(Toy(ep_size=ep, dynamic=0.5), cfg,
                          optimizer=lambda p: torch.optim.AdamW(p, lr=1e-2, weight_decay=0.01))
    x, y = batches(3, 4, seed=dist.get_rank())
    for xb, yb in zip(x, y):
        pred, aux = engine(xb.to(engine.module.inp.weight.dtype))
        engine.backward(torch.nn.functional.mse_loss(pred.float(), yb) + 0.01 * aux.float())
        engine.step()
    names = global_names(engine.module)
    live = optim_state.read_all(engine, dict(engine.module.named_parameters()))
    tag = f"s{stage}ep{ep}{'bf16' if bf16 else ''}"
    engine.save_checkpoint(root, tag=tag, client_state={LAYOUT_KEY: of_engine(engine).to_record()})
    return {names[n]: s for n, s in live.items()}, optim_state.step_count(engine)


def read_offline(tag_dir):
    states = safe_load(Path(tag_dir) / MODEL_STATES)
    layout = Layout.from_record(states[LAYOUT_KEY])
    weights = {}
    for f in Path(tag_dir).glob("layer_*_expert_*_model_states.pt"):
        weights.update(safe_load(f))
    weights.update(states["module"])
    return read_deepspeed(Path(tag_dir), states, layout, weights), layout


def live_states(root):
    return {lay: train_and_save(root, *lay) for lay in LAYOUTS}


def test_deepspeeds_optimizer_files_read_offline_equal_the_live_engines_state(pool, tmp_path):
    ranks = pool.run(live_states, str(tmp_path))
    for stage, ep, bf16 in LAYOUTS:
        live = {**ranks[0][(stage, ep, bf16)][0], **ranks[1][(stage, ep, bf16)][0]}  # both ranks' experts
        step = ranks[0][(stage, ep, bf16)][1]
        got, layout = read_offline(tmp_path / f"s{stage}ep{ep}{'bf16' if bf16 else ''}")
        assert layout.world_size == 2 and set(layout.ep_size.values()) == {ep} and layout.zero_stage == stage
        assert got.keys == ["exp_avg", "exp_avg_sq"] and got.step == step
        assert sorted(got.params) == sorted(live), (stage, ep, bf16)
        experts = [n for n in live if ".deepspeed_experts." in n]
        assert {n.split(".deepspeed_experts.")[1].split(".")[0] for n in experts} == {"0", "1", "2", "3"}
        for name, ref in live.items():
            mine = got.params[name]
            assert torch.equal(mine.fp32, ref.fp32), (stage, ep, bf16, name)
            for k in got.keys:
                assert torch.equal(mine.moments[k], ref.moments[k]), (stage, ep, bf16, name, k)


def test_portable_files_round_trip_and_read_only_what_is_asked(tmp_path):
    gen = torch.Generator().manual_seed(0)
    opt = OptimizerState(step=7, keys=["exp_avg", "exp_avg_sq"], params={
        name: optim_state.ParamState(torch.randn(3, 2, generator=gen),
                                     {"exp_avg": torch.randn(3, 2, generator=gen),
                                      "exp_avg_sq": torch.rand(3, 2, generator=gen)})
        for name in ["a.weight", "m.deepspeed_moe.experts.deepspeed_experts.0.fc1.weight",
                     "m.deepspeed_moe.experts.deepspeed_experts.3.fc1.weight"]})
    files = write_portable(tmp_path, opt)
    assert sorted(f.name for f in files) == ["padnet_optim_m_expert_0.safetensors",
                                             "padnet_optim_m_expert_3.safetensors",
                                             "padnet_optim_replicated.safetensors"]
    some = ["a.weight", "m.deepspeed_moe.experts.deepspeed_experts.3.fc1.weight"]
    back = read_portable(tmp_path, some)
    assert back.step == 7 and back.keys == opt.keys and sorted(back.params) == some
    for n in some:
        assert torch.equal(back.params[n].fp32, opt.params[n].fp32)
        assert all(torch.equal(back.params[n].moments[k], opt.params[n].moments[k]) for k in opt.keys)
    (tmp_path / "padnet_optim_m_expert_3.safetensors").write_bytes(b"\0" * 10)
    with pytest.raises(CheckpointError, match="padnet_optim_m_expert_3.safetensors cannot be read"):
        read_portable(tmp_path, some)


def test_a_missing_or_truncated_zero_shard_is_named(pool, tmp_path):
    pool.run(train_and_save, str(tmp_path), 2, 2, False)
    tag = tmp_path / "s2ep2"
    shard = zero_file(tag, 1, False)
    data = shard.read_bytes()
    shard.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="zero_pp_rank_1_mp_rank_00_optim_states.pt is damaged"):
        read_offline(tag)
    shard.unlink()
    with pytest.raises(CheckpointError, match="lacks the optimizer shard zero_pp_rank_1_mp_rank_00_optim_states.pt"):
        read_offline(tag)
