"""The teacher temperature that makes a teacher's softmax over a group a calibrated guess of the positive.

Teachers differ in score scale: a bi-encoder's cosines lie in [-1, 1], so ``softmax(t / 2)`` over a group is
nearly uniform and distillation learns almost nothing; a cross-encoder's logits span tens, so the same
temperature gives a near one-hot target. :func:`fit_temperature` picks ``T`` minimising the mean negative
log-likelihood of the labelled positives under ``softmax(t / T)`` over judged groups, the standard temperature
scaling of Guo et al. (2017, "On Calibration of Modern Neural Networks"); the fitted target is then as sure of
itself as the teacher is right. Fit it on held-out groups: on the teacher's own training queries it would be
overconfident. :func:`fit_teacher_temperature` does it from PyTerrier frames (a teacher, a result frame with text and
its qrels); ``DistillationTrainer(teacher_temperature="auto")`` calls it on the validation frames of its fit.
"""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
from scipy.optimize import minimize_scalar
from scipy.special import logsumexp

BOUNDS = (1e-3, 1e3)
NEAR_UNIFORM = 0.99  # a softened target whose entropy is above this share of log(G) teaches almost nothing
_NLL_CAP = 1e6  # a finite stand-in for an impossible positive, so the minimiser never sees inf


def fit_temperature(teacher_scores: np.ndarray, labels: np.ndarray) -> float:
    """``T`` in [1e-3, 1e3] minimising ``-log sum_{j: label_j > 0} softmax(t / T)_j`` averaged over rows.

    Args:
        teacher_scores: ``(n, G)`` teacher scores of ``n`` groups of ``G`` documents; ``-inf`` marks an empty
            slot of a shorter group (it takes no probability).
        labels: ``(n, G)`` relevance labels; rows without a positive are ignored.

    The fit runs to the upper bound (a uniform target) exactly when the teacher is no better than uniform: when its
    positives score, averaged over the groups, no higher than their group's mean score (the NLL is convex in
    ``1/T`` with slope ``mean(group mean - positives' mean)`` at ``1/T = 0``). For groups of 2 that is a teacher
    that puts the positive on top half the time, by equal margins (below); in larger groups a teacher that is right
    half the time beats uniform (right ``1/G`` of the time) and gets a finite temperature.

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


def fit_teacher_temperature(teacher, res: pd.DataFrame, qrels: pd.DataFrame) -> dict:
    """Scores every candidate of ``res`` with ``teacher`` and fits :func:`fit_temperature` over each query's
    candidates (queries whose candidates hold no positive are left out).

    Args:
        teacher: any transformer that scores the rows it is given.
        res: held-out candidates with text (qid, query, docno, text; a ``score`` column is passed on as
            ``first_stage_score``, for a fused teacher's first-stage member).
        qrels: their judgements (qid, docno, label).

    Returns the temperature and its inputs: ``{"temperature", "queries", "depth", "score_sd_within_query"}``.

    Example::

        t = fit_teacher_temperature(teacher, (bm25 >> text)(dev.get_topics()), dev.get_qrels())["temperature"]
        kd = kdcl.DistillationTrainer(student, teacher, teacher_temperature=t)
    """
    frame = res[["qid", "query", "docno", "text"]].astype({"qid": str, "docno": str})
    if "score" in res.columns:  # for a fused teacher's first-stage member (other teachers ignore it)
        frame = frame.assign(first_stage_score=res["score"].to_numpy())
    scored = teacher(frame)[["qid", "docno", "score"]].astype({"qid": str, "docno": str})
    positives = qrels[qrels["label"] > 0].astype({"qid": str, "docno": str})
    scored = scored.assign(label=scored.set_index(["qid", "docno"]).index.isin(
        positives.set_index(["qid", "docno"]).index).astype(int))
    depth = int(scored.groupby("qid").size().max())
    rows, labels = [], []
    for _, group in scored.groupby("qid"):
        if group["label"].any():  # pad short lists with -inf scores: they take no probability
            pad = depth - len(group)
            rows.append(np.concatenate([group["score"].to_numpy(dtype="float64"), np.full(pad, -np.inf)]))
            labels.append(np.concatenate([group["label"].to_numpy(), np.zeros(pad, dtype=int)]))
    if not rows:
        raise ValueError("teacher_temperature: auto needs validation queries whose candidates hold a judged "
                         "positive; none do (raise validation.depth or give more validation queries)")
    scores, labels = np.stack(rows), np.stack(labels)
    temperature = fit_temperature(scores, labels)
    finite = np.where(np.isfinite(scores), scores, np.nan)
    return {"temperature": temperature, "queries": len(rows), "depth": depth,
            "score_sd_within_query": float(np.nanmean(np.nanstd(finite, axis=1)))}


def uniformity(teacher_scores: np.ndarray, temperature: float) -> float:
    """Mean entropy of ``softmax(t / T)`` over the rows, as a share of ``log G``: 1 is uniform (a target that
    teaches nothing), 0 one-hot."""
    z = np.asarray(teacher_scores, dtype="float64") / temperature
    log_p = z - logsumexp(z, axis=1, keepdims=True)
    entropy = -(np.exp(log_p) * log_p).sum(axis=1)
    return float(entropy.mean() / math.log(z.shape[1])) if z.shape[1] > 1 else 0.0
