"""Teacher scores for distillation: every (query, document) of every group scored once, cached on disk.

Any PyTerrier transformer that scores the rows it is given can teach: a ``CrossEncoder``, a pyterrier_dr
bi-encoder's ``text_scorer()``, a sum of transformers. Scores are joined by (qid, docno), never by position,
and must be finite. The teacher sees each pair's qid, query, docno and text, and, when the groups carry them and the
teacher may read it (:func:`reads_first_stage_score`), its first-stage score as ``first_stage_score`` (for a fused
teacher's ``FirstStageScore`` member; never ``score``, which is the teacher's to write).

The cache (``ScoreStore``) is one SQLite table per teacher, keyed by a hash of the query, the docno, *the document
text* and, for a teacher that is given it, the first-stage score: every column a teacher's score may depend on, so
a changed text or a changed first stage is scored afresh. Its directory is named after the teacher's fingerprint: a
``fingerprint()`` method where the teacher has one (a ``CrossEncoder`` hashes its weights), or the fingerprints
of its parts for PyTerrier's compositions (``a + b``, ``2 * a``, ``a >> b``, ``a ** b``, …) and for a
``ScoreFusion`` (its members', with its weights and statistics), computed anew at every fit, so a component whose
weights changed gives new scores. A teacher that cannot be fingerprinted is never cached on disk under a guessed
name: its scores stay in memory unless the user names them (``teacher_cache_key=``). Processes may share one cache
directory: writes wait for each other, never fail with "database is locked". Under several processes, each scores
its share of the missing pairs and all gather them.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import sqlite3
import struct
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import pyterrier as pt
import torch
from pyterrier import _ops

from pyterrier_kdcl.fusion import FIRST_STAGE_COLUMN, FirstStageScore, ScoreFusion
from pyterrier_kdcl.training.groups import Group

SCORE_FILE = "scores.sqlite3"
CHUNK_PAIRS = 8192  # pairs a teacher call scores and a cache write stores: progress kept, memory bounded
_SQL_CHUNK = 500  # keys per SELECT (SQLite's variable limit is 999 in old builds)
_BUSY_TIMEOUT_S = 3600  # a writer waits this long for another process's write before failing

# PyTerrier's operators: the attributes that make up each one (exact classes: a subclass may behave otherwise)
_COMPOSITIONS: dict[type, tuple[str, ...]] = {
    _ops.Compose: ("_transformers",), _ops.FeatureUnion: ("_transformers",), _ops.Sum: ("left", "right"),
    _ops.Concatenate: ("left", "right"), _ops.SetUnion: ("left", "right"), _ops.SetIntersection: ("left", "right"),
    _ops.ScalarProduct: ("scalar",), _ops.RankCutoff: ("k",), pt.transformer.IdentityTransformer: (),
}


def _parts(teacher) -> list | None:
    """The teachers a PyTerrier composition (``a + b``, ``a >> b``, ...) or a ScoreFusion is made of; None for any
    other teacher."""
    if isinstance(teacher, ScoreFusion):
        return list(teacher.scorers.values())
    fields = _COMPOSITIONS.get(type(teacher))
    return None if fields is None else [getattr(teacher, name) for name in fields]


def reads_first_stage_score(teacher) -> bool:
    """Whether a teacher's scores may depend on the ``first_stage_score`` column: it holds a ``FirstStageScore``, or
    a part whose inside is unknown (neither a ``fingerprint()`` nor a known composition). A part with a
    ``fingerprint()`` (a ``CrossEncoder``, a fitted trainer) reads the query and the text only. A teacher that does
    not read it is never given it, so its cached scores hold whatever the first stage."""
    if isinstance(teacher, FirstStageScore):
        return True
    if isinstance(teacher, (int, float, str)):
        return False
    if isinstance(teacher, (tuple, list)):
        return any(reads_first_stage_score(part) for part in teacher)
    parts = _parts(teacher)
    if parts is not None:
        return any(reads_first_stage_score(part) for part in parts)
    return not callable(getattr(teacher, "fingerprint", None))


def can_fingerprint(teacher) -> bool:
    """Whether :func:`teacher_identity` will name the teacher, without computing it (weights are not hashed)."""
    if isinstance(teacher, (int, float, str)):
        return True
    if isinstance(teacher, (tuple, list)):
        return all(can_fingerprint(part) for part in teacher)
    if callable(getattr(teacher, "fingerprint", None)):
        return True
    parts = _parts(teacher)  # a composition, or a ScoreFusion (named by its members, weights and statistics)
    return parts is not None and all(can_fingerprint(part) for part in parts)


def teacher_identity(teacher) -> str | None:
    """What a teacher's scores depend on, as text: its ``fingerprint()``, or for a PyTerrier composition its
    parts' identities; None when some part has neither (its scores cannot be named safely)."""
    if isinstance(teacher, (int, float, str)):
        return repr(teacher)
    if isinstance(teacher, (tuple, list)):
        parts = [teacher_identity(part) for part in teacher]
        return None if None in parts else "[" + ", ".join(parts) + "]"
    if callable(getattr(teacher, "fingerprint", None)):
        return f"{type(teacher).__qualname__}:{teacher.fingerprint()}"
    if isinstance(teacher, ScoreFusion):  # its members, and what it fitted
        parts = [teacher_identity(scorer) for scorer in teacher.scorers.values()]
        if None in parts:
            return None
        fitted = json.dumps({"weights": teacher.weights, "stats": teacher.stats}, sort_keys=True)
        return f"ScoreFusion({', '.join(f'{n}={p}' for n, p in zip(teacher.scorers, parts))}; {fitted})"
    fields = _COMPOSITIONS.get(type(teacher))
    if fields is None:
        return None
    parts = [teacher_identity(getattr(teacher, name)) for name in fields]
    return None if None in parts else f"{type(teacher).__qualname__}(" + ", ".join(parts) + ")"


def teacher_fingerprint(teacher, key: str | None = None) -> str | None:
    """The cache directory name of a teacher's scores: from ``key`` when the user names one, else from its
    identity (see :func:`teacher_identity`); None when it has neither."""
    identity = f"key:{key}" if key is not None else teacher_identity(teacher)
    if identity is None:
        return None
    return hashlib.sha256(f"teacher-scores-v2|{identity}".encode()).hexdigest()[:16]


class CheckedTeacher(pt.Transformer):
    """Runs a teacher and insists it scored exactly the rows it was given, with finite scores."""

    schematic = {"label": "CheckedTeacher", "help_url": "docs/guide.md#4-choose-a-teacher"}

    def __init__(self, teacher: pt.Transformer):
        self.teacher = teacher

    def transform(self, inp: pd.DataFrame) -> pd.DataFrame:
        if len(inp) == 0:
            return inp.assign(score=pd.Series(dtype="float64"))
        try:
            out = self.teacher(inp.drop(columns=["score", "rank"], errors="ignore"))
        except pt.validate.InputValidationError as err:  # a retriever (BM25) wants queries, not (query, doc) rows
            raise ValueError(not_a_scorer_message(self.teacher, inp, err)) from err
        if "score" not in out.columns:
            raise ValueError(f"teacher {self.teacher!r} returned no 'score' column; a teacher scores its input rows")
        keys = ["qid", "docno"]
        given = inp[keys].astype(str)
        scored = out[keys].astype(str).assign(score=out["score"].to_numpy())
        if scored.duplicated(keys).any():
            raise ValueError(f"teacher {self.teacher!r} returned duplicate (qid, docno) rows")
        merged = given.merge(scored, on=keys, how="left", indicator=True)
        dropped = int((merged["_merge"] == "left_only").sum())
        extra = len(scored) - (len(merged) - dropped)
        if dropped or extra:
            raise ValueError(f"teacher {self.teacher!r} dropped {dropped} and added {extra} rows; a teacher must "
                             "score exactly the rows it is given (a reranker, not a retrieval pipeline)")
        scores = merged["score"].to_numpy(dtype="float64")
        if not np.isfinite(scores).all():
            bad = merged[~np.isfinite(scores)].iloc[0]
            raise ValueError(f"teacher {self.teacher!r} gave a non-finite score ({bad['score']}) for qid "
                             f"{bad['qid']!r}, docno {bad['docno']!r}")
        return inp.assign(score=scores)

    def __repr__(self) -> str:
        return f"CheckedTeacher({self.teacher!r})"


class ScoreStore:
    """Teacher scores on disk: one SQLite table, ``key → score``, the key a hash of (query, docno, text).

    Never stores a score it was not given, never overwrites one (a deterministic teacher gives the same score
    twice). Writes take SQLite's write lock up front (``BEGIN IMMEDIATE``) and wait up to an hour for another
    process's write, so several trainers may share one directory; reads see only committed writes."""

    def __init__(self, path: str | Path, description: str = "", file: str = SCORE_FILE):
        self.path = Path(path)
        self.path.mkdir(parents=True, exist_ok=True)
        self.file = self.path / file
        self.db = self._guarded(lambda: sqlite3.connect(self.file, timeout=_BUSY_TIMEOUT_S, isolation_level=None))
        self._guarded(lambda: self._create(description))

    @classmethod
    def reader(cls, path: str | Path, file: str = SCORE_FILE) -> ScoreStore:
        """A read-only connection to the scores of a teacher's cache directory (``get`` only)."""
        store = cls.__new__(cls)
        store.path = Path(path)
        store.file = store.path / file
        uri = store.file.resolve().as_uri() + "?mode=ro"
        store.db = store._guarded(lambda: sqlite3.connect(uri, uri=True, timeout=_BUSY_TIMEOUT_S,
                                                          isolation_level=None))
        return store

    @classmethod
    def temporary(cls) -> ScoreStore:
        """A private store in a temporary file, which SQLite removes when the store is closed or collected (its
        pages beyond SQLite's page cache, about 2 MB, are on disk, not in memory)."""
        store = cls.__new__(cls)
        store.path, store.file = None, Path("(temporary)")
        store.db = sqlite3.connect("", isolation_level=None)  # "": SQLite's private temporary on-disk database
        store._create("")
        return store

    def _create(self, description: str) -> None:
        self.db.execute(f"PRAGMA busy_timeout = {_BUSY_TIMEOUT_S * 1000}")
        with self._writing():
            self.db.execute("CREATE TABLE IF NOT EXISTS scores (key BLOB PRIMARY KEY, score REAL NOT NULL) "
                            "WITHOUT ROWID")
            self.db.execute("CREATE TABLE IF NOT EXISTS meta (name TEXT PRIMARY KEY, value TEXT NOT NULL)")
            self.db.execute("INSERT OR IGNORE INTO meta VALUES ('teacher', ?)", (description,))

    def _guarded(self, work):
        """``work()``; a corrupt database (a disk's fault: SQLite's journal survives kills) is reported through the
        package's guard for files it wrote (:func:`pyterrier_kdcl.paths.unreadable`), naming the file and the fix."""
        try:
            return work()
        except sqlite3.DatabaseError as err:
            if getattr(err, "sqlite_errorname", None) not in ("SQLITE_CORRUPT", "SQLITE_NOTADB"):
                raise  # a lock held too long, a full disk: not the file's fault
            from pyterrier_kdcl import paths

            raise paths.unreadable(self.file, err, f"delete {self.path} (its teacher scores are computed again), "
                                                   "or give the trainer another teacher_cache") from err

    def _writing(self):
        return _Transaction(self.db)

    def get(self, keys: list[bytes]) -> dict[bytes, float]:
        return self._guarded(lambda: self._get(keys))

    def _get(self, keys: list[bytes]) -> dict[bytes, float]:
        found = {}
        for start in range(0, len(keys), _SQL_CHUNK):
            chunk = keys[start : start + _SQL_CHUNK]
            rows = self.db.execute(f"SELECT key, score FROM scores WHERE key IN ({','.join('?' * len(chunk))})",
                                   chunk).fetchall()
            found.update(rows)
        return found

    def put(self, keys: list[bytes], scores: Iterable[float]) -> None:
        def insert():
            with self._writing():
                self.db.executemany("INSERT OR IGNORE INTO scores VALUES (?, ?)", zip(keys, map(float, scores)))

        self._guarded(insert)

    def __len__(self) -> int:
        return self.db.execute("SELECT COUNT(*) FROM scores").fetchone()[0]

    def close(self) -> None:
        self.db.close()


class _Transaction:
    def __init__(self, db: sqlite3.Connection):
        self.db = db

    def __enter__(self):
        self.db.execute("BEGIN IMMEDIATE")  # the write lock now, or wait for it: never a failed upgrade later

    def __exit__(self, exc_type, exc, tb):
        self.db.execute("COMMIT" if exc_type is None else "ROLLBACK")


@dataclass
class Processes:
    """The processes of one fit: this one's rank, how many, and how to share objects among them."""

    rank: int = 0
    world: int = 1
    broadcast: Callable = lambda obj: obj  # the main process's object, on every process
    gather: Callable = lambda obj: [obj]  # every process's object, in rank order, on every process

    @property
    def is_main(self) -> bool:
        return self.rank == 0


class TeacherScores:
    """The teacher's score for every pair of the groups: ``prepare`` once, then ``lookup`` per batch.

    Pairs go through ``prepare`` in chunks of ``CHUNK_PAIRS`` (each looked up in the cache, its missing pairs
    scored, written), and nothing of them stays in memory: ``lookup`` reads a batch's scores back from a file, the
    cache (``scores.sqlite3``) on the first process, or a private temporary SQLite file (removed when this object is
    collected) holding every pair's score on any other process and in a fit without a cache directory. No text or
    key is held, so memory does not grow with the pairs (a streaming ``GroupSampler`` stays small here too).

    Under several processes the first one alone opens the cache file; every other one writes the pairs it scores to
    its own file beside it (``scores.rank-<r>.sqlite3``: one writer a file, so a crash keeps its progress without
    SQLite locking over shared storage) and removes it once the first process has gathered its scores.
    :func:`merge_shards` folds such files into the cache: the first process does it at the start of ``prepare``
    (the leftovers of a crashed run), and a user does it once after scoring shards on separate machines.

    Args:
        teacher: any transformer that scores the rows it is given.
        cache_dir: where scores persist (a directory per teacher inside it), or None to keep them in memory.
        key: names the teacher's scores in the cache, instead of its fingerprint (needed to persist the scores of
            a teacher that has none); change it whenever the teacher changes. A ``cache_dir`` for a teacher with
            neither is refused.

    Example (scoring on two machines, merged once; ``groups`` the same on both)::

        TeacherScores(teacher, "cache").prepare(groups, Processes(rank=r, world=2))  # on machine r
        # copy machine 1's cache/<fingerprint>/scores.rank-1.sqlite3 beside machine 0's scores.sqlite3, then
        merge_shards("cache/<fingerprint>")   # a fit with teacher_cache="cache" now scores nothing
    """

    def __init__(self, teacher: pt.Transformer, cache_dir: str | Path | None, *, key: str | None = None,
                 verbose: bool = False):
        self.teacher = teacher
        self.checked = CheckedTeacher(teacher)
        self.first_stage = reads_first_stage_score(teacher)  # part of every pair's key when given to the teacher
        self.verbose = verbose
        self.path = None
        if cache_dir is not None:
            name = teacher_fingerprint(teacher, key)
            if name is None:
                raise ValueError(unnamed_teacher_message(teacher))
            self.path = Path(cache_dir) / name
        self.cache_name = self.path.name if self.path is not None else None
        self._description = json.dumps({"teacher": repr(teacher), "key": key})
        self._store, self._closed, self._bar = None, False, None
        self.scored = 0  # pairs this process had the teacher score
        self._prepared = False
        self._lookups: ScoreStore | None = None  # a temporary store lookup reads; None: it reads the cache
        self._reader: ScoreStore | None = None  # a read-only connection to the cache once the writer is closed

    @property
    def store(self) -> ScoreStore | None:
        """The cache (opened on first use, by the process that uses it); None without a cache_dir or once closed."""
        if self._store is None and self.path is not None and not self._closed:
            self._store = ScoreStore(self.path, self._description)
        return self._store

    def prepare(self, groups: Iterable[Group], processes: Processes | None = None) -> None:
        """Finds every distinct pair of the groups (query, docno, text, and the first-stage score when the teacher
        reads it) in the cache, and has the teacher score the rest, each process its share, chunk by chunk, each
        chunk written to the cache as it is scored."""
        processes = processes or Processes()
        if processes.is_main:
            cache = self.store if self.path is not None else ScoreStore.temporary()  # pairs of earlier chunks too
            if self.path is not None:
                merge_shards(self.path, cache)
        else:
            cache = None
        # what lookup reads: the main's cache holds every pair by the end; another process keeps its own copy
        lookups = cache if cache is not None else ScoreStore.temporary()
        # the leftovers of a crashed run are merged (and their files removed) before another process opens its own
        processes.broadcast(None)
        own = cache if processes.is_main or self.path is None else \
            ScoreStore(self.path, self._description, file=shard_file(processes.rank))
        gathered_all = True
        for pairs in _distinct_chunks(groups, self.first_stage, CHUNK_PAIRS):
            keys = [pair_key(q, d, t, s) for _, q, d, t, s in pairs]
            scores = np.full(len(pairs), np.nan)
            if cache is not None:
                cached = cache.get(keys)
                scores = np.array([cached.get(k, np.nan) for k in keys], dtype="float64")
            scores = processes.broadcast(scores)  # the main process's view decides what is missing
            mine = np.flatnonzero(np.isnan(scores))[processes.rank :: processes.world]
            my_scores = self._score(pairs, keys, mine, own)
            shares = processes.gather((mine, my_scores))
            gathered_all &= len(shares) == processes.world
            for rank, (indices, values) in enumerate(shares):
                scores[indices] = values
                if cache is not None and rank != processes.rank:
                    cache.put([keys[i] for i in indices], values)  # the others' shares, on the main's disk too
            if lookups is not cache:
                known = ~np.isnan(scores)  # a shard scored alone (no gather) lacks the other processes' scores
                lookups.put([k for k, ok in zip(keys, known) if ok], scores[known])
        if own is not None and own is not cache:
            own.close()
            if gathered_all:  # the first process holds this one's scores now; a shard scored alone waits for a merge
                (self.path / shard_file(processes.rank)).unlink(missing_ok=True)
        self._lookups = None if lookups is self._store else lookups
        self._prepared = True

    def _score(self, pairs, keys, indices: np.ndarray, store) -> np.ndarray:
        out = np.empty(len(indices))
        if len(indices) == 0:
            return out
        if self._bar is None:
            self._bar = pt.tqdm(desc=f"teacher {self.teacher!r}", unit="pair", disable=not self.verbose)
        frame = pd.DataFrame([pairs[i] for i in indices], columns=["qid", "query", "docno", "text",
                                                                   FIRST_STAGE_COLUMN])
        if frame[FIRST_STAGE_COLUMN].isna().all():  # groups without first-stage scores, or a teacher not given them
            frame = frame.drop(columns=FIRST_STAGE_COLUMN)
        out[:] = self.checked(frame)["score"].to_numpy(dtype="float64")
        self.scored += len(indices)
        if store is not None:
            store.put([keys[i] for i in indices], out)
        self._bar.update(len(indices))
        return out

    def _scores_of(self, groups: Iterable[Group]) -> np.ndarray:
        """The groups' pairs' scores (float64), read from the cache or the temporary store."""
        wanted = [pair_key(*pair) for g in groups for pair in _pairs_of(g, self.first_stage)]
        found = self._source().get(list(dict.fromkeys(wanted))) if self._prepared else {}
        if len(found) < len(set(wanted)):
            raise KeyError("a group holds a pair the teacher's scores were not prepared for: prepare() them first")
        return np.array([found[k] for k in wanted], dtype="float64")

    def _source(self) -> ScoreStore:
        if self._lookups is not None:
            return self._lookups  # the temporary store
        if self._store is not None:
            return self._store  # the cache, still open
        if self._reader is None:  # the cache's writer is closed: read the file
            self._reader = ScoreStore.reader(self.path)
        return self._reader

    def lookup(self, groups: list[Group]) -> torch.Tensor:
        """The groups' teacher scores, ``(len(groups), group size)`` float32."""
        return torch.tensor(self._scores_of(groups), dtype=torch.float32).view(len(groups), -1)

    def of(self, group: Group) -> np.ndarray:
        """One group's scores as the teacher gave them (float64), in the group's order; any length of group."""
        return self._scores_of([group])

    def close(self) -> None:
        """Closes the cache's connections; ``lookup`` goes on working (it reopens the cache file to read, or reads
        the temporary store, which lives as long as this object)."""
        for store in (self._store, self._reader):
            if store is not None:
                store.close()
        self._store, self._reader, self._closed = None, None, True
        if self._bar is not None:
            self._bar.close()
            self._bar = None


def shard_file(rank: int) -> str:
    """The file a process other than the first writes its teacher scores to."""
    return f"scores.rank-{rank}.sqlite3"


def merge_shards(path: str | Path, store: ScoreStore | None = None) -> int:
    """Folds every ``scores.rank-<r>.sqlite3`` in a teacher's cache directory into its ``scores.sqlite3`` (one
    transaction a file; a key already there keeps its score) and removes the files; returns the scores added.

    Example::

        merge_shards("teacher_scores/3f2a9c0d1e2b4a5c")   # after copying each machine's shard file there
    """
    path = Path(path)
    shards = sorted(path.glob("scores.rank-*.sqlite3"))
    if not shards:
        return 0
    own = store is None
    store = store or ScoreStore(path)
    before = len(store)
    for shard in shards:
        store.db.execute("ATTACH DATABASE ? AS shard", (str(shard),))
        try:
            with store._writing():
                store.db.execute("INSERT OR IGNORE INTO main.scores SELECT key, score FROM shard.scores")
        finally:
            store.db.execute("DETACH DATABASE shard")
        shard.unlink()
        for extra in ("-journal", "-wal"):
            Path(str(shard) + extra).unlink(missing_ok=True)
    added = len(store) - before
    if own:
        store.close()
    return added


def not_a_scorer_message(teacher, inp: pd.DataFrame, err: Exception) -> str:
    return (f"teacher {teacher!r} refused the (query, document) rows it was given (columns {list(inp.columns)}): "
            f"{str(err).splitlines()[0] if str(err) else type(err).__name__}. A teacher scores the rows it is "
            "given, as a reranker does; a retriever such as BM25 finds documents for queries instead. To teach "
            "with the first stage's own score (BM25's, when BM25 found the candidates), use kdcl.FirstStageScore(), "
            "alone or fused with other scorers in kdcl.ScoreFusion; to teach with a retriever's scores of the "
            "given documents, use a scorer of rows such as pt.text.scorer(wmodel='BM25')")


def unnamed_teacher_message(teacher) -> str:
    return (f"teacher {teacher!r} cannot be fingerprinted (it has no fingerprint() method and is not a composition "
            "such as a + b, 2 * a or a >> b of teachers that have one), so its scores cannot be cached on disk "
            "under a name that changes when the teacher does. Name them yourself with teacher_cache_key='…' "
            "(change it whenever the teacher changes), give the teacher a fingerprint() method, or leave "
            "teacher_cache unset to keep the scores in memory for this fit")


def pair_key(query: str, docno: str, text: str, first_stage_score: float | None = None) -> bytes:
    """16 bytes identifying what a teacher scores: (query, docno, text), and the first-stage score for a teacher
    given it (without one, the key is what it was before first-stage scores were keyed)."""
    digest = hashlib.blake2b(digest_size=16)
    for part in (query, docno, text):
        data = part.encode("utf-8", "surrogatepass")
        digest.update(len(data).to_bytes(8, "little"))
        digest.update(data)
    if first_stage_score is not None:
        digest.update(struct.pack("<d", float(first_stage_score)))
    return digest.digest()


def _pairs_of(group: Group, first_stage: bool) -> Iterable[tuple]:
    """A group's pairs as the teacher scores them: (query, docno, text, first-stage score or None), the score
    None unless the teacher reads it and the group carries it."""
    scores = group.first_stage_scores if first_stage and group.first_stage_scores else (None,) * len(group.docnos)
    return zip(itertools.repeat(group.query), group.docnos, group.texts, scores)


def _distinct_chunks(groups: Iterable[Group], first_stage: bool, size: int) -> Iterable[list[tuple]]:
    """The groups' pairs (qid, query, docno, text, first-stage score or None) in chunks of about ``size``, each
    pair once within its chunk (a pair met in an earlier chunk is found in the cache by then)."""
    pairs, seen = [], set()
    for g in groups:
        for pair in _pairs_of(g, first_stage):
            if pair not in seen:
                seen.add(pair)
                pairs.append((g.qid, *pair))
        if len(pairs) >= size:
            yield pairs
            pairs, seen = [], set()
    if pairs:
        yield pairs
