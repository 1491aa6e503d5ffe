"""GLUE's official metrics (and the same names for other text tasks), via scikit-learn / scipy."""
from __future__ import annotations

import warnings

import numpy as np
from scipy.stats import pearsonr, spearmanr
from sklearn.metrics import accuracy_score, f1_score, matthews_corrcoef


def _corr(fn):
    def metric(pred, gold):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # constant input: scipy warns and returns nan
            r = fn(pred, gold)[0]
        # A constant prediction has no correlation: 0.0 (as sklearn's MCC does), so that
        # "best checkpoint" comparisons never see nan.
        return 0.0 if np.isnan(r) else float(r)
    return metric


METRICS = {
    "accuracy": lambda pred, gold: float(accuracy_score(gold, pred)),
    "f1": lambda pred, gold: float(f1_score(gold, pred)),  # binary, positive class = id 1
    "mcc": lambda pred, gold: float(matthews_corrcoef(gold, pred)),
    "pearson": _corr(pearsonr),
    "spearman": _corr(spearmanr),
}


def compute_metrics(spec, predictions, labels) -> dict[str, float]:
    """Every metric of `spec.metrics`, by name.

    predictions: class ids, or logits of shape (N, num_labels) (argmax taken); floats of shape
    (N,) or (N, 1) for regression. labels: ids or floats, shape (N,).
    """
    pred = np.asarray(predictions)
    gold = np.asarray(labels).reshape(-1)
    if spec.is_regression:
        pred = pred.reshape(-1).astype(np.float64)
        gold = gold.astype(np.float64)
    elif pred.ndim == 2:
        pred = pred.argmax(axis=-1)
    if pred.shape != gold.shape:
        raise ValueError(f"{len(pred)} predictions for {len(gold)} labels (shapes {pred.shape}, {gold.shape})")
    if len(gold) == 0:
        raise ValueError("no predictions to score")
    unknown = [m for m in spec.metrics if m not in METRICS]
    if unknown:
        raise ValueError(f"unknown metric(s) {unknown} in task {spec.name!r}; known: {list(METRICS)}")
    return {m: METRICS[m](pred, gold) for m in spec.metrics}


def trivial_baseline(metric: str, is_regression: bool, train_labels, eval_labels) -> float:
    """``metric`` on the eval split for a constant prediction: the eval split's majority class
    (classification; ties: the lowest id), or the mean of the training labels (regression).

    A model that does not beat this has learned nothing a constant could not do; with a
    correlation metric the constant scores 0.
    """
    gold = np.asarray(eval_labels).reshape(-1)
    if len(gold) == 0:
        raise ValueError("no eval labels to score a baseline on")
    if metric not in METRICS:
        raise ValueError(f"unknown metric {metric!r}; known: {list(METRICS)}")
    if is_regression:
        gold = gold.astype(np.float64)
        pred = np.full(len(gold), float(np.mean(np.asarray(train_labels, dtype=np.float64))))
    else:
        values, counts = np.unique(gold, return_counts=True)
        pred = np.full(len(gold), values[np.argmax(counts)])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # f1 of a constant negative prediction: sklearn warns and returns 0
        return METRICS[metric](pred, gold)
