"""Official GLUE metrics: known values, hand-checked small cases, and the input forms accepted."""
import math

import numpy as np
import pytest
from scipy.stats import pearsonr, spearmanr

from padnet_ds.data import glue
from padnet_ds.data.metrics import compute_metrics
from padnet_ds.data.splits import TaskSpec


@pytest.mark.parametrize("name", sorted(glue.TASKS))
def test_perfect_predictions_score_one(name):
    spec = glue.task(name).spec
    gold = [0.5, 1.0, 4.2, 3.3] if spec.is_regression else [i % spec.num_labels for i in range(9)]
    scores = compute_metrics(spec, gold, gold)
    assert set(scores) == set(spec.metrics) and spec.main_metric in scores
    assert all(math.isclose(v, 1.0) for v in scores.values())


def test_binary_case_by_hand():
    # gold 1 0 0 0, pred 1 1 0 0: TP=1 FP=1 TN=2 FN=0
    gold, pred = [1, 0, 0, 0], [1, 1, 0, 0]
    assert compute_metrics(glue.task("mrpc").spec, pred, gold) == pytest.approx({"f1": 2 / 3, "accuracy": 0.75})
    mcc = (1 * 2 - 1 * 0) / math.sqrt((1 + 1) * (1 + 0) * (2 + 1) * (2 + 0))
    assert compute_metrics(glue.task("cola").spec, pred, gold) == pytest.approx({"mcc": mcc})


def test_regression_matches_scipy_and_accepts_column_predictions():
    gold, pred = [0.0, 1.0, 2.5, 4.0, 5.0], [0.3, 1.5, 2.0, 4.4, 4.1]
    scores = compute_metrics(glue.task("stsb").spec, np.array(pred)[:, None], gold)
    assert scores["pearson"] == pytest.approx(pearsonr(pred, gold)[0])
    assert scores["spearman"] == pytest.approx(spearmanr(pred, gold)[0]) and scores["spearman"] < 1.0
    assert compute_metrics(glue.task("stsb").spec, [2.0] * 5, gold) == {"pearson": 0.0, "spearman": 0.0}


def test_logits_are_argmaxed_for_classification():
    logits = np.array([[2.0, 0.1, 0.0], [0.0, 0.0, 3.0], [0.0, 1.0, 0.0]])
    assert compute_metrics(glue.task("mnli").spec, logits, [0, 2, 0]) == pytest.approx({"accuracy": 2 / 3})


def test_bad_inputs():
    spec = glue.task("sst2").spec
    with pytest.raises(ValueError, match="3 predictions for 2 labels"):
        compute_metrics(spec, [0, 1, 1], [0, 1])
    with pytest.raises(ValueError, match="no predictions"):
        compute_metrics(spec, [], [])
    with pytest.raises(ValueError, match=r"unknown metric\(s\) \['bleu'\]"):
        compute_metrics(TaskSpec("x", 2, False, ("bleu",), "bleu", ("a", "b")), [0], [0])


def test_trivial_baseline_is_a_constant_prediction_scored_with_the_metric():
    from padnet_ds.data.metrics import trivial_baseline

    gold = [1, 0, 1, 1, 2, 1, 0]  # majority class 1: 4 of 7
    assert trivial_baseline("accuracy", False, [0, 0, 0], gold) == pytest.approx(4 / 7)
    assert trivial_baseline("mcc", False, [], gold) == 0.0  # a constant has no correlation
    # binary, majority positive (3 of 5): precision 3/5, recall 1, F1 = 2 * 0.6 / 1.6
    assert trivial_baseline("f1", False, [], [1, 1, 0, 1, 0]) == pytest.approx(0.75)
    assert trivial_baseline("f1", False, [], [0, 0, 1]) == 0.0  # majority negative: nothing predicted positive
    assert trivial_baseline("accuracy", False, [], [2, 0, 0, 2]) == 0.5  # a tie: the lowest id
    # regression: the mean training label, constant, so correlations are 0
    assert trivial_baseline("pearson", True, [1.0, 2.0, 6.0], [0.5, 3.0, 4.0]) == 0.0
    assert trivial_baseline("spearman", True, [1.0, 2.0], [0.5, 3.0, 4.0]) == 0.0
    with pytest.raises(ValueError, match="unknown metric"):
        trivial_baseline("auc", False, [], gold)
