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

A frame without the text column, given ``text_source=`` (a docstore), is *streamed*: the sampler keeps ids and
first-stage scores only, and fetches the text of each block of ``TEXT_BLOCK`` groups as they are drawn, so memory
does not grow with the training set's text. The groups, their order and their text are those of the same frame
with the text in it: streaming changes where the text comes from, never which groups are trained on.

A :class:`NegativeFilter` consults a teacher about the negatives (:meth:`GroupSampler.filter_negatives`): a negative
the teacher scores at or above a positive's score minus ``margin`` is a false-negative suspect, and is dropped from
the candidates that positive's groups draw from, or kept and labelled positive in them. It happens once, before
the first epoch, and the draws stay a function of (seed, epoch): CL and KD given the same teacher and filter
still see the same groups.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Iterator, Mapping
from dataclasses import asdict, dataclass, field, replace
from typing import Literal

import numpy as np
import pandas as pd
import pyterrier as pt

TEXT_BLOCK = 512  # groups whose text a streaming sampler fetches at once
INSUFFICIENT_POLICIES = ("skip", "replace")
UNJUDGED_POLICIES = ("skip", "distil")
NEGATIVE_ACTIONS = ("drop", "relabel")


@dataclass(frozen=True)
class NegativeFilter:
    """Teacher-filtered negatives: a negative whose teacher score is ``>= positive's score - margin`` is a
    false-negative suspect (the teacher thinks it as relevant as the judged positive, or nearly).

    ``action="drop"`` removes a suspect from the candidates its positive's groups draw negatives from (the seeded
    draw then picks among the rest; a query left with too few follows ``insufficient``), as sentence-transformers'
    ``mine_hard_negatives`` does with a cross-encoder margin. ``action="relabel"`` keeps it in the candidates and
    labels it positive wherever a group draws it (RLHN's relabelling): InfoNCE then counts several positives;
    losses that read the teacher's scores alone (KLDistillation) see the same groups either way.

    ``margin`` is in the teacher's own score units (a cross-encoder's logits), ``>= 0``: 0 flags the negatives the
    teacher scores at or above the positive. With several positives, each positive is compared with the negatives of
    its own groups.

    Example::

        kdcl.ContrastiveTrainer(ce, teacher=big, negative_filter={"margin": 0.5, "action": "drop"})
        kdcl.DistillationTrainer(ce, big, negative_filter=NegativeFilter(margin=0.0, action="relabel"))
    """

    margin: float = 0.0
    action: Literal["drop", "relabel"] = "drop"

    def __post_init__(self):
        margin = self.margin
        if isinstance(margin, bool) or not isinstance(margin, (int, float, np.integer, np.floating)) \
                or not np.isfinite(margin) or margin < 0:
            raise ValueError(f"negative_filter margin must be a number >= 0 (in the teacher's score units; 0 flags "
                             f"negatives the teacher scores at or above the positive), got {margin!r}")
        if self.action not in NEGATIVE_ACTIONS:
            raise ValueError(f"negative_filter action must be one of {NEGATIVE_ACTIONS} (drop the suspect negative, "
                             f"or relabel it positive), got {self.action!r}")
        object.__setattr__(self, "margin", float(margin))

    @classmethod
    def of(cls, value: NegativeFilter | Mapping | None) -> NegativeFilter | None:
        """``value`` as a filter: None stays None; a mapping gives its ``margin`` and ``action``."""
        if value is None or isinstance(value, cls):
            return value
        if not isinstance(value, Mapping):
            raise TypeError(f"negative_filter must be None, a mapping such as {{'margin': 0.5, 'action': 'drop'}}, "
                            f"or a NegativeFilter, got {value!r}")
        unknown = sorted(set(value) - {"margin", "action"})
        if unknown:
            raise ValueError(f"negative_filter has unknown keys {unknown}: it takes 'margin' (>= 0) and 'action' "
                             f"({' or '.join(map(repr, NEGATIVE_ACTIONS))})")
        return cls(**value)

    def describe(self) -> str:
        done = {"drop": "dropped", "relabel": "relabelled positive"}[self.action]
        return f"negatives the teacher scores >= the positive's score - {self.margin:g} {done}"


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
    relabelled: tuple[int, ...] = ()  # positions of negatives a NegativeFilter relabelled positive

    @property
    def labels(self) -> tuple[int, ...]:
        labels = [1 if self.judged else 0] + [0] * (len(self.docnos) - 1)
        for i in self.relabelled:
            labels[i] = 1
        return tuple(labels)


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
    # what a NegativeFilter did (GroupSampler.filter_negatives); None and zeros without one
    negative_filter: dict | None = None
    queries_filtered: int = 0          # queries with at least one suspect negative: the groups the filter changes
    negatives_dropped: int = 0         # (query, negative) pairs removed from a positive's candidates
    negatives_relabelled: int = 0      # (query, negative) pairs labelled positive where drawn
    too_few_after_filter: int = 0      # queries "insufficient" skipped once the filter had dropped their suspects

    def explain(self) -> str:
        filtered = (f", {self.too_few_after_filter} with too few negatives once the teacher's suspects were dropped"
                    if self.negative_filter is not None else "")
        return (f"{self.queries} training queries: {self.no_positive} without a judged positive among their "
                f"candidates, {self.too_few_negatives} with too few negatives{filtered}, {self.unjudged} with no "
                f"qrels at all, {self.usable} usable "
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
        text_source: where to find the text of positives the first stage missed: a mapping docno → text (such as
            ``dataset.irds_ref().docs_store()`` wrapped as a mapping) or a transformer such as
            ``pt.text.get_text(dataset, "text")``. Without it such queries are skipped. Given a frame without
            ``text_field``, every group's text comes from it, a block of groups at a time (streaming, see above).
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
        self.text_source, self.text_field = text_source, text_field
        self.streaming = text_source is not None and text_field not in results.columns
        results = _checked_results(results, text_field, self.streaming)
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

        # (docno, text, first-stage score or None) of each positive and negative; the last item is None, or after
        # filter_negatives each positive's own (negatives, positions among them labelled positive)
        self._scored = "score" in results.columns
        self._queries: list[tuple[str, str, list[tuple], list[tuple], list[tuple[list, frozenset]] | None]] = []
        for qid, rows in results.groupby("qid", sort=True):
            self.stats.queries += 1
            judged = positive_sets.get(qid, set())
            is_pos = rows["docno"].isin(judged).to_numpy()
            scores = rows["score"].to_numpy("float64") if self._scored else np.full(len(rows), None)
            texts = rows[text_field].to_numpy() if not self.streaming else np.full(len(rows), None)
            pos = list(zip(rows["docno"][is_pos], texts[is_pos], scores[is_pos]))
            lowest = np.nanmin(scores) if self._scored else None  # a missed positive ranked below every candidate
            pos += [(d, missing_positive_text[qid, d], lowest) for d in sorted(judged)
                    if (qid, d) in missing_positive_text]
            is_neg = ~is_pos
            if window is not None:
                ranks = rows["_rank"].to_numpy()
                is_neg &= (ranks >= window[0]) & (ranks < window[1])
            negs = list(zip(rows["docno"][is_neg], texts[is_neg], scores[is_neg]))
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
            self._queries.append((qid, rows["query"].iloc[0], pos, negs, None))
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
        return self._with_text(self._draw(epoch))

    def _draw(self, epoch: int) -> Iterator[Group]:
        rng = np.random.default_rng([self.seed, epoch])
        for index in rng.permutation(len(self._queries)):
            qid, query, pos, negs, pools = self._queries[index]
            judged = bool(pos)
            chosen = rng.integers(len(pos)) if judged else None
            members = [pos[chosen]] if judged else []
            negs, relabel = pools[chosen] if pools is not None and judged else (negs, frozenset())
            needed = self.group_size - len(members)
            picks = rng.choice(len(negs), size=needed, replace=len(negs) < needed)
            members += [negs[i] for i in picks]
            yield Group(qid, query, tuple(d for d, _, _ in members), tuple(t for _, t, _ in members), judged,
                        tuple(float(s) for _, _, s in members) if self._scored else None,
                        tuple(1 + j for j, i in enumerate(picks) if int(i) in relabel))

    def _with_text(self, groups: Iterator[Group]) -> Iterator[Group]:
        """The groups with their text: as they are, or (streaming) fetched from ``text_source`` a block at a time."""
        if not self.streaming:
            yield from groups
            return
        while block := list(itertools.islice(groups, TEXT_BLOCK)):
            wanted = list(dict.fromkeys(d for g in block for d, t in zip(g.docnos, g.texts) if t is None))
            found = dict(zip(wanted, fetch_texts(self.text_source, wanted, self.text_field)))
            for g in block:
                yield replace(g, texts=tuple(found[d] if t is None else t for d, t in zip(g.docnos, g.texts)))

    # -- teacher-filtered negatives -------------------------------------------------------------------------
    def candidates(self) -> Iterator[Group]:
        """One group a query holding its positives, then every negative it may draw: every pair any epoch's groups
        can hold, for a teacher to score before :meth:`filter_negatives` (labels mean nothing here)."""
        return self._with_text(self._candidates())

    def _candidates(self) -> Iterator[Group]:
        for qid, query, pos, negs, _ in self._queries:
            members = pos + negs
            yield Group(qid, query, tuple(d for d, _, _ in members), tuple(t for _, t, _ in members), bool(pos),
                        tuple(float(s) for _, _, s in members) if self._scored else None)

    def filter_negatives(self, negative_filter: NegativeFilter | Mapping,
                         teacher_scores: Callable[[Group], np.ndarray]) -> None:
        """Consults the teacher about every judged query's negatives, once, before the first epoch (see
        :class:`NegativeFilter`); counts what it did in ``stats``. ``teacher_scores(group)`` returns the teacher's
        score of each document of a :meth:`candidates` group, in its order. Queries without a positive (unjudged
        groups) are left as they are: there is no positive to compare with.

        Example::

            scores = {...}  # (qid, docno) -> the teacher's score
            sampler.filter_negatives({"margin": 0.5, "action": "drop"},
                                     lambda g: [scores[g.qid, d] for d in g.docnos])
        """
        rule = NegativeFilter.of(negative_filter)
        if self.stats.negative_filter is not None:
            raise ValueError("these groups were filtered already: build a new GroupSampler to filter them otherwise")
        self.stats.negative_filter = asdict(rule)
        kept = []
        for entry, group in zip(self._queries, list(self.candidates())):
            kept += self._filtered(entry, np.asarray(teacher_scores(group), dtype="float64"), rule)
        self._queries = kept
        self.stats.usable = len(kept)
        if not kept:
            raise ValueError(f"no training group is left once the teacher's suspect negatives are dropped: "
                             f"{self.stats.explain()}. Each group needs {self.group_size - 1} negatives that the "
                             f"teacher scores below the positive's score - {rule.margin:g}: lower group_size, widen "
                             "negatives_window, pass insufficient='replace', or relabel them instead "
                             "(action='relabel')")

    def _filtered(self, entry: tuple, scores: np.ndarray, rule: NegativeFilter) -> list[tuple]:
        """A query's entry as the filter leaves it: [] when it has too few negatives left."""
        qid, query, pos, negs, _ = entry
        if not pos:
            return [entry]
        suspect = scores[len(pos):][None, :] >= scores[: len(pos), None] - rule.margin  # (positives, negatives)
        flagged = int(suspect.any(axis=0).sum())
        self.stats.queries_filtered += flagged > 0
        if rule.action == "relabel":
            self.stats.negatives_relabelled += flagged
            return [(qid, query, pos, negs, [(negs, frozenset(np.flatnonzero(row).tolist())) for row in suspect])]
        self.stats.negatives_dropped += flagged
        needed = self.group_size - 1
        pools = [(p, [n for n, s in zip(negs, row) if not s]) for p, row in zip(pos, suspect)]
        # a positive left with too few negatives follows `insufficient`; a query left with no positive is skipped
        pools = [(p, pool) for p, pool in pools if len(pool) >= needed or (self.insufficient == "replace" and pool)]
        if not pools:
            self.stats.too_few_after_filter += 1
            return []
        self.stats.sampled_with_replacement += len(negs) >= needed and any(len(pool) < needed for _, pool in pools)
        return [(qid, query, [p for p, _ in pools], negs, [(pool, frozenset()) for _, pool in pools])]


def fetch_texts(text_source, docnos: list[str], text_field: str = "text") -> list[str]:
    """The text of each docno from a mapping (docno → text) or a transformer adding ``text_field`` to (qid, docno)
    rows; refuses a docno it has no non-empty text for."""
    if isinstance(text_source, Mapping):
        found = {d: text_source.get(d) for d in docnos}
    else:
        fetched = text_source(pd.DataFrame({"qid": "0", "docno": docnos}))
        found = dict(zip(fetched["docno"].astype(str), fetched[text_field]))
    bad = next((d for d in docnos if not isinstance(found.get(d), str) or not found[d].strip()), None)
    if bad is not None:
        raise ValueError(f"text_source has no text for docno {bad!r}: the training frame has no {text_field!r} "
                         "column, so every candidate's text comes from text_source; pass the docstore of the "
                         "collection the first stage retrieved from")
    return [found[d] for d in docnos]


def _checked_results(results: pd.DataFrame, text_field: str, streaming: bool = False) -> pd.DataFrame:
    if "docno" not in results.columns:
        raise ValueError("the training frame has no 'docno' column: it looks like topics, not results. Put a first "
                         "stage before the trainer, e.g. (bm25 >> pt.text.get_text(dataset, 'text') >> trainer).fit()")
    missing = [c for c in ("qid", "query") + (() if streaming else (text_field,)) if c not in results.columns]
    if missing:
        hint = (f'add pt.text.get_text(dataset, "{text_field}") before the trainer, or pass text_source= (a '
                'docstore) to fetch the text per batch') if text_field in missing else \
            "the frame needs qid and query columns"
        raise ValueError(f"the training frame lacks columns {missing}: {hint}")
    results = results.assign(qid=results["qid"].astype(str), docno=results["docno"].astype(str)).reset_index(drop=True)
    bad = results[text_field].map(lambda v: not isinstance(v, str) or not v.strip()) if not streaming else \
        pd.Series(False, index=results.index)
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
