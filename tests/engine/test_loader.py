"""Optimizer steps over the training rows: whole steps only, the epoch position, exact resume mid-epoch."""
import itertools

import torch

from padnet_ds.engine.config import load_config
from padnet_ds.engine.loader import optimizer_steps, train_loader
from padnet_ds.engine.state import LoopState
from padnet_ds.engine.tasks import Task


def rows_task(n):
    data = [{"x": torch.tensor([i])} for i in range(n)]
    return Task(name="rows", model=torch.nn.Identity(), train_set=data, eval_set=data,
                collate=lambda items: {"x": torch.cat([it["x"] for it in items])},
                metrics=lambda p, g: {}, main_metric="accuracy")


def take(steps, n):
    """n steps as (epoch position, [row ids of each micro-batch])."""
    return [(pos, [b["x"].tolist() for b in micro]) for pos, micro in itertools.islice(steps, n)]


def test_steps_are_whole_groups_of_micro_batches_and_resume_exactly():
    cfg = load_config(None, ["train.micro_batch_size=2", "train.grad_accum=2", "seed=3"])
    loader = train_loader(rows_task(10), cfg, cfg.seed)  # 5 micro-batches per epoch: 2 steps, 1 left over
    full = take(optimizer_steps(loader, 2, LoopState()), 6)
    assert [pos for pos, _ in full] == [0.0, 0.4, 1.0, 1.4, 2.0, 2.4]
    assert all(len(micro) == 2 and all(len(b) == 2 for b in micro) for _, micro in full)
    for epoch in range(3):  # each epoch a permutation, its trailing micro-batch skipped
        ids = [i for _, micro in full[2 * epoch: 2 * epoch + 2] for b in micro for i in b]
        assert len(set(ids)) == 8 and set(ids) <= set(range(10))
    assert full[0][1] != full[2][1], "the order is reshuffled per epoch"

    state = LoopState()
    first = optimizer_steps(loader, 2, state)
    take(first, 3)  # stop after 3 steps (epoch 1, 2 micro-batches in), as a checkpoint would
    saved = state.state_dict()
    assert (saved["epoch"], saved["batch_in_epoch"]) == (1, 2)
    resumed = LoopState()
    resumed.load_state_dict(saved)
    assert take(optimizer_steps(train_loader(rows_task(10), cfg, cfg.seed), 2, resumed), 3) == full[3:]


def test_loop_state_round_trip_and_best_eval():
    state = LoopState(step=7, history=[{"step": 5, "loss": 0.5}])
    state.record_eval({"accuracy": 0.6}, "accuracy")
    state.record_eval({"accuracy": 0.55}, "accuracy")
    assert state.best == {"accuracy": 0.6, "step": 7}
    other = LoopState()
    other.load_state_dict(dict(state.state_dict(), tag="step7"))  # older checkpoints also stored their tag
    assert other == state
