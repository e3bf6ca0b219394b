"""What the experiment reads from a collection: sampled topics, qrels, and first-stage candidates with text.

One function per step, so training, validation and evaluation all see their data built the same way:
judged queries only, a seeded sample of them (the same for every system and every training seed), the first
stage cut at ``depth``, and the document text the rerankers read in a ``text`` column.

``split`` keeps one half of a collection's queries, chosen by a stable hash of the qid (as the man-page splits
are): ``adaptation`` queries adapt a student to a new domain without their qrels, ``test`` queries evaluate it.
Unjudged training queries (:func:`unjudged_topics`) are drawn the same seeded way, and a larger sample holds
every smaller one: 300 unjudged queries are the first 300 of the 900.

The two halves share the collection's documents, so an adaptation half's candidates hold the test half's answers
(transductive adaptation). ``exclude_test_documents`` makes it inductive: :func:`excluded_documents` names the
evaluated test half's documents and :func:`without_documents` takes them out of the adaptation candidates.
"""

from __future__ import annotations

import hashlib

import pandas as pd
import pyterrier as pt

from pyterrier_kdcl.experiment.config import Data


def dataset(data: Data):
    """The PyTerrier dataset of ``data``."""
    import pyterrier_kdcl.offline.datasets  # noqa: F401 — irds:kdcl/... resolve even without the entry point

    return pt.get_dataset(data.dataset)


def half_of(qid: str) -> str:
    """``adaptation`` or ``test``: the half of a query, from the first 8 hex digits of its qid's SHA-1."""
    return ("adaptation", "test")[int(hashlib.sha1(qid.encode("utf-8")).hexdigest()[:8], 16) % 2]


def topics(data: Data) -> pd.DataFrame:
    """All topics of ``data`` (qid, query), in its ``split`` when one is set."""
    ds = dataset(data)
    frame = ds.get_topics(data.query_field) if data.query_field else ds.get_topics()
    if "query" not in frame.columns:
        raise ValueError(f"{data.dataset} has several query fields; set query_field to one of "
                         f"{[c for c in frame.columns if c != 'qid']}")
    frame = frame[["qid", "query"]].astype({"qid": str}).drop_duplicates("qid")
    if data.split is not None:
        frame = frame[[half_of(q) == data.split for q in frame["qid"]]]
    return frame


def _sample(frame: pd.DataFrame, n: int | None, sample_seed: int) -> pd.DataFrame:
    # a seeded permutation's first n rows: a larger sample of the same frame holds every smaller one
    if n is not None and n < len(frame):
        frame = frame.sample(n=n, random_state=sample_seed)
    return frame.sort_values("qid", kind="stable").reset_index(drop=True)


def topics_and_qrels(data: Data, sample_seed: int = 0, min_label: int = 1) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Topics with at least one qrel of ``min_label`` or more, sampled to ``data.queries``, and their qrels."""
    ds = dataset(data)
    qrels = ds.get_qrels(data.qrels_variant) if data.qrels_variant else ds.get_qrels()
    qrels = qrels.astype({"qid": str, "docno": str})
    judged = set(qrels.loc[qrels["label"] >= min_label, "qid"])
    all_topics = topics(data)
    sampled = _sample(all_topics[all_topics["qid"].isin(judged)], data.queries, sample_seed)
    return sampled, qrels[qrels["qid"].isin(set(sampled["qid"]))].reset_index(drop=True)


def unjudged_topics(data: Data, sample_seed: int = 0, exclude=()) -> pd.DataFrame:
    """Training queries whose qrels are never read: the topics of ``data`` (judged or not) less ``exclude`` (the
    judged training queries), sampled to ``data.queries``."""
    frame = topics(data)
    return _sample(frame[~frame["qid"].isin(set(exclude))], data.queries, sample_seed)


def first_stage(data: Data) -> pt.Transformer:
    """The retriever of ``data``, cut at ``data.depth`` candidates per query."""
    fs = data.first_stage
    if fs.kind == "bm25":
        from pyterrier_kdcl.offline.datasets import bm25

        return bm25(fs.index or data.dataset.removeprefix("irds:"), num_results=data.depth)
    if fs.kind == "scoreddocs":
        run = dataset(data).get_results()
    else:
        run = pt.io.read_results(fs.path)
    run = run.astype({"qid": str, "docno": str})
    run = run.sort_values(["qid", "score"], ascending=[True, False], kind="stable")
    run = run.groupby("qid", sort=False).head(data.depth)
    run = pt.model.add_ranks(run[["qid", "docno", "score"]])
    return pt.Transformer.from_df(run)


def text_stage(data: Data) -> pt.Transformer:
    """Adds the document text the rerankers read as ``text`` (several fields are joined by a space)."""
    fields = [data.text] if isinstance(data.text, str) else list(data.text)
    get = pt.text.get_text(dataset(data), fields)
    if fields == ["text"]:
        return get

    def join(frame: pd.DataFrame) -> pd.DataFrame:
        parts = frame[fields].fillna("").astype(str)
        text = parts.apply(lambda row: " ".join(v for v in row if v), axis=1) if len(frame) else ""
        return frame.assign(text=text)

    return get >> pt.apply.generic(join)


def candidates(data: Data, topics: pd.DataFrame) -> pd.DataFrame:
    """First-stage results of ``topics`` with their text: qid, query, docno, score, rank, text."""
    if len(topics) == 0:
        raise ValueError(f"{data.dataset}: no judged queries to retrieve for")
    res = (first_stage(data) >> text_stage(data))(topics)
    missing = set(topics["qid"]) - set(res["qid"])
    if len(missing) == len(topics):
        raise ValueError(f"{data.dataset}: the first stage ({data.first_stage.kind}) returned nothing for any query")
    return res.sort_values(["qid", "rank"], kind="stable").reset_index(drop=True)


def excluded_documents(kind: str, evaluated: list[tuple[pd.DataFrame, pd.DataFrame]]) -> set[str]:
    """The documents of evaluated test queries, from each test collection's ``(qrels, candidates)`` as evaluation
    builds them: ``judged``, every document judged for one of its queries (their answers); ``candidates``, every
    first-stage candidate of one of its queries (every document evaluation reranks, answers missed by the first
    stage left aside).

    >>> excluded_documents("judged", [(qrels, res)])  # doctest: +SKIP
    {'faq-python-12', ...}
    """
    if kind not in ("judged", "candidates"):
        raise ValueError(f"exclude_test_documents must be 'judged' or 'candidates', got {kind!r}")
    return {str(d) for qrels, res in evaluated for d in (qrels if kind == "judged" else res)["docno"]}


def without_documents(res: pd.DataFrame, docnos: set[str]) -> tuple[pd.DataFrame, dict]:
    """``res`` without the rows of ``docnos``, and what went: candidate rows, distinct documents, and queries left
    with no candidate at all (the trainer never sees them; a query left with fewer than a group is skipped there)."""
    drop = res["docno"].astype(str).isin(docnos)
    kept = res[~drop].reset_index(drop=True)
    return kept, {"candidates": int(drop.sum()), "documents": int(res.loc[drop, "docno"].nunique()),
                  "queries_emptied": int(res["qid"].nunique() - kept["qid"].nunique())}
