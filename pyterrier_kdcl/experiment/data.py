"""What the experiment reads from a collection: sampled topics, qrels, and first-stage candidates with text.

One function per step, so training, validation and evaluation all see their data built the same way:
judged queries only, a seeded sample of them (the same for every system and every training seed), the first
stage cut at ``depth``, and the document text the rerankers read in a ``text`` column.
"""

from __future__ import annotations

import pandas as pd
import pyterrier as pt

from pyterrier_kdcl.experiment.config import Data


def dataset(data: Data):
    """The PyTerrier dataset of ``data``."""
    import pyterrier_kdcl.offline.datasets  # noqa: F401 — irds:kdcl/... resolve even without the entry point

    return pt.get_dataset(data.dataset)


def topics_and_qrels(data: Data, sample_seed: int = 0, min_label: int = 1) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Topics with at least one qrel of ``min_label`` or more, sampled to ``data.queries``, and their qrels."""
    ds = dataset(data)
    topics = ds.get_topics(data.query_field) if data.query_field else ds.get_topics()
    if "query" not in topics.columns:
        raise ValueError(f"{data.dataset} has several query fields; set query_field to one of "
                         f"{[c for c in topics.columns if c != 'qid']}")
    qrels = ds.get_qrels(data.qrels_variant) if data.qrels_variant else ds.get_qrels()
    topics = topics[["qid", "query"]].astype({"qid": str})
    qrels = qrels.astype({"qid": str, "docno": str})
    judged = set(qrels.loc[qrels["label"] >= min_label, "qid"])
    topics = topics[topics["qid"].isin(judged)].drop_duplicates("qid")
    if data.queries is not None and data.queries < len(topics):
        topics = topics.sample(n=data.queries, random_state=sample_seed)
    topics = topics.sort_values("qid", kind="stable").reset_index(drop=True)
    return topics, qrels[qrels["qid"].isin(set(topics["qid"]))].reset_index(drop=True)


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
