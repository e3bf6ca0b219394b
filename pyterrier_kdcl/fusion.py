"""A weighted sum of several scorers' standardised scores: a teacher built from rerankers that already exist.

Scorers differ in scale (a bi-encoder's cosine lies in [-1, 1], a cross-encoder's logit spans tens), so each
member's scores are standardised with a mean and standard deviation *fitted once* on held-out candidates, never
per call: a row's fused score then depends on that row alone, whatever other rows share its call, so scores can
be cached and compared across calls. ``fit`` learns those statistics and the weights (a grid over the simplex
that maximises a measure on the judged queries it is given).

A member may be the first stage itself: :class:`FirstStageScore` reads the score the candidates arrived with. The
fusion hands its members that score as a ``first_stage_score`` column (from its input's ``score``, unless the
input carries ``first_stage_score`` already, as the distillation trainer's teacher frames do).

Example::

    from pyterrier_dr import SBertBiEncoder
    fused = kdcl.ScoreFusion({"bm25": FirstStageScore(),
                              "minilm": SBertBiEncoder(minilm_path).text_scorer(),
                              "mpnet": SBertBiEncoder(mpnet_path).text_scorer(),
                              "cross": trained_cross_encoder})
    (bm25 % 20 >> text >> fused).fit(dev_topics, dev_qrels)   # statistics and weights from dev
    teacher = fused                                             # any transformer can teach
"""

from __future__ import annotations

import itertools

import ir_measures
import numpy as np
import pandas as pd
import pyterrier as pt

_HELP_URL = "docs/guide.md#4-choose-a-teacher"
FIRST_STAGE_COLUMN = "first_stage_score"


class FirstStageScore(pt.Transformer):
    """A fusion member that scores each row with its first-stage score (BM25's, in ``bm25 >> text >> fused``).

    It reads the ``first_stage_score`` column, which :class:`ScoreFusion` fills from its input's ``score`` and the
    distillation trainer from its groups. It has no ``fingerprint()``: its scores depend on the first stage, not on
    itself, so a fusion holding it caches its scores under a key the user (or the experiment) names.
    """

    schematic = {"label": "FirstStageScore", "help_url": _HELP_URL}

    def __init__(self):  # no settings (pt.inspect reads a transformer's settings from its __init__)
        super().__init__()

    def transform(self, inp: pd.DataFrame) -> pd.DataFrame:
        if FIRST_STAGE_COLUMN not in inp.columns:
            raise ValueError(f"FirstStageScore reads the candidates' first-stage score from a {FIRST_STAGE_COLUMN!r} "
                             f"column, and this frame (columns {list(inp.columns)}) has none: use it as a member of "
                             "ScoreFusion fed with the first stage's result frame (bm25 >> text >> fused), whose "
                             "'score' the fusion passes on, or train with a frame that keeps the first stage's "
                             "'score' column")
        return inp.assign(score=inp[FIRST_STAGE_COLUMN].astype("float64"))

    def __repr__(self) -> str:
        return "FirstStageScore()"


class ScoreFusion(pt.Estimator):
    """``score = sum_i w_i (s_i - mean_i) / std_i`` over named scorers; statistics and weights from ``fit``.

    Args:
        scorers: name -> transformer that scores the rows it is given (a reranker, not a retriever).
        weights: name -> weight; ``None`` until ``fit`` (or give them and ``stats`` to use the fusion unfitted).
        stats: name -> ``(mean, std)`` of that scorer's scores; ``None`` until ``fit``.
        metric: the ir_measures name ``fit`` maximises.
        grid_step: spacing of the weight grid (weights are multiples of it and sum to 1).
    """

    schematic = {"label": "ScoreFusion", "help_url": _HELP_URL}

    def __init__(self, scorers: dict[str, pt.Transformer], weights: dict[str, float] | None = None,
                 stats: dict[str, tuple[float, float]] | None = None, *, metric: str = "nDCG@10",
                 grid_step: float = 0.1):
        if not scorers:
            raise ValueError("ScoreFusion needs at least one scorer")
        problem = grid_step_problem(grid_step)
        if problem is not None:
            raise ValueError(f"grid_step {problem}")
        self.scorers = dict(scorers)
        self.weights = None if weights is None else {k: float(weights[k]) for k in self.scorers}
        self.stats = None if stats is None else {k: tuple(map(float, stats[k])) for k in self.scorers}
        self.metric = metric
        self.grid_step = grid_step

    # -- scoring ---------------------------------------------------------------------------------------------
    def member_scores(self, inp: pd.DataFrame) -> pd.DataFrame:
        """One column per scorer, aligned with ``inp``'s rows (joined back by qid and docno). Each scorer sees the
        input without its ``score`` and ``rank``; that score travels as ``first_stage_score``."""
        keys = inp[["qid", "docno"]].astype(str)
        given = inp.drop(columns=["score", "rank"], errors="ignore")
        if "score" in inp.columns and FIRST_STAGE_COLUMN not in inp.columns:
            given = given.assign(**{FIRST_STAGE_COLUMN: inp["score"]})
        columns = {}
        for name, scorer in self.scorers.items():
            out = scorer(given)
            scored = out[["qid", "docno"]].astype(str).assign(score=out["score"].to_numpy(dtype="float64"))
            columns[name] = keys.merge(scored.drop_duplicates(["qid", "docno"]), on=["qid", "docno"],
                                       how="left")["score"].to_numpy()
            if np.isnan(columns[name]).any():
                raise ValueError(f"scorer {name!r} did not score every row it was given")
        return pd.DataFrame(columns, index=inp.index)

    def transform(self, inp: pd.DataFrame) -> pd.DataFrame:
        pt.validate.result_frame(inp, extra_columns=["query"])
        if self.weights is None or self.stats is None:
            raise RuntimeError("ScoreFusion is not fitted: call fit(res, qrels) on held-out judged candidates, "
                               "or pass weights= and stats=")
        out = inp.drop(columns=["score", "rank"], errors="ignore").copy()
        out["score"] = self._fuse(self.member_scores(inp), self.weights) if len(inp) else pd.Series(dtype="float64")
        return pt.model.add_ranks(out)

    def _fuse(self, members: pd.DataFrame, weights: dict[str, float]) -> np.ndarray:
        total = np.zeros(len(members))
        for name, weight in weights.items():
            mean, std = self.stats[name]
            total += weight * (members[name].to_numpy() - mean) / std
        return total

    # -- fitting ---------------------------------------------------------------------------------------------
    def fit_statistics(self, res: pd.DataFrame) -> pd.DataFrame:
        """Fits each scorer's mean and standard deviation on ``res``'s rows (no labels needed: enough to use given
        weights); returns the scorers' scores, one column each."""
        if len(res) == 0:
            raise ValueError("ScoreFusion.fit needs candidates to fit on: the result frame is empty")
        members = self.member_scores(res)
        self.stats = {}
        for name in self.scorers:
            std = float(members[name].std())
            self.stats[name] = (float(members[name].mean()), std if std > 0 else 1.0)
        return members

    def fit(self, tr_res: pd.DataFrame, tr_qrels: pd.DataFrame, va_res: pd.DataFrame | None = None,
            va_qrels: pd.DataFrame | None = None) -> pd.DataFrame:
        """Fits statistics and weights on the judged candidates (validation ones when given); returns the grid."""
        res, qrels = (va_res, va_qrels) if va_res is not None and va_qrels is not None else (tr_res, tr_qrels)
        members = self.fit_statistics(res)
        measure = ir_measures.parse_measure(self.metric)
        qids = set(res["qid"].astype(str))  # the mean runs over these queries only
        qrels = qrels[qrels["qid"].astype(str).isin(qids)]
        qrels = pd.DataFrame({"query_id": qrels["qid"].astype(str), "doc_id": qrels["docno"].astype(str),
                              "relevance": qrels["label"].astype(int)})
        names = list(self.scorers)
        rows = []
        for weights in _simplex(len(names), self.grid_step):
            candidate = dict(zip(names, weights))
            run = pd.DataFrame({"query_id": res["qid"].astype(str), "doc_id": res["docno"].astype(str),
                                "score": self._fuse(members, candidate)})
            value = ir_measures.calc_aggregate([measure], qrels, run).get(measure, 0.0)
            rows.append({**candidate, self.metric: value})
        grid = pd.DataFrame(rows)
        best = grid.loc[grid[self.metric].idxmax()]  # first best: ties go to the earliest grid point
        self.weights = {name: float(best[name]) for name in names}
        return grid

    def __repr__(self) -> str:
        weights = "unfitted" if self.weights is None else ", ".join(f"{k}={v:g}" for k, v in self.weights.items())
        return f"ScoreFusion({', '.join(self.scorers)}; {weights})"


def grid_step_problem(step) -> str | None:
    """What is wrong with a weight grid's ``step``, or None: it must lie in (0, 1] and divide 1, since the weights
    are multiples of it that sum to 1 (a step of 0.3 was silently searched as 1/3)."""
    if isinstance(step, bool) or not isinstance(step, (int, float)) or not 0 < step <= 1:
        return f"must lie in (0, 1], got {step!r}"
    units = round(1 / step)
    if abs(units * step - 1) > 1e-9:
        nearest = ", ".join(f"{1 / n:.4g}" for n in sorted({max(1, units - 1), units, units + 1}) if n >= 1)
        return (f"must divide 1 (the weights are multiples of it that sum to 1), got {step!r}: "
                f"1/{step!r} = {1 / step:.4g}; use 1/n, for example {nearest}")
    return None


def _simplex(n: int, step: float):
    """Every weight vector of ``n`` non-negative multiples of ``step`` summing to 1."""
    units = round(1 / step)
    for cut in itertools.combinations(range(units + n - 1), n - 1):
        parts = np.diff([-1, *cut, units + n - 1]) - 1
        yield tuple(float(p) / units for p in parts)
