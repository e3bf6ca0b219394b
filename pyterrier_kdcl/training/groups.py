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
does not grow with the training set's text. The results may also come as an iterable of frames (a retriever's
``transform_gen``, a run read in chunks), read once, so that no frame of every candidate need exist. Each usable
query's candidates go to a temporary file as they are filed (:mod:`~pyterrier_kdcl.training.query_records`) and are
read back one query at a time: the sampler holds 12 bytes a usable query in memory (where its record is, and its
place in qid order), and while it builds about 40 bytes a query (hashes of the qids met and of the qrels' qids, the
usable qids to sort), never an object per candidate or per qrel. The groups, their order and their text are those
of one frame with the text in it: streaming changes where the rows and the text come from, never which groups are
trained on.

A :class:`NegativeFilter` consults a teacher about the negatives (:meth:`GroupSampler.filter_negatives`): a negative
the teacher scores at or above a positive's score minus ``margin`` is a false-negative suspect, and is dropped from
the candidates that positive's groups draw from, or kept and labelled positive in them. It happens once, before
the first epoch, and the draws stay a function of (seed, epoch): CL and KD given the same teacher and filter
still see the same groups.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Literal

import numpy as np
import pandas as pd

from pyterrier_kdcl.training.query_records import QueryRecord, QueryRecords

TEXT_BLOCK = 512  # groups whose text a streaming sampler fetches at once
CHUNK_ROWS = 1 << 20  # rows of a training frame checked and split into queries at once
KEY_CHUNK = 4096  # qids held as Python objects at once while building (then packed into numpy arrays)
QRELS_CHUNK = 1 << 16  # qrels rows converted at once
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

        # a large training set: the first stage's results a batch of topics at a time, text from the docstore
        sampler = GroupSampler(bm25.transform_gen(train_topics, batch_size=1000), qrels,
                               text_source=pt.text.get_text(dataset, "text"))

    Args:
        results: result frame with qid, query, docno and ``text_field`` (and rank or score, if a window is used),
            or an iterable of such frames (a retriever's ``transform_gen(topics, batch_size=...)``, a run file read
            with ``pd.read_csv(..., chunksize=...)`` and merged with the topics' query text), read once, a frame at
            a time, so that no frame of every candidate need exist. Each query's rows come in one frame, or in
            consecutive ones; a query met again after others is refused. The groups are those of the same rows in
            one frame.
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
        spill_dir: the directory of the temporary file the candidates are kept in (unnamed: removed when the
            sampler is closed or collected, or the process ends); None: Python's ``tempfile`` default (``TMPDIR``).
            Give a directory on disk, not ``tmpfs``, or the file's pages stay in memory.
    """

    def __init__(self, results: pd.DataFrame | Iterable[pd.DataFrame], qrels: pd.DataFrame, *, group_size: int = 8,
                 min_label: int = 1, negatives_window: tuple[int, int] | None = None, insufficient: str = "skip",
                 text_source=None, text_field: str = "text", seed: int = 42, unjudged: str = "skip",
                 spill_dir: str | Path | None = None):
        if not isinstance(group_size, (int, np.integer)) or group_size < 2:
            raise ValueError(f"group_size must be an integer of at least 2 (one positive and a negative), "
                             f"got {group_size!r}")
        if negatives_window is not None and not (0 <= negatives_window[0] < negatives_window[1]):
            raise ValueError(f"negatives_window must be (first, last) ranks with 0 <= first < last, "
                             f"got {negatives_window!r}")
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
        self.streaming = False  # decided by the first frame: it has no text_field and a text_source is given
        self.spill_dir = spill_dir
        _Builder(self, qrels, min_label, negatives_window).build(results)
        if not len(self._usable):
            self.close()
            raise ValueError(f"no training group could be built: {self.stats.explain()}. "
                             f"Each group needs {group_size - 1} negatives (group_size={group_size}). "
                             "Check that the qrels match the frame's qids and docnos, retrieve deeper, "
                             "or pass text_source= / insufficient='replace'.")

    @property
    def nbytes(self) -> int:
        """Bytes the sampler's arrays hold in memory: where each usable query's record is in the temporary file, and
        its place in qid order (12 bytes a usable query). After :meth:`filter_negatives`, the pools of the queries
        it changed are Python lists besides (not counted)."""
        return self._records.nbytes + self._usable.nbytes

    @property
    def file_bytes(self) -> int:
        """Bytes of the temporary file: every usable query's qid, query, candidates' docnos and first-stage scores
        (and their text, unless streaming)."""
        return self._records.file_bytes

    def close(self) -> None:
        """Closes and so removes the temporary file of the candidates; the sampler draws no group afterwards. A fit
        closes its own sampler when it ends."""
        self._records.close()

    # -- sampling -------------------------------------------------------------------------------------------
    def __len__(self) -> int:
        return len(self._usable)

    def epoch(self, epoch: int) -> Iterator[Group]:
        """The groups of one epoch in training order: a function of (seed, epoch) only."""
        return self._with_text(self._draw(epoch))

    def _draw(self, epoch: int) -> Iterator[Group]:
        rng = np.random.default_rng([self.seed, epoch])
        for index in rng.permutation(len(self._usable)):
            entry = int(self._usable[index])
            record = self._records.get(entry)
            positives, pools = self._positives_and_pools(entry, record)
            judged = bool(positives)
            chosen = rng.integers(len(positives)) if judged else None
            members = [positives[chosen]] if judged else []
            negs, relabel = pools[chosen] if pools is not None and judged else (_negatives(record), frozenset())
            needed = self.group_size - len(members)
            picks = rng.choice(len(negs), size=needed, replace=len(negs) < needed)
            members += [negs[i] for i in picks]
            yield _group(record, members, judged, tuple(1 + j for j, i in enumerate(picks) if int(i) in relabel))

    def _positives_and_pools(self, entry: int, record: QueryRecord
                             ) -> tuple[list[int], list[tuple[list[int], frozenset]] | None]:
        """An entry's positives (positions among its members) and, after filter_negatives, each one's own
        (negatives, positions among them labelled positive); None before."""
        pools = self._pools.get(entry)
        if pools is None:
            return list(range(record.positives)), None
        return [p for p, _, _ in pools], [(negs, relabel) for _, negs, relabel in pools]

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
        return self._with_text(self._candidates_of(self._usable))

    def _candidates_of(self, entries: np.ndarray) -> Iterator[Group]:
        for entry in entries.tolist():
            record = self._records.get(entry)
            positives, _ = self._positives_and_pools(entry, record)
            yield _group(record, positives + list(_negatives(record)), bool(positives))

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
        kept, pools = [], {}
        for entry, group in zip(self._usable.tolist(), self.candidates()):
            entry_pools = self._filtered(entry, np.asarray(teacher_scores(group), dtype="float64"), rule)
            if entry_pools != []:
                kept.append(entry)
            if entry_pools:
                pools[entry] = entry_pools
        self._usable, self._pools = np.array(kept, dtype=_index_type(len(self._records))), pools
        self.stats.usable = len(kept)
        if not kept:
            raise ValueError(f"no training group is left once the teacher's suspect negatives are dropped: "
                             f"{self.stats.explain()}. Each group needs {self.group_size - 1} negatives that the "
                             f"teacher scores below the positive's score - {rule.margin:g}: lower group_size, widen "
                             "negatives_window, pass insufficient='replace', or relabel them instead "
                             "(action='relabel')")

    def _filtered(self, entry: int, scores: np.ndarray, rule: NegativeFilter) -> list[tuple] | None:
        """What the filter leaves of an entry: None (it stays as it is), [] (too few negatives left: dropped), or
        each kept positive's (position, negatives it draws from, positions among them labelled positive)."""
        record = self._records.get(entry)
        npos = record.positives
        if not npos:
            return None
        negs = list(_negatives(record))
        suspect = scores[npos:][None, :] >= scores[:npos, None] - rule.margin  # (positives, negatives)
        flagged = int(suspect.any(axis=0).sum())
        self.stats.queries_filtered += flagged > 0
        if rule.action == "relabel":
            self.stats.negatives_relabelled += flagged
            return [(p, negs, frozenset(np.flatnonzero(row).tolist())) for p, row in enumerate(suspect)]
        self.stats.negatives_dropped += flagged
        needed = self.group_size - 1
        pools = [(p, [n for n, s in zip(negs, row) if not s]) for p, row in enumerate(suspect)]
        # a positive left with too few negatives follows `insufficient`; a query left with no positive is skipped
        pools = [(p, pool) for p, pool in pools if len(pool) >= needed or (self.insufficient == "replace" and pool)]
        if not pools:
            self.stats.too_few_after_filter += 1
            return []
        self.stats.sampled_with_replacement += len(negs) >= needed and any(len(pool) < needed for _, pool in pools)
        return [(p, pool, frozenset()) for p, pool in pools]


def _negatives(record: QueryRecord) -> range:
    return range(record.positives, record.size)


def _group(record: QueryRecord, members: list[int], judged: bool, relabelled: tuple[int, ...] = ()) -> Group:
    """The group of a record's ``members`` (positions among its candidates)."""
    scores = record.scores
    return Group(record.qid, record.query, tuple(record.docnos[i] for i in members),
                 tuple(record.texts[i] for i in members), judged,
                 tuple(float(scores[i]) for i in members) if scores is not None else None, relabelled)


class _Builder:
    """Reads the training frames once, a frame (and within it ``CHUNK_ROWS`` rows) at a time, and files each
    query's usable candidates into the sampler's temporary file: the one place a query's rows become its
    positives and negatives. What it holds besides grows by about 30 bytes a query (hashes, not strings)."""

    def __init__(self, sampler: GroupSampler, qrels: pd.DataFrame, min_label: int, window):
        self.sampler, self.stats, self.window = sampler, sampler.stats, window
        self.qrels = _QrelsIndex(qrels, min_label)
        self.columns = None  # the first frame's: every later frame must have them
        self.seen = _HashSet()  # every qid met (hashes): a query met again after others is refused
        self.frame_qrels: dict[str, set[str]] = {}  # the current frame's judged qids → their positives
        self.carry = None  # (qid, its rows so far): the last query of a frame may go on in the next
        self.pending = []  # queries waiting for the text of positives the first stage missed
        self.pending_pairs = 0
        self.usable_qids = _QidKeys()

    def build(self, results) -> None:
        s = self.sampler
        s._pools, s._records = {}, None
        try:
            for frame in _frames(results):
                self._add_frame(frame)
            if self.carry is not None:
                self._add_query(*self.carry)
            self._resolve_pending()
            if s._records is None:  # no frame at all
                s._records = QueryRecords(scored=False, texts=False, directory=s.spill_dir)
            s._records.finish()
        except BaseException:
            if s._records is not None:
                s._records.close()
            raise
        self.stats.qrels_for_unknown_queries = self.qrels.unknown(self.seen)
        self.qrels = self.seen = None  # gone before the qids are sorted: the build's peak is the lower
        self.stats.usable = len(s._records)
        s._usable = self.usable_qids.order(s._records)

    def _add_frame(self, frame: pd.DataFrame) -> None:
        s = self.sampler
        if self.columns is None:
            s.streaming = s.text_source is not None and s.text_field not in frame.columns
            _check_window(frame, self.window)
            s._scored = "score" in frame.columns
            s._records = QueryRecords(s._scored, texts=not s.streaming, directory=s.spill_dir)
            self.columns = ["qid", "docno", "query"] + ["score"] * s._scored + ([s.text_field] * (not s.streaming)) \
                + (["rank"] if self.window is not None and "rank" in frame.columns else [])
        frame = _checked_results(frame, s.text_field, s.streaming)
        missing = [c for c in self.columns if c not in frame.columns]
        if missing:
            raise ValueError(f"a training frame lacks columns {missing} that the first one had: every frame of the "
                             "training results needs the same columns")
        if frame.empty:
            return
        cols = {c: frame[c].to_numpy("float64" if c == "score" else None) for c in self.columns}
        codes, qids = pd.factorize(cols["qid"])
        qids = qids.tolist()
        hashes = _hashes(qids)
        continued = self.carry[0] if self.carry is not None else None
        again = next((q for q, met in zip(qids, self.seen.contains(hashes)) if met and q != continued), None)
        if again is not None:
            raise ValueError(f"the training frames give query {again!r} again after other queries: each query's "
                             "rows must come in one frame, or in consecutive frames (sort a run by qid)")
        self.seen.add(hashes)
        self.frame_qrels = self.qrels.lookup(qids, hashes)
        order = np.argsort(codes, kind="stable")
        ends = np.cumsum(np.bincount(codes, minlength=len(qids)))
        last = codes[-1]  # the query of the frame's last row may go on in the next frame
        for code, qid in enumerate(qids):
            rows = order[ends[code - 1] if code else 0 : ends[code]]
            mine = {c: v[rows] for c, v in cols.items()}
            if self.carry is not None and self.carry[0] == qid:
                mine = {c: np.concatenate([self.carry[1][c], v]) for c, v in mine.items()}
                self.carry = None
            if code == last:
                if self.carry is not None:
                    self._add_query(*self.carry)
                self.carry = (qid, mine)
            else:
                self._add_query(qid, mine)

    def _qrels_of(self, qid: str) -> set[str] | None:
        """The positives of a query, or None when it has no qrels at all."""
        if qid in self.frame_qrels:
            return self.frame_qrels[qid]
        return self.qrels.lookup([qid], _hashes([qid])).get(qid)  # a query carried from an earlier frame

    def _add_query(self, qid: str, rows: dict) -> None:
        """One query's rows (in the order given): duplicates of a docno dropped (the first kept), the rest in
        docno order, split into positives and negatives (within the window)."""
        s = self.sampler
        first: dict[str, int] = {}
        for i, docno in enumerate(rows["docno"].tolist()):
            first.setdefault(docno, i)
        self.stats.duplicate_rows_dropped += len(rows["docno"]) - len(first)
        keep = np.array([i for _, i in sorted(first.items())], dtype=np.int64)  # groups never depend on row order
        rows = {c: v[keep] for c, v in rows.items()}
        qrels = self._qrels_of(qid)
        judged = qrels if qrels is not None else set()
        is_pos = np.array([d in judged for d in rows["docno"].tolist()], dtype=bool)
        is_neg = ~is_pos
        if self.window is not None:
            ranks = rows["rank"] if "rank" in rows else _ranks_by_score(rows["score"])
            is_neg &= (ranks >= self.window[0]) & (ranks < self.window[1])
        missed = [d for d in sorted(judged) if d not in first]
        query = (qid, rows["query"][0], rows, is_pos, is_neg, qrels is None)
        if missed and s.text_source is not None:
            self.pending.append((query, missed))
            self.pending_pairs += len(missed)
            if self.pending_pairs >= CHUNK_ROWS // 64:
                self._resolve_pending()
        else:
            self._file(*query, found=[])

    def _resolve_pending(self) -> None:
        """Fetches the text of the positives the pending queries' first stage missed, at once, and files them."""
        if not self.pending:
            return
        pairs = [(query[0], d) for query, missed in self.pending for d in missed]
        found = _positive_texts(self.sampler.text_source, pairs, self.sampler.text_field)
        self.stats.positive_text_fetched += len(found)
        for query, missed in self.pending:
            self._file(*query, found=[(d, found[query[0], d]) for d in missed if (query[0], d) in found])
        self.pending, self.pending_pairs = [], 0

    def _file(self, qid, query, rows, is_pos, is_neg, unjudged, found: list[tuple[str, str]]) -> None:
        """Files a query's positives (those retrieved, then those fetched) and negatives, or counts why not."""
        s = self.sampler
        self.stats.queries += 1
        self.stats.unjudged += unjudged
        npos = int(is_pos.sum()) + len(found)
        nneg = int(is_neg.sum())
        if not npos and not (unjudged and s.unjudged == "distil"):
            self.stats.no_positive += 1
            return
        needed = s.group_size - (0 if unjudged else 1)
        if nneg < needed and (s.insufficient == "skip" or not nneg):
            self.stats.too_few_negatives += 1
            return
        self.stats.sampled_with_replacement += nneg < needed
        docnos = rows["docno"][is_pos].tolist() + [d for d, _ in found] + rows["docno"][is_neg].tolist()
        scores = None
        if s._scored:  # a missed positive ranked below every candidate: its query's lowest score
            lowest = np.nanmin(rows["score"]) if len(rows["score"]) else np.nan
            scores = np.concatenate([rows["score"][is_pos], np.full(len(found), lowest), rows["score"][is_neg]])
        texts = None
        if not s.streaming:
            text = rows[s.text_field]
            texts = text[is_pos].tolist() + [t for _, t in found] + text[is_neg].tolist()
        s._records.add(qid, query, npos, docnos, scores, texts)
        self.usable_qids.append(qid)


def _hashes(strings: list[str]) -> np.ndarray:
    """Python's 64-bit hash of each string (one process's; any string, surrogates too), as numpy."""
    return np.fromiter(map(hash, strings), dtype=np.int64, count=len(strings))


def _index_type(n: int) -> type:
    """The narrowest integer that numbers ``n`` rows: 4 bytes a row rather than 8 below 2^31."""
    return np.int32 if n < 2**31 else np.int64


class _HashSet:
    """Hashes of strings met, in a sorted numpy array (8 bytes a string) with a small set of the latest: whether a
    string was met, without a Python set of them. Two strings of the same 64-bit hash pass for one (about one
    chance in 10^8 among 500,000 of them)."""

    RECENT = 4096

    def __init__(self):
        self.sorted, self.recent = np.empty(0, dtype=np.int64), set()

    def add(self, hashes: np.ndarray) -> None:
        self.recent.update(hashes.tolist())
        if len(self.recent) >= self.RECENT:
            latest = np.fromiter(self.recent, dtype=np.int64, count=len(self.recent))
            self.sorted = np.sort(np.concatenate([self.sorted, latest]), kind="stable")  # nearly sorted: linear
            self.recent = set()

    def contains(self, hashes: np.ndarray) -> np.ndarray:
        at = np.searchsorted(self.sorted, hashes)
        found = self.sorted[np.minimum(at, len(self.sorted) - 1)] == hashes if len(self.sorted) else \
            np.zeros(len(hashes), dtype=bool)
        return found | np.fromiter((h in self.recent for h in hashes.tolist()), dtype=bool, count=len(hashes))


class _QrelsIndex:
    """The caller's qrels, looked up by qid without a copy of their strings: each row's qid hash, sorted, with its
    row (16 bytes a qrel) and whether it is a positive (a byte). The rows a hash points to are read back from the
    caller's frame and their qid compared, so two qids of the same hash are never mixed."""

    def __init__(self, qrels: pd.DataFrame, min_label: int):
        _check_qrels_columns(qrels)
        hashes, self.positive = np.empty(len(qrels), dtype=np.int64), np.empty(len(qrels), dtype=bool)
        for start in range(0, len(qrels), QRELS_CHUNK):  # a chunk at a time: no copy of the caller's qrels
            part = qrels.iloc[start : start + QRELS_CHUNK]
            self.positive[start : start + len(part)] = (_integer_labels(part["label"]) >= min_label).to_numpy()
            hashes[start : start + len(part)] = _hashes(part["qid"].astype(str).tolist())
        self.rows = np.argsort(hashes, kind="stable").astype(_index_type(len(qrels)))
        self.hashes = hashes[self.rows]
        self.qrels = qrels

    def lookup(self, qids: list[str], hashes: np.ndarray) -> dict[str, set[str]]:
        """Each judged qid's positives (an empty set when it has qrels but no positive); qids without qrels absent."""
        first, last = np.searchsorted(self.hashes, hashes, "left"), np.searchsorted(self.hashes, hashes, "right")
        counts = last - first
        at = np.repeat(first - np.cumsum(counts) + counts, counts) + np.arange(counts.sum())
        rows = self.rows[at]
        owners = np.repeat(np.arange(len(qids)), counts).tolist()
        found: dict[str, set[str]] = {}
        got = self.qrels.iloc[rows]
        for owner, qid, docno, positive in zip(owners, got["qid"].astype(str).tolist(),
                                               got["docno"].astype(str).tolist(), self.positive[rows].tolist()):
            if qid == qids[owner]:
                judged = found.setdefault(qid, set())
                if positive:
                    judged.add(docno)
        return found

    def unknown(self, seen: _HashSet) -> int:
        """How many qrels have a qid never met in the training frames."""
        return sum(int((~seen.contains(self.hashes[i : i + QRELS_CHUNK])).sum())
                   for i in range(0, len(self.hashes), QRELS_CHUNK))


class _QidKeys:
    """The usable queries' qids as they are filed, packed as UTF-8 in numpy arrays, to put the queries in qid order
    once the last is filed (about the qid's bytes a query, not a Python string each)."""

    def __init__(self):
        self.packed, self.latest, self.trailing_nul = [], [], False

    def append(self, qid: str) -> None:
        key = qid.encode("utf-8", "surrogatepass")  # UTF-8's byte order is Python's order of code points
        self.trailing_nul |= key.endswith(b"\0")
        self.latest.append(key)
        if len(self.latest) >= KEY_CHUNK:
            self._pack()

    def _pack(self) -> None:
        if self.latest:
            self.packed.append(np.array(self.latest, dtype=bytes))
            self.latest = []

    def order(self, records: QueryRecords) -> np.ndarray:
        """The usable queries' numbers in qid order."""
        self._pack()
        if self.trailing_nul:  # numpy's fixed-width bytes drop trailing NULs: compare the qids themselves
            order = sorted(range(len(records)), key=lambda i: records.get(i).qid)
            return np.array(order, dtype=_index_type(len(records)))
        keys = np.concatenate(self.packed) if self.packed else np.empty(0, dtype="S1")
        self.packed = []
        return np.argsort(keys, kind="stable").astype(_index_type(len(records)))


def _frames(results) -> Iterator[pd.DataFrame]:
    """The training results as frames of at most ``CHUNK_ROWS`` rows, each query's rows in one frame or in
    consecutive ones."""
    if isinstance(results, pd.DataFrame):
        results = [results]
    elif isinstance(results, (str, bytes)) or not isinstance(results, Iterable):
        raise TypeError(f"the training results must be a result frame or an iterable of result frames, got "
                        f"{type(results).__name__}")
    for frame in results:
        if not isinstance(frame, pd.DataFrame):
            raise TypeError(f"the training results must be result frames (qid, query, docno, ...), got a "
                            f"{type(frame).__name__} among them")
        if len(frame) <= CHUNK_ROWS:
            yield frame
            continue
        codes = pd.factorize(frame["qid"])[0] if "qid" in frame.columns else np.zeros(len(frame), dtype=np.int64)
        grouped = np.count_nonzero(codes[1:] != codes[:-1]) + 1 == codes.max() + 1  # each query's rows together
        order = None if grouped else np.argsort(codes, kind="stable")
        del codes
        for start in range(0, len(frame), CHUNK_ROWS):
            yield frame.iloc[start : start + CHUNK_ROWS] if grouped else frame.take(order[start : start + CHUNK_ROWS])


def _check_window(frame: pd.DataFrame, window) -> None:
    if window is not None and not {"rank", "score"} & set(frame.columns):
        raise ValueError(f"negatives_window={tuple(window)!r} selects negatives by rank, but the "
                         "training frame has neither a 'rank' nor a 'score' column: keep the first stage's rank "
                         "or score columns in the frame, or drop negatives_window")


def _ranks_by_score(scores: np.ndarray) -> np.ndarray:
    """0-based ranks by descending score, ties in row order (``pt.model.add_ranks``)."""
    ranks = np.empty(len(scores), dtype=np.int64)
    ranks[np.argsort(-scores, kind="stable")] = np.arange(len(scores))
    return ranks


def _positive_texts(text_source, pairs: list[tuple[str, str]], text_field: str) -> dict:
    """The non-empty text of each (qid, docno) the text source has."""
    if isinstance(text_source, Mapping):
        found = {(q, d): text_source[d] for q, d in pairs if d in text_source}
    else:
        fetched = text_source(pd.DataFrame(pairs, columns=["qid", "docno"]))
        found = dict(zip(zip(fetched["qid"], fetched["docno"]), fetched[text_field]))
    return {k: v for k, v in found.items() if isinstance(v, str) and v}


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
    _check_qrels_columns(qrels)
    return pd.DataFrame({"qid": qrels["qid"].astype(str), "docno": qrels["docno"].astype(str),
                         "label": _integer_labels(qrels["label"])})


def _check_qrels_columns(qrels: pd.DataFrame) -> None:
    missing = [c for c in ("qid", "docno", "label") if c not in qrels.columns]
    if missing:
        raise ValueError(f"qrels lack columns {missing}; they need qid, docno and label (dataset.get_qrels())")


def _integer_labels(labels: pd.Series) -> pd.Series:
    """Qrels labels as ints; any that is not an integer is an error."""
    numeric = pd.to_numeric(labels, errors="coerce")
    bad = numeric.isna() | (numeric != numeric.round())
    if bad.any():
        raise ValueError(f"qrels labels must be integers, found {labels[bad].iloc[0]!r}")
    return numeric.astype(int)
