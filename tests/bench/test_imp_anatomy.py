"""bench.imp_recovery's window analysis on scores whose answer is known (fast, no ranks)."""
import torch

from bench.imp_recovery import window_precisions


def test_window_precisions_tell_a_coherent_score_from_one_that_cancels():
    # 10 entries, the first 3 planted; 4 steps of per-step scores s_t.
    planted = torch.zeros(10, dtype=torch.bool)
    planted[:3] = True
    coherent = torch.full((4, 10), 0.1)
    coherent[:, :3] = 1.0  # planted entries: large and of one sign every step
    out = window_precisions(coherent, planted, 0.3, starts=(0,), lengths=(4, 8))
    assert list(out) == ["0+4"], "a window past the recorded steps is skipped"
    w = out["0+4"]
    assert w["abs_of_sum"] == 1.0 and w["sum_of_abs"] == 1.0
    assert w["coherence_planted"] == 1.0 and w["coherence_other"] == 1.0

    cancels = coherent.clone()
    cancels[1::2, :3] = -1.0  # planted entries flip sign every step: |sum| = 0, sum |.| stays large
    w = window_precisions(cancels, planted, 0.3, starts=(0,), lengths=(4,))["0+4"]
    assert w["abs_of_sum"] == 0.0 and w["sum_of_abs"] == 1.0
    assert w["coherence_planted"] == 0.0 and w["coherence_other"] == 1.0
