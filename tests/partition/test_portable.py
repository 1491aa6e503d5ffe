"""partition.portable: per-rank IMP sums of W ranks -> the global sums -> each rank's sums at W' ranks, such that
the global score a partition step computes (sync.global_imp_scores: sum over ranks / world) is unchanged."""
import torch

from padnet_ds.partition.portable import local_sums, portable_state

SHAPE = [3, 2]


def rank_state(rank, world, experts_per_rank, gen, scored=True):
    """A partitioner state_dict as rank ``rank`` of ``world`` writes it: a replicated site and a per-expert one."""
    experts = list(range(rank % 2 * experts_per_rank, (rank % 2 + 1) * experts_per_rank))  # ep_size 2
    sums = [[torch.randn(SHAPE, generator=gen) if scored else None],
            [torch.randn(SHAPE, generator=gen) for _ in experts]]
    return {"rank": rank, "world": world, "step": 1, "ratio": 0.7, "rng": torch.zeros(4, dtype=torch.uint8),
            "log": [{"step": 1}], "config": {}, "layout": [["a.pad.fc1", SHAPE, None], ["a.pad.fc2", SHAPE, experts]],
            "scores": {"sums": sums, "calls": 3 + rank, "skipped": 1, "diverged": [rank == 1, False]}}


def global_score(per_rank_sums, world, experts=None):
    """The reference: what sync.global_imp_scores computes from each rank's sums."""
    if experts is None:
        return sum(s[0] for s in per_rank_sums) / world
    out = torch.zeros([4, *SHAPE])
    for sums, ids in zip(per_rank_sums, experts):
        for s, e in zip(sums, ids):
            out[e] += s
    return out / world


def test_global_sums_carry_over_to_any_number_of_ranks():
    gen = torch.Generator().manual_seed(0)
    states = [rank_state(r, 4, 2, gen) for r in range(4)]  # 4 ranks, ep_size 2: experts {0,1} on ranks 0, 2
    portable = portable_state(states)
    rep_ref = global_score([s["scores"]["sums"][0] for s in states], 4)
    exp_ref = global_score([s["scores"]["sums"][1] for s in states], 4, [s["layout"][1][2] for s in states])
    torch.testing.assert_close(portable["scores"][0], rep_ref)
    torch.testing.assert_close(portable["scores"][1], exp_ref)
    assert portable["calls"] == 3 and portable["skipped"] == 4 and portable["diverged"] == [True, False]
    for new_world, ep in ((1, 1), (2, 2), (8, 4)):
        per_rank = 4 // ep
        rep, exp, ids = [], [], []
        for r in range(new_world):
            mine = list(range(r % ep * per_rank, (r % ep + 1) * per_rank))
            first_rep, first_exp = r == 0, r // ep == 0  # rank 0; expert-data-parallel rank 0
            rep.append(local_sums(portable["scores"][0], None, first_rep, new_world))
            exp.append(local_sums(portable["scores"][1], mine, first_exp, new_world))
            ids.append(mine)
        zeros = lambda sums: [[torch.zeros(SHAPE) if t is None else t for t in s] for s in sums]  # noqa: E731
        torch.testing.assert_close(global_score(zeros(rep), new_world), rep_ref)
        torch.testing.assert_close(global_score(zeros(exp), new_world, ids), exp_ref)


def test_nothing_scored_yet_stays_nothing():
    gen = torch.Generator().manual_seed(1)
    portable = portable_state([rank_state(r, 2, 2, gen, scored=False) for r in range(2)])
    assert portable["scores"][0] is None and portable["scores"][1] is not None
    assert local_sums(None, None, True, 3) == [None]
