"""Teacher scores for distillation: every (query, document) of every group scored once, cached on disk.

Any PyTerrier transformer that scores the rows it is given can teach: a ``CrossEncoder``, a pyterrier_dr
bi-encoder's ``text_scorer()``, a sum of transformers. Scores are joined by (qid, docno), never by position,
and must be finite. The cache is pyterrier-caching's ``Sqlite3ScorerCache``, keyed by query text and docno, in
a directory named after the teacher's fingerprint — so never point two different teachers at one directory.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable
from pathlib import Path

import numpy as np
import pandas as pd
import pyterrier as pt
import torch

from pyterrier_kdcl.training.groups import Group


def teacher_fingerprint(teacher: pt.Transformer) -> str:
    """Identity of a teacher for its cache: its weights where it exposes them, else its repr."""
    identity = teacher.fingerprint() if hasattr(teacher, "fingerprint") else repr(teacher)
    return hashlib.sha256(identity.encode()).hexdigest()[:16]


class CheckedTeacher(pt.Transformer):
    """Runs a teacher and insists it scored exactly the rows it was given, with finite scores."""

    schematic = {"label": "CheckedTeacher", "help_url": "docs/guide.md#4-choose-a-teacher"}

    def __init__(self, teacher: pt.Transformer):
        self.teacher = teacher

    def transform(self, inp: pd.DataFrame) -> pd.DataFrame:
        if len(inp) == 0:
            return inp.assign(score=pd.Series(dtype="float64"))
        out = self.teacher(inp.drop(columns=["score", "rank"], errors="ignore"))
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


class TeacherScores:
    """Scores groups with a teacher through an on-disk cache; ``prepare`` once, then ``lookup`` per batch."""

    def __init__(self, teacher: pt.Transformer, cache_dir: str | Path | None, verbose: bool = False):
        from pyterrier_caching import Sqlite3ScorerCache

        self.teacher = teacher
        path = None if cache_dir is None else Path(cache_dir) / teacher_fingerprint(teacher)
        self.cache = Sqlite3ScorerCache(path, CheckedTeacher(teacher), verbose=verbose)
        self.calls = 0

    def prepare(self, groups: Iterable[Group]) -> None:
        """Scores every distinct (query, docno) of the groups not yet in the cache, in one batched call."""
        frame = _frame(groups).drop_duplicates(["query", "docno"])
        self._scores(frame)

    def lookup(self, groups: list[Group]) -> torch.Tensor:
        frame = _frame(groups)
        return torch.tensor(self._scores(frame), dtype=torch.float32).view(len(groups), -1)

    def _scores(self, frame: pd.DataFrame) -> np.ndarray:
        out = self.cache(frame)
        # the cache answers in its own row order: join back by (query, docno)
        out = frame[["query", "docno"]].merge(out[["query", "docno", "score"]].drop_duplicates(["query", "docno"]),
                                              on=["query", "docno"], how="left")
        return out["score"].to_numpy(dtype="float64")

    def close(self) -> None:
        self.cache.close()


def _frame(groups: Iterable[Group]) -> pd.DataFrame:
    rows = [(g.qid, g.query, d, t) for g in groups for d, t in zip(g.docnos, g.texts)]
    return pd.DataFrame(rows, columns=["qid", "query", "docno", "text"])
