"""The filled-row dispatch at ep_size 2 on two real gloo ranks against DeepSpeed's padded one.

One group of ranks runs the whole grid (k, drop_tokens, routing, dropless, stock MoE); each
rank compares its own output and gradients (gate, its local experts, static weights, phi,
input) and reports every case's differences by name.
"""
import itertools

from padnet_ds.testing import run_ranks
from tests.moe.cases import differences, dropped_routes, fully_dynamic, like, pad_layer, plain_moe, run, steer, \
    tokens

EP = 2


def _grid():
    cases = []
    for k, drop, routing in itertools.product((1, 2), (True, False), ("random", "skewed")):
        cases.append((f"k={k} drop_tokens={drop} {routing}: filled vs padded", k, dict(drop_tokens=drop), routing))
    for k, routing in itertools.product((1, 2), ("random", "skewed")):
        cases.append((f"k={k} {routing}: dropless vs padded drop_tokens=False", k, dict(dropless=True), routing))
    for k, drop in itertools.product((1, 2), (True, False)):
        cases.append((f"k={k} drop_tokens={drop}: fully dynamic vs stock MoE", k, dict(drop_tokens=drop), "random"))
    return cases


def _rank_grid():
    import torch

    rank = torch.distributed.get_rank()
    report = {}
    for name, k, kw, routing in _grid():
        layer = pad_layer(k, EP, **kw)
        if "stock" in name:
            layer = fully_dynamic(layer)
            reference = plain_moe(layer)
        elif kw.get("dropless"):
            reference = like(layer, drop_tokens=False, dropless=False, dispatch="padded")
        else:
            reference = like(layer, dispatch="padded")
        for net in (layer, reference):
            net.set_deepspeed_parallelism()
            steer(net, routing)
        x = tokens(routing, rank, EP)
        got, want = run(layer, x), run(reference, x)
        counts = got["exp_counts"].tolist()
        report[name] = dict(problems=differences(got, want), dropped=dropped_routes(layer, x), counts=counts)
    return report


def test_two_ranks_filled_and_dropless_dispatch_equal_deepspeeds_padded_computation():
    reports = run_ranks(_rank_grid, 2, timeout=240)
    failures = [f"rank {r} [{case}] {p}" for r, rep in enumerate(reports) for case, res in rep.items()
                for p in res["problems"]]
    assert not failures, "\n".join(failures)
    # the grid exercises what it claims: drops, a rank sending the other nothing, an expert without tokens
    skewed = "k=2 drop_tokens=False skewed: filled vs padded"
    assert reports[0][skewed]["counts"][2:] == [0, 0], "rank 0 must send rank 1 nothing"
    assert all(rep[skewed]["counts"][3] == 0 for rep in reports), "expert 3 must receive nothing"
    assert sum(rep["k=2 drop_tokens=True random: filled vs padded"]["dropped"] for rep in reports) > 0
    assert all(rep["k=1 random: dropless vs padded drop_tokens=False"]["dropped"] == 0 for rep in reports)
