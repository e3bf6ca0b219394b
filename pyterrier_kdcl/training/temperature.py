"""The teacher temperature that makes a teacher's softmax over a group a calibrated guess of the positive.

Teachers differ in score scale: a bi-encoder's cosines lie in [-1, 1], so ``softmax(t / 2)`` over a group is
nearly uniform and distillation learns almost nothing; a cross-encoder's logits span tens, so the same
temperature gives a near one-hot target. :func:`fit_temperature` picks ``T`` minimising the mean negative
log-likelihood of the labelled positives under ``softmax(t / T)`` over judged groups, the standard temperature
scaling of Guo et al. (2017, "On Calibration of Modern Neural Networks"); the fitted target is then as sure of
itself as the teacher is right. Fit it on held-out groups: on the teacher's own training queries it would be
overconfident.
"""

from __future__ import annotations

import math

import numpy as np
from scipy.optimize import minimize_scalar
from scipy.special import logsumexp

BOUNDS = (1e-3, 1e3)
_NLL_CAP = 1e6  # a finite stand-in for an impossible positive, so the minimiser never sees inf


def fit_temperature(teacher_scores: np.ndarray, labels: np.ndarray) -> float:
    """``T`` in [1e-3, 1e3] minimising ``-log sum_{j: label_j > 0} softmax(t / T)_j`` averaged over rows.

    Args:
        teacher_scores: ``(n, G)`` teacher scores of ``n`` groups of ``G`` documents; ``-inf`` marks an empty
            slot of a shorter group (it takes no probability).
        labels: ``(n, G)`` relevance labels; rows without a positive are ignored.

    A teacher whose top document is the positive half the time is no better than uniform: the fit runs to the
    upper bound.

    >>> round(fit_temperature(np.array([[2.0, 0.0], [0.0, 2.0]]), np.array([[1, 0], [1, 0]])))
    1000
    """
    scores = np.asarray(teacher_scores, dtype="float64")
    positive = np.asarray(labels) > 0
    if scores.shape != positive.shape or scores.ndim != 2:
        raise ValueError(f"teacher_scores and labels must be (n, G) arrays of one shape, got {scores.shape} and "
                         f"{positive.shape}")
    keep = positive.any(axis=1)
    if not keep.any():
        raise ValueError("fitting a teacher temperature needs groups with a labelled positive; none were given")
    scores, positive = scores[keep], positive[keep]
    if np.isnan(scores).any() or np.isposinf(scores).any() or not np.isfinite(scores).any(axis=1).all():
        raise ValueError("teacher scores must be finite (or -inf for an empty slot) to fit a temperature")

    def nll(log_t: float) -> float:
        z = scores / math.exp(log_t)
        # log-sum-exp in both terms: a positive far below the top keeps a finite log-probability at small T
        log_norm = logsumexp(z, axis=1)
        with np.errstate(divide="ignore"):  # a row whose positives all sit in empty (-inf) slots
            log_pos = logsumexp(np.where(positive, z, -np.inf), axis=1)
        return float(np.minimum(log_norm - log_pos, _NLL_CAP).mean())

    lo, hi = map(math.log, BOUNDS)
    result = minimize_scalar(nll, bounds=(lo, hi), method="bounded", options={"xatol": 1e-4})
    return float(min(max(math.exp(result.x), BOUNDS[0]), BOUNDS[1]))
