"""Training groups — the one place they are built: per query one positive and ``group_size - 1`` hard negatives.

Negatives are the first stage's candidates that are not judged positive (optionally only those within a rank
window, to dodge unjudged positives at the very top). Every epoch draws afresh from ``(seed, epoch)``, so the
same seed and data give the same groups in the same order whatever objective is trained: the paper's control.

Queries with no qrels at all can make *unjudged* groups (``unjudged="distil"``): ``group_size`` of the first
stage's candidates (within the same rank window), drawn the same seeded way, with no positive. Only a teacher
can supply their targets, so only losses that read no labels train on them.

Each group also carries its documents' first-stage ``score`` (when the frame has one), for teachers that fuse it
(``pyterrier_kdcl.fusion.FirstStageScore``). A positive the first stage missed gets the lowest score among its
query's candidates: it ranked below all of them.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field

import numpy as np
import pandas as pd
import pyterrier as pt

INSUFFICIENT_POLICIES = ("skip", "replace")
UNJUDGED_POLICIES = ("skip", "distil")


@dataclass(frozen=True)
class Group:
    """One query's group: the positive first, then the negatives; labels are 1 for the positive, else 0.
    An unjudged group (``judged=False``) holds first-stage candidates only, all labelled 0. ``first_stage_scores``
    are the documents' first-stage scores, when the training frame has a ``score`` column."""

    qid: str
    query: str
    docnos: tuple[str, ...]
    texts: tuple[str, ...]
    judged: bool = True
    first_stage_scores: tuple[float, ...] | None = None

    @property
    def labels(self) -> tuple[int, ...]:
        return ((1,) if self.judged else (0,)) + (0,) * (len(self.docnos) - 1)


@dataclass
class GroupStats:
    """What happened to the training queries; the trainer logs it and explains an empty training set with it."""

    queries: int = 0
    usable: int = 0
    no_positive: int = 0
    positive_text_fetched: int = 0
    too_few_negatives: int = 0
    unjudged: int = 0
    sampled_with_replacement: int = 0
    duplicate_rows_dropped: int = 0
    qrels_for_unknown_queries: int = 0
    notes: list[str] = field(default_factory=list)

    def explain(self) -> str:
        return (f"{self.queries} training queries: {self.no_positive} without a judged positive among their "
                f"candidates, {self.too_few_negatives} with too few negatives, {self.unjudged} with no qrels at all, "
                f"{self.usable} usable "
                f"({self.duplicate_rows_dropped} duplicate rows dropped, "
                f"{self.qrels_for_unknown_queries} qrels for queries not in the frame)")


class GroupSampler:
    """Builds training groups from a result frame and qrels.

    Example::

        sampler = GroupSampler(res, qrels, group_size=8, seed=42)
        for group in sampler.epoch(0):
            group.qid, group.docnos, group.labels

    Args:
        results: result frame with qid, query, docno and ``text_field`` (and rank or score, if a window is used).
        qrels: qid, docno, label. Labels ``>= min_label`` are positives.
        negatives_window: ``(first, last)`` ranks (0-based, last exclusive) negatives are drawn from: the frame's
            ``rank``, else ranks from its ``score``. A frame with neither is refused rather than ranked by its row
            order (groups never depend on row order).
        insufficient: ``"skip"`` queries with fewer than ``group_size - 1`` negatives, or ``"replace"``: draw
            their negatives with replacement.
        text_source: where to find the text of positives the first stage missed: a mapping docno → text or a
            transformer such as ``pt.text.get_text(dataset, "text")``. Without it such queries are skipped.
        unjudged: what becomes of queries with no qrels at all: ``"skip"`` them (counted in ``stats``), or
            ``"distil"``: groups of ``group_size`` candidates from the window (``insufficient`` applies), for a
            teacher to score. A query with qrels but no positive among its candidates is skipped either way.
    """

    def __init__(self, results: pd.DataFrame, qrels: pd.DataFrame, *, group_size: int = 8, min_label: int = 1,
                 negatives_window: tuple[int, int] | None = None, insufficient: str = "skip", text_source=None,
                 text_field: str = "text", seed: int = 42, unjudged: str = "skip"):
        if not isinstance(group_size, (int, np.integer)) or group_size < 2:
            raise ValueError(f"group_size must be an integer of at least 2 (one positive and a negative), "
                             f"got {group_size!r}")
        if negatives_window is not None and not (0 <= negatives_window[0] < negatives_window[1]):
            raise ValueError(f"negatives_window must be (first, last) ranks with 0 <= first < last, "
                             f"got {negatives_window!r}")
        if negatives_window is not None and not {"rank", "score"} & set(results.columns):
            raise ValueError(f"negatives_window={tuple(negatives_window)!r} selects negatives by rank, but the "
                             "training frame has neither a 'rank' nor a 'score' column: keep the first stage's rank "
                             "or score columns in the frame, or drop negatives_window")
        if insufficient not in INSUFFICIENT_POLICIES:
            raise ValueError(f"insufficient must be one of {INSUFFICIENT_POLICIES}, got {insufficient!r}")
        if unjudged not in UNJUDGED_POLICIES:
            raise ValueError(f"unjudged must be one of {UNJUDGED_POLICIES}, got {unjudged!r}")
        self.group_size = group_size
        self.seed = seed
        self.insufficient = insufficient
        self.unjudged = unjudged
        self.stats = GroupStats()
        results = _checked_results(results, text_field)
        qrels = _checked_qrels(qrels)
        self._build(results, qrels, min_label, negatives_window, text_source, text_field)
        if not self._queries:
            raise ValueError(f"no training group could be built: {self.stats.explain()}. "
                             f"Each group needs {group_size - 1} negatives (group_size={group_size}). "
                             "Check that the qrels match the frame's qids and docnos, retrieve deeper, "
                             "or pass text_source= / insufficient='replace'.")

    # -- building -------------------------------------------------------------------------------------------
    def _build(self, results, qrels, min_label, window, text_source, text_field):
        before = len(results)
        results = results.drop_duplicates(["qid", "docno"], keep="first")
        self.stats.duplicate_rows_dropped = before - len(results)
        results = results.sort_values(["qid", "docno"], kind="stable")  # groups must not depend on row order
        if window is not None:
            results = results.assign(_rank=_ranks(results))
        positives = qrels[qrels["label"] >= min_label]
        positive_sets = positives.groupby("qid")["docno"].apply(set).to_dict()
        known_qids = set(results["qid"])
        self.stats.qrels_for_unknown_queries = int((~qrels["qid"].isin(known_qids)).sum())
        judged_qids = set(qrels["qid"])
        missing_positive_text = self._fetch_missing_positive_text(results, positives, text_source, text_field)

        # (docno, text, first-stage score or None) of each positive and negative
        self._scored = "score" in results.columns
        self._queries: list[tuple[str, str, list[tuple], list[tuple]]] = []
        for qid, rows in results.groupby("qid", sort=True):
            self.stats.queries += 1
            judged = positive_sets.get(qid, set())
            is_pos = rows["docno"].isin(judged).to_numpy()
            scores = rows["score"].to_numpy("float64") if self._scored else np.full(len(rows), None)
            pos = list(zip(rows["docno"][is_pos], rows[text_field][is_pos], scores[is_pos]))
            lowest = np.nanmin(scores) if self._scored else None  # a missed positive ranked below every candidate
            pos += [(d, missing_positive_text[qid, d], lowest) for d in sorted(judged)
                    if (qid, d) in missing_positive_text]
            is_neg = ~is_pos
            if window is not None:
                ranks = rows["_rank"].to_numpy()
                is_neg &= (ranks >= window[0]) & (ranks < window[1])
            negs = list(zip(rows["docno"][is_neg], rows[text_field][is_neg], scores[is_neg]))
            unjudged = qid not in judged_qids
            self.stats.unjudged += unjudged
            if not pos and not (unjudged and self.unjudged == "distil"):
                self.stats.no_positive += 1
                continue
            needed = self.group_size - (0 if unjudged else 1)
            if len(negs) < needed and (self.insufficient == "skip" or not negs):
                self.stats.too_few_negatives += 1
                continue
            self.stats.sampled_with_replacement += len(negs) < needed
            self._queries.append((qid, rows["query"].iloc[0], pos, negs))
        self.stats.usable = len(self._queries)

    def _fetch_missing_positive_text(self, results, positives, text_source, text_field) -> dict:
        candidates = positives[positives["qid"].isin(set(results["qid"]))]
        present = set(zip(results["qid"], results["docno"]))
        missing = candidates[[(q, d) not in present for q, d in zip(candidates["qid"], candidates["docno"])]]
        if text_source is None or missing.empty:
            return {}
        if isinstance(text_source, Mapping):
            found = {(q, d): text_source[d] for q, d in zip(missing["qid"], missing["docno"]) if d in text_source}
        else:
            fetched = text_source(missing[["qid", "docno"]].reset_index(drop=True))
            found = dict(zip(zip(fetched["qid"], fetched["docno"]), fetched[text_field]))
        found = {k: v for k, v in found.items() if isinstance(v, str) and v}
        self.stats.positive_text_fetched = len(found)
        return found

    # -- sampling -------------------------------------------------------------------------------------------
    def __len__(self) -> int:
        return len(self._queries)

    def epoch(self, epoch: int) -> Iterator[Group]:
        """The groups of one epoch in training order: a function of (seed, epoch) only."""
        rng = np.random.default_rng([self.seed, epoch])
        for index in rng.permutation(len(self._queries)):
            qid, query, pos, negs = self._queries[index]
            judged = bool(pos)
            members = [pos[rng.integers(len(pos))]] if judged else []
            needed = self.group_size - len(members)
            picks = rng.choice(len(negs), size=needed, replace=len(negs) < needed)
            members += [negs[i] for i in picks]
            yield Group(qid, query, tuple(d for d, _, _ in members), tuple(t for _, t, _ in members), judged,
                        tuple(float(s) for _, _, s in members) if self._scored else None)


def _checked_results(results: pd.DataFrame, text_field: str) -> pd.DataFrame:
    if "docno" not in results.columns:
        raise ValueError("the training frame has no 'docno' column: it looks like topics, not results. Put a first "
                         "stage before the trainer, e.g. (bm25 >> pt.text.get_text(dataset, 'text') >> trainer).fit()")
    missing = [c for c in ("qid", "query", text_field) if c not in results.columns]
    if missing:
        hint = f'add pt.text.get_text(dataset, "{text_field}") before the trainer' if text_field in missing else \
            "the frame needs qid and query columns"
        raise ValueError(f"the training frame lacks columns {missing}: {hint}")
    results = results.assign(qid=results["qid"].astype(str), docno=results["docno"].astype(str)).reset_index(drop=True)
    bad = results[text_field].map(lambda v: not isinstance(v, str) or not v.strip())
    if bad.any():
        raise ValueError(f"{int(bad.sum())} training rows have an empty or non-string {text_field!r} (for example "
                         f"docno {results['docno'][bad].iloc[0]!r}); drop or fill them before fitting")
    bad_query = results["query"].map(lambda v: not isinstance(v, str) or not v.strip())
    if bad_query.any():
        raise ValueError(f"{int(bad_query.sum())} training rows have an empty or non-string query (for example qid "
                         f"{results['qid'][bad_query].iloc[0]!r}); drop or fill them before fitting")
    return results


def _checked_qrels(qrels: pd.DataFrame) -> pd.DataFrame:
    missing = [c for c in ("qid", "docno", "label") if c not in qrels.columns]
    if missing:
        raise ValueError(f"qrels lack columns {missing}; they need qid, docno and label (dataset.get_qrels())")
    labels = pd.to_numeric(qrels["label"], errors="coerce")
    if labels.isna().any() or (labels != labels.round()).any():
        example = qrels["label"][labels.isna() | (labels != labels.round())].iloc[0]
        raise ValueError(f"qrels labels must be integers, found {example!r}")
    return pd.DataFrame({"qid": qrels["qid"].astype(str), "docno": qrels["docno"].astype(str),
                         "label": labels.astype(int)})


def _ranks(results: pd.DataFrame) -> pd.Series:
    if "rank" in results.columns:
        return results["rank"]
    return pt.model.add_ranks(results[["qid", "score"]].copy())["rank"]
