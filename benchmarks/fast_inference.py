"""Fast CPU mode: ``optimize_for_cpu`` (dynamic int8) against float32 — speed and nDCG@10 on kdcl/manpages/test.

    python benchmarks/fast_inference.py                          # 60 sampled test queries, BM25 top 20
    python benchmarks/fast_inference.py --queries 931 --depth 100  # every test query, top 100 (hours on 2 cores)

nDCG means something only for a model that ranks: a fresh head ranks at random. So the model is
``minilm-l6`` CL-trained for a few minutes on kdcl/manpages/train (``common.trained_checkpoint``: built once,
then cached). Every variant loads that checkpoint and reranks the same BM25 candidates of a seeded sample of
test queries, batch 32, max_length 256, slice by slice in a balanced rotating order.
Variants: ``fp32``; ``int8`` (``optimize_for_cpu(reranker)``: every linear layer int8 but the feed-forward
output projections, where most of the int8 error arises); ``int8-all`` (``keep_float=None``: every linear
layer int8). Figures: end-to-end pairs/s (tokenization included, with the package's own pre-cut of long
documents), model-only pairs/s (time inside the forward pass), nDCG@10 of BM25 and of each variant on the
sample, each int8 variant's difference from fp32 with its 95% interval over queries, and how much a pair's
score moves when it is batched with other pairs.
"""

from __future__ import annotations

import argparse
import statistics
import time

import ir_measures
import numpy as np
import pandas as pd
import pyterrier as pt
from common import DATASET, ForwardTimer, bm25_frame, header, rotation, trained_checkpoint
from scipy import stats

import pyterrier_kdcl as kdcl
from pyterrier_kdcl.serving import optimize_for_cpu


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--queries", type=int, default=60, help="test queries, sampled with --seed")
    parser.add_argument("--depth", type=int, default=20, help="BM25 candidates per query")
    parser.add_argument("--slices", type=int, default=6, help="a multiple of the number of variants")
    parser.add_argument("--variants", nargs="+", default=["fp32", "int8", "int8-all"],
                        choices=["fp32", "int8", "int8-all"])
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--max-length", type=int, default=256)
    parser.add_argument("--train-queries", type=int, default=800)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    header(f"fast inference: int8 (optimize_for_cpu) vs fp32, batch {args.batch_size}, max_length {args.max_length}")

    path = trained_checkpoint(queries=args.train_queries)
    dataset = pt.get_dataset("irds:" + DATASET)
    topics = dataset.get_topics()
    sample = topics.sample(n=min(args.queries, len(topics)), random_state=args.seed)
    frame = bm25_frame(DATASET, depth=args.depth, topics=sample)
    print(f"model: {path.name}; {frame['qid'].nunique()} test queries x top {args.depth} = {len(frame)} pairs")

    settings = {"device": "cpu", "verbose": False, "batch_size": args.batch_size, "max_length": args.max_length}
    variants = {"fp32": kdcl.CrossEncoder.load(path, **settings),
                "int8": optimize_for_cpu(kdcl.CrossEncoder.load(path, **settings)),
                "int8-all": optimize_for_cpu(kdcl.CrossEncoder.load(path, **settings), keep_float=None)}
    variants = {name: variants[name] for name in args.variants}
    timers = {name: ForwardTimer(reranker.ranker) for name, reranker in variants.items()}
    for reranker in variants.values():
        reranker(frame.head(8))  # warm-up

    qids = frame["qid"].unique()
    results = {name: [] for name in variants}
    seconds = {name: [] for name in variants}
    forward = {name: [] for name in variants}
    for i, part in enumerate(np.array_split(qids, args.slices)):
        piece = frame[frame["qid"].isin(part)]
        for name in rotation(list(variants), i):
            before, start = timers[name].seconds, time.perf_counter()
            results[name].append(variants[name](piece))
            seconds[name].append(time.perf_counter() - start)
            forward[name].append(timers[name].seconds - before)
        print(f"slice {i}: {len(piece)} pairs, " + ", ".join(
            f"{n} {seconds[n][-1]:.1f}s (forward {forward[n][-1]:.1f}s)" for n in variants), flush=True)

    runs = {"bm25": frame} | {name: pd.concat(parts) for name, parts in results.items()}
    dependence = {name: rescore_in_other_batches(variants[name], results[name][0]) for name in variants}
    qrels = dataset.get_qrels()
    report(frame, runs, seconds, forward, qrels[qrels["qid"].isin(sample["qid"])], dependence)


def rescore_in_other_batches(reranker, scored: pd.DataFrame) -> float:
    """Max |score change| when the same pairs are scored again, batched with different neighbours."""
    shuffled = scored.sample(frac=1.0, random_state=1)
    again = reranker.score_pairs(shuffled["query"], shuffled[reranker.text_field])
    return float(np.abs(again - shuffled["score"].to_numpy()).max())


def report(frame, runs, seconds, forward, qrels, dependence: dict) -> None:
    pairs = len(frame)
    qrels = qrels.rename(columns={"qid": "query_id", "docno": "doc_id", "label": "relevance"})
    per_query = {}
    for name, run in runs.items():
        run = run.rename(columns={"qid": "query_id", "docno": "doc_id"})[["query_id", "doc_id", "score"]]
        per_query[name] = pd.Series({m.query_id: m.value for m in ir_measures.iter_calc([ir_measures.nDCG @ 10],
                                                                                         qrels, run)})
    print(f"\n{'variant':<10} {'pairs/s':>8} {'model-only pairs/s':>19} {'nDCG@10':>8} {'batch dependence':>17}")
    for name in runs:
        speed = f"{pairs / sum(seconds[name]):>8.1f} {pairs / sum(forward[name]):>19.1f}" if name in seconds else \
            f"{'':>8} {'':>19}"
        extra = f"{dependence[name]:>17.4f}" if name in dependence else ""
        print(f"{name:<10} {speed} {per_query[name].mean():>8.4f} {extra}")
    print("(batch dependence: max |score change| when the same pairs are batched with other neighbours)")
    fp32 = runs["fp32"].set_index(["qid", "docno"])["score"]
    for name in [n for n in seconds if n != "fp32"]:
        quick = runs[name].set_index(["qid", "docno"])["score"].reindex(fp32.index)
        taus = [stats.kendalltau(fp32[q], quick[q]).statistic for q in fp32.index.get_level_values(0).unique()]
        diff = per_query[name] - per_query["fp32"].reindex(per_query[name].index)
        half = 1.96 * diff.std(ddof=1) / np.sqrt(len(diff)) if len(diff) > 1 else float("nan")
        ratios = [f / i for f, i in zip(seconds["fp32"], seconds[name])]
        model_ratios = [f / i for f, i in zip(forward["fp32"], forward[name])]
        print(f"\n{name}: nDCG@10 - fp32 {diff.mean():+.4f} (95% interval {diff.mean() - half:+.4f} to "
              f"{diff.mean() + half:+.4f} over {len(diff)} queries, {int((diff != 0).sum())} changed; "
              "goal |difference| <= 0.005)")
        print(f"{name}: |score - fp32| mean {np.abs(quick - fp32).mean():.3f}, max {np.abs(quick - fp32).max():.3f} "
              f"(fp32 scores: sd {fp32.std():.2f}); Kendall tau within a query: median "
              f"{statistics.median(taus):.3f}, min {min(taus):.3f}")
        print(f"ratio {name}/fp32 model-only: {statistics.median(model_ratios):.2f}x (range "
              f"{min(model_ratios):.2f}-{max(model_ratios):.2f})")
        print(f"ratio {name}/fp32 pairs/s end-to-end: {statistics.median(ratios):.2f}x (median of {len(ratios)} "
              f"slices, range {min(ratios):.2f}-{max(ratios):.2f}; goal >= 1.5)")


if __name__ == "__main__":
    main()
