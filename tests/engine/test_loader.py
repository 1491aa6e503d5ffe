"""Optimizer steps over the training rows: global batches fixed by the seed and the step whatever the number of
ranks, whole steps only, the epoch position, padding to the global batch's longest row, exact resume mid-epoch."""
import itertools

import pytest
import torch
from torch.utils.data import DistributedSampler

from padnet_ds.data.encode import pad_to_length
from padnet_ds.engine.config import load_config
from padnet_ds.engine.loader import GlobalBatches, ScoringBatches, optimizer_steps, train_batches
from padnet_ds.engine.state import LoopState
from padnet_ds.engine.tasks import Task
from padnet_ds.settings import ConfigError


def rows_task(n, lengths=None):
    """Rows 0..n-1; with ``lengths``, text-like rows of those lengths padded per step like the text task."""
    if lengths is None:
        data = [{"x": torch.tensor([i])} for i in range(n)]
        return Task(name="rows", model=torch.nn.Identity(), train_set=data, eval_set=data,
                    collate=lambda items: {"x": torch.cat([it["x"] for it in items])},
                    metrics=lambda p, g: {}, main_metric="accuracy")
    data = [{"input_ids": torch.full((lengths[i],), i), "labels": torch.tensor(i)} for i in range(n)]
    return Task(name="text", model=torch.nn.Identity(), train_set=data, eval_set=data,
                collate=lambda items, pad_to=None: pad_to_length(items, 64, -1, pad_to),
                metrics=lambda p, g: {}, main_metric="accuracy",
                step_length=lambda rows: min(64, -(-max(lengths[i] for i in rows) // 8) * 8))


def ids(batch):
    return batch["x"].tolist() if "x" in batch else batch["labels"].tolist()


def steps_of(task, n_steps, state=None, **layout):
    """Per step, per rank, the row ids of each micro-batch: [step][rank][micro] -> ids."""
    world = layout.pop("world")
    states = [LoopState(**(state or {})) for _ in range(world)]
    gens = [optimizer_steps(task, GlobalBatches(rows=len(task.train_set), world=world, rank=r, **layout), states[r])
            for r in range(world)]
    return [[[ids(b) for b in next(g)[1]] for g in gens] for _ in range(n_steps)], states


def test_global_batches_are_the_same_for_every_layout_with_the_same_global_batch():
    task = rows_task(100)
    ref, _ = steps_of(task, 8, world=2, micro=4, grad_accum=1, seed=5)
    for layout in (dict(world=1, micro=4, grad_accum=2), dict(world=4, micro=2, grad_accum=1),
                   dict(world=1, micro=8, grad_accum=1), dict(world=2, micro=2, grad_accum=2)):
        got, _ = steps_of(task, 8, **layout, seed=5)
        for s in range(8):  # the same 8 rows every step
            assert sorted(sum(sum(got[s], []), [])) == sorted(sum(sum(ref[s], []), [])), (layout, s)
    # world x grad_accum constant (micro 4): every micro-batch itself is the same
    one, _ = steps_of(task, 8, world=1, micro=4, grad_accum=2, seed=5)
    for s in range(8):
        assert sorted(map(tuple, one[s][0])) == sorted(tuple(r[0]) for r in ref[s])


def test_one_micro_batch_per_step_is_distributed_samplers_order():
    """Independent reference: torch's DistributedSampler, each rank's shard cut into micro-batches."""
    task = rows_task(50)
    got, _ = steps_of(task, 12, world=2, micro=3, grad_accum=1, seed=7)  # 8 steps per epoch: into epoch 2
    for r in range(2):
        sampler = DistributedSampler(range(50), num_replicas=2, rank=r, shuffle=True, seed=7, drop_last=True)
        expected = []
        for epoch in range(2):
            sampler.set_epoch(epoch)
            shard = list(sampler)
            expected += [shard[i:i + 3] for i in range(0, 8 * 3, 3)]
        assert [got[s][r][0] for s in range(12)] == expected[:12]


def test_steps_are_whole_and_positions_and_resume_mid_epoch_exact():
    task = rows_task(10)
    cfg = load_config(None, ["train.micro_batch_size=2", "train.grad_accum=2", "seed=3"])
    batches = train_batches(task, cfg, cfg.seed)  # one rank: 4 rows per step, 2 steps per epoch, 2 rows left over
    full = [(pos, [ids(b) for b in micro]) for pos, micro in itertools.islice(optimizer_steps(task, batches,
                                                                                                LoopState()), 6)]
    assert [pos for pos, _ in full] == [0.0, 0.5, 1.0, 1.5, 2.0, 2.5]  # steps of the epoch, not rows
    for epoch in range(3):
        rows = [i for _, micro in full[2 * epoch:2 * epoch + 2] for b in micro for i in b]
        assert len(set(rows)) == 8 and set(rows) <= set(range(10))
    assert full[0][1] != full[2][1], "the order is reshuffled per epoch"

    state = LoopState()
    first = optimizer_steps(task, batches, state)
    for _ in range(3):
        next(first)  # stop after 3 steps (epoch 1, 4 rows in), as a checkpoint would
    saved = state.state_dict()
    assert (saved["epoch"], saved["rows_in_epoch"]) == (1, 4)
    resumed = LoopState()
    resumed.load_state_dict(saved)
    again = [(pos, [ids(b) for b in micro]) for pos, micro in itertools.islice(optimizer_steps(task, batches,
                                                                                                 resumed), 3)]
    assert again == full[3:]


def test_a_resumed_run_on_another_number_of_ranks_continues_the_same_global_batches():
    task = rows_task(64)
    full, _ = steps_of(task, 10, world=2, micro=2, grad_accum=2, seed=1)  # 8 rows per step, 8 steps per epoch
    _, states = steps_of(task, 5, world=2, micro=2, grad_accum=2, seed=1)
    saved = states[0].state_dict()
    assert saved == states[1].state_dict(), "the loop position is the same on every rank"
    rest, _ = steps_of(task, 5, state=saved, world=4, micro=2, grad_accum=1, seed=1)
    for s in range(5):
        assert sorted(map(tuple, sum(rest[s], []))) == sorted(map(tuple, sum(full[5 + s], [])))


def test_text_micro_batches_are_padded_to_their_global_batchs_longest_row():
    lengths = [30 if i % 13 == 0 else 2 + i % 6 for i in range(40)]  # a few long rows: some steps pad to 32
    task = rows_task(40, lengths)
    shapes = {}  # step -> the lengths of its micro-batches, on every rank, at both layouts
    for world, accum in ((2, 1), (1, 2)):
        for r in range(world):
            gen = optimizer_steps(task, GlobalBatches(rows=40, micro=4, grad_accum=accum, world=world, rank=r, seed=2),
                                  LoopState())
            for s in range(5):
                _, micro = next(gen)
                for b in micro:
                    rows = b["labels"].tolist()
                    assert b["input_ids"].shape[1] >= max(lengths[i] for i in rows)
                    assert b["input_ids"].shape[1] % 8 == 0
                    shapes.setdefault(s, set()).add(b["input_ids"].shape[1])
    # the reference: every micro-batch of a step has one length
    assert all(len(v) == 1 for v in shapes.values())
    assert len({v.pop() for v in shapes.values()}) > 1, "lengths vary between steps (this data can tell)"


def test_scoring_batches_reiterate_the_same_epoch_and_a_too_large_global_batch_is_an_error():
    task = rows_task(20)
    batches = GlobalBatches(rows=20, micro=3, grad_accum=1, world=1, rank=0, seed=4)
    scoring = ScoringBatches(task, batches)
    first, second = [ids(b) for b in scoring], [ids(b) for b in scoring]
    assert first == second and len(first) == 6 and len({i for b in first for i in b}) == 18
    cfg = load_config(None, ["train.micro_batch_size=16", "train.grad_accum=2"])
    with pytest.raises(ConfigError, match="train.micro_batch_size=16 x train.grad_accum=2 = 32 rows"):
        train_batches(task, cfg, 0)


def test_loop_state_round_trip_and_best_eval():
    state = LoopState(step=7, history=[{"step": 5, "loss": 0.5}])
    state.record_eval({"accuracy": 0.6}, "accuracy")
    state.record_eval({"accuracy": 0.55}, "accuracy")
    assert state.best == {"accuracy": 0.6, "step": 7}
    other = LoopState()
    other.load_state_dict(dict(state.state_dict(), tag="step7"))  # older checkpoints also stored their tag
    assert other == state
    legacy = {k: v for k, v in state.state_dict().items() if k != "rows_in_epoch"}
    with pytest.raises(ValueError, match="batch_in_epoch"):
        LoopState().load_state_dict(dict(legacy, batch_in_epoch=3))
