"""Fast CPU serving against float32 and the fast backends a user would pick instead, in one rotated run.

    python benchmarks/fast_inference.py --anchors-python .venv-anchors/bin/python --queries 500   # the issue's run
    python benchmarks/fast_inference.py --regime typical --pairs 400   # float32 vs sentence-transformers, typical docs
    python benchmarks/fast_inference.py --emulate-avx2 --queries 500 --contenders kdcl-fp32 kdcl-int8-rows kdcl-int8

nDCG means something only for a model that ranks: a fresh head ranks at random. So the model is ``minilm-l6``
CL-trained on kdcl/manpages/train (``common.trained_checkpoint``: built once, then cached). Every contender loads
that checkpoint and scores the same pairs, max_length 256, batch 32, slice by slice in a balanced rotating order:

* ``kdcl-fp32``: ``CrossEncoder.load(path)``; ``kdcl-fast``: ``optimize_for_cpu(...)`` (the default, ``auto``:
  bfloat16 where the CPU computes it natively, else ``int8-rows``; the header says which); ``kdcl-bf16``,
  ``kdcl-int8-rows`` (int8, one activation scale per row) and ``kdcl-int8`` (dynamic int8, one scale per batch):
  ``optimize_for_cpu(..., method)``; ``kdcl-int8-rows-whole``: ``int8-rows`` as it was before sub-batches (each width's
  pairs of a batch in one forward call, ``FixedWidths.tokens = None``: the same scores, more memory traffic);
* ``st-fp32``: sentence-transformers' ``CrossEncoder(path).predict`` in float32;
* with ``--anchors-python``, fast backends from their own environment (``anchors.py``): sentence-transformers'
  ``st-onnx-int8``, ``st-openvino-int8`` (static, calibrated) and ``st-openvino``, and two ways we could serve the
  checkpoint ourselves: ``ort-fused`` (ONNX Runtime float32 after optimum's O2 graph fusions) and ``ct2-int8``
  (CTranslate2's encoder, int8 weights, the checkpoint's classifier on its pooled output); ``--anchors`` picks.

Regimes: ``bm25`` (default) reranks BM25's top ``--depth`` of ``--queries`` sampled test queries (long documents:
BM25 favours long man pages) and reports pairs/s, nDCG@10 with each contender's paired difference from kdcl-fp32
and its 95% interval, Kendall's tau within a query, and batch dependence (the largest change of a pair's score
when 256 pairs of the first slice are scored again shuffled, 7 pairs a batch). ``typical`` pairs the test queries
with documents drawn at random from the collection (a typical man page's length) and reports speed and agreement.
``--record`` writes the equivalence figures of the bfloat16 method (kdcl-bf16, or kdcl-fast where it is bfloat16) into
``pyterrier_kdcl/fast_equivalence.json`` (read by the experiment runner's ``evaluation.fast``) when every quality goal
is met. ``--emulate-avx2`` restarts the script with every instruction set capped at AVX2 (oneDNN, ATen, MKL and
fbgemm; CTranslate2 and OpenVINO for the anchors: ``AVX2_ONLY``), a CPU without native bfloat16 or VNNI; the header
prints the caps in force. ONNX Runtime has no such cap: its anchors (``st-onnx-int8``, ``ort-fused``) use the whole
instruction set of the CPU they run on, VNNI included where it has it.
"""

from __future__ import annotations

import argparse
import json
import os
import pickle
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import ir_measures
import numpy as np
import pandas as pd
import pyterrier as pt
from anchors import ANCHORS
from common import DATASET, bm25_frame, cache_dir, header, rotation, trained_checkpoint
from scipy import stats

import pyterrier_kdcl as kdcl
from pyterrier_kdcl.fast import auto_method, native_bfloat16, optimize_for_cpu

EQUIVALENCE = Path(kdcl.__file__).parent / "fast_equivalence.json"
GOALS = {"ndcg_delta": 0.005, "ci_half_bound": 0.01, "tau": 0.95, "batch_dependence": 1e-3}
METHODS = {"kdcl-fast": "auto", "kdcl-bf16": "bf16", "kdcl-int8-rows": "int8-rows", "kdcl-int8-rows-whole": "int8-rows",
           "kdcl-int8": "int8"}
FAST = ("kdcl-fast", "kdcl-bf16", "kdcl-int8-rows", "kdcl-int8-rows-whole")  # batch-independent: quality goals checked
# a CPU without native bfloat16 or VNNI, emulated here (read when torch and fbgemm start: set before the import);
# CTranslate2 and OpenVINO read their own caps (ONNX Runtime has none: its anchors run with this CPU's full set)
AVX2_ONLY = {"ONEDNN_MAX_CPU_ISA": "AVX2", "ATEN_CPU_CAPABILITY": "avx2", "MKL_ENABLE_INSTRUCTIONS": "AVX2",
             "FBGEMM_ENABLE_INSTRUCTIONS": "AVX2", "CT2_FORCE_CPU_ISA": "AVX2", "OV_CPU_MAX_ISA": "AVX2"}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--regime", choices=["bm25", "typical"], default="bm25")
    parser.add_argument("--queries", type=int, default=60, help="test queries, sampled with --seed")
    parser.add_argument("--depth", type=int, default=20, help="BM25 candidates per query")
    parser.add_argument("--pairs", type=int, default=400, help="typical regime: number of pairs")
    parser.add_argument("--slices", type=int, default=8)
    parser.add_argument("--contenders", nargs="+", default=["kdcl-fp32", "kdcl-fast", "kdcl-int8", "st-fp32"],
                        choices=["kdcl-fp32", *METHODS, "st-fp32"])
    parser.add_argument("--anchors-python", help="python of the anchors' environment (see anchors.py)")
    parser.add_argument("--anchors", nargs="+", choices=ANCHORS, default=ANCHORS)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--max-length", type=int, default=256)
    parser.add_argument("--train-queries", type=int, default=800)
    parser.add_argument("--checkpoint", help="a saved reranker trained on the man pages, instead of training one")
    parser.add_argument("--record", action="store_true", help="write fast_equivalence.json when the goals are met")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--emulate-avx2", action="store_true", help="cap every instruction set at AVX2 (restarts)")
    args = parser.parse_args()
    if args.emulate_avx2 and any(os.environ.get(k) != v for k, v in AVX2_ONLY.items()):
        os.execve(sys.executable, [sys.executable, *sys.argv], {**os.environ, **AVX2_ONLY})
    header(f"fast inference ({args.regime}): kdcl fast/fp32/int8 vs sentence-transformers' backends, batch "
           f"{args.batch_size}, max_length {args.max_length}")

    caps = {k: os.environ[k] for k in AVX2_ONLY if k in os.environ}
    print(f"# instruction-set caps: {caps or 'none'}; native bfloat16: {native_bfloat16()}; "
          f"optimize_for_cpu's auto picks {auto_method()!r}")
    path = Path(args.checkpoint) if args.checkpoint else trained_checkpoint(queries=args.train_queries)
    dataset = pt.get_dataset("irds:" + DATASET)
    frame, sample = pairs(args, dataset)
    lengths = frame["text"].str.len()
    print(f"model: {path.name}; {frame['qid'].nunique()} queries, {len(frame)} pairs, documents "
          f"{lengths.mean():,.0f} characters on average (median {lengths.median():,.0f})")

    contenders = {name: local_contender(name, path, args) for name in args.contenders}
    anchors = Anchors(path, args) if args.anchors_python else None
    if anchors:
        contenders.update({name: anchors.contender(name) for name in anchors.names})
    for score in contenders.values():
        score(frame["query"].head(8).tolist(), frame["text"].head(8).tolist(), args.batch_size)  # warm-up

    qids = frame["qid"].unique()
    scores = {name: np.empty(len(frame), dtype=np.float32) for name in contenders}
    seconds = {name: [] for name in contenders}
    for i, part in enumerate(np.array_split(qids, args.slices)):
        rows = np.flatnonzero(frame["qid"].isin(part).to_numpy())
        queries, texts = frame["query"].iloc[rows].tolist(), frame["text"].iloc[rows].tolist()
        for name in rotation(list(contenders), i):
            scores[name][rows], took = contenders[name](queries, texts, args.batch_size)
            seconds[name].append(took)
        print(f"slice {i}: {len(rows)} pairs, " + ", ".join(f"{n} {seconds[n][-1]:.1f}s" for n in contenders),
              flush=True)

    first = np.flatnonzero(frame["qid"].isin(np.array_split(qids, args.slices)[0]).to_numpy())[:256]
    dependence = {name: batch_dependence(contenders[name], frame, first, scores[name]) for name in contenders}
    if anchors:
        anchors.close()
    report(args, frame, scores, seconds, dependence, dataset, sample)


# -- pairs ---------------------------------------------------------------------------------------------------
def pairs(args, dataset) -> tuple[pd.DataFrame, pd.DataFrame]:
    topics = dataset.get_topics()
    if args.regime == "bm25":
        sample = topics.sample(n=min(args.queries, len(topics)), random_state=args.seed)
        return bm25_frame(DATASET, depth=args.depth, topics=sample), sample
    rng = np.random.default_rng(args.seed)
    docs = pd.DataFrame(dataset.get_corpus_iter(verbose=False))
    chosen = docs.iloc[rng.choice(len(docs), size=args.pairs, replace=False)]
    queries = topics.iloc[rng.choice(len(topics), size=args.pairs)]
    frame = pd.DataFrame({"qid": queries["qid"].to_numpy(), "query": queries["query"].to_numpy(),
                          "docno": chosen["docno"].to_numpy(), "text": chosen["text"].to_numpy()})
    return frame, queries


# -- contenders: (queries, texts, batch_size) -> (scores, seconds) ---------------------------------------------
def local_contender(name: str, path: Path, args):
    settings = {"device": "cpu", "verbose": False, "max_length": args.max_length}
    if name == "st-fp32":
        from sentence_transformers import CrossEncoder

        model = CrossEncoder(str(path), device="cpu", max_length=args.max_length)
        import torch

        identity = torch.nn.Identity()

        def st(queries, texts, batch_size):
            start = time.perf_counter()
            out = model.predict(list(zip(queries, texts)), batch_size=batch_size, show_progress_bar=False,
                                activation_fn=identity, convert_to_numpy=True)
            return np.asarray(out, dtype=np.float32).reshape(-1), time.perf_counter() - start

        return st
    reranker = kdcl.CrossEncoder.load(path, **settings)
    if name in METHODS:
        optimize_for_cpu(reranker, METHODS[name])
    if name == "kdcl-int8-rows-whole":
        reranker.ranker.tokens = None  # int8-rows as of 2026-12-04: each width's pairs in one forward call

    def score(queries, texts, batch_size):
        reranker.batch_size = batch_size
        start = time.perf_counter()
        out = reranker.score_pairs(queries, texts)
        return out, time.perf_counter() - start

    return score


class Anchors:
    """The fast backends of anchors.py in their own environment, one process for all of them."""

    def __init__(self, path: Path, args):
        import torch

        train = bm25_frame("kdcl/manpages/train", queries=40, depth=8)  # calibration: training pairs, never test
        self._calibration = tempfile.NamedTemporaryFile(suffix=".pkl", delete=False)
        pickle.dump((train["query"].tolist(), train["text"].tolist()), self._calibration)
        self._calibration.close()
        work = cache_dir() / f"{path.name}-anchors"
        command = [args.anchors_python, str(Path(__file__).with_name("anchors.py")), "--model", str(path),
                   "--work", str(work), "--calibration", self._calibration.name, "--max-length",
                   str(args.max_length), "--threads", str(torch.get_num_threads()), "--anchors", *args.anchors]
        self.process = subprocess.Popen(command, stdin=subprocess.PIPE, stdout=subprocess.PIPE)
        self.names = pickle.load(self.process.stdout)

    def contender(self, name: str):
        def score(queries, texts, batch_size):
            pickle.dump((name, list(queries), list(texts), batch_size), self.process.stdin)
            self.process.stdin.flush()
            return pickle.load(self.process.stdout)

        return score

    def close(self) -> None:
        self.process.stdin.close()
        self.process.wait()
        Path(self._calibration.name).unlink(missing_ok=True)


def batch_dependence(score, frame: pd.DataFrame, rows: np.ndarray, scored: np.ndarray) -> float:
    """Largest |score change| of the given rows scored again shuffled, 7 pairs a batch (other batch mates)."""
    shuffled = np.random.default_rng(1).permutation(rows)
    again, _ = score(frame["query"].iloc[shuffled].tolist(), frame["text"].iloc[shuffled].tolist(), 7)
    return float(np.abs(again - scored[shuffled]).max())


# -- report --------------------------------------------------------------------------------------------------
def report(args, frame, scores, seconds, dependence, dataset, sample) -> None:
    pairs_count = len(frame)
    names = list(scores)
    base = "kdcl-fp32"
    print(f"\n{'contender':<18} {'pairs/s':>8} {'x kdcl-fp32 (median, range)':>30} {'max |dscore|':>13} "
          f"{'batch dependence':>17}")
    for name in names:
        ratios = [b / s for b, s in zip(seconds[base], seconds[name])]
        print(f"{name:<18} {pairs_count / sum(seconds[name]):>8.1f} "
              f"{statistics.median(ratios):>12.2f} ({min(ratios):.2f}-{max(ratios):.2f}){'':>6} "
              f"{np.abs(scores[name] - scores[base]).max():>13.4f} {dependence[name]:>17.2e}")
    for fast in [n for n in FAST if n in names]:
        for other in [n for n in names if n != fast]:
            ratios = [o / f for o, f in zip(seconds[other], seconds[fast])]
            print(f"ratio {fast} / {other}: {statistics.median(ratios):.2f}x (range {min(ratios):.2f}-"
                  f"{max(ratios):.2f} over {len(ratios)} slices)")
    if args.regime != "bm25":
        return
    qrels = dataset.get_qrels()
    qrels = qrels[qrels["qid"].isin(sample["qid"])].rename(
        columns={"qid": "query_id", "docno": "doc_id", "label": "relevance"})
    ndcg = {name: per_query_ndcg(frame, frame["score"].to_numpy(), qrels) for name in ["bm25"]}
    ndcg.update({name: per_query_ndcg(frame, scores[name], qrels) for name in names})
    print(f"\nnDCG@10 over {len(ndcg[base])} queries: " + ", ".join(f"{n} {v.mean():.4f}" for n, v in ndcg.items()))
    groups = frame.groupby("qid").indices
    figures = {}
    for name in [n for n in names if n != base]:
        diff = ndcg[name] - ndcg[base].reindex(ndcg[name].index)
        half = stats.t.ppf(0.975, len(diff) - 1) * diff.std(ddof=1) / np.sqrt(len(diff))
        taus = [stats.kendalltau(scores[base][rows], scores[name][rows]).statistic for rows in groups.values()]
        taus = [t for t in taus if not np.isnan(t)]
        figures[name] = {"ndcg_delta": float(diff.mean()), "ci": [float(diff.mean() - half), float(diff.mean() + half)],
                         "tau_median": float(statistics.median(taus)), "tau_min": float(min(taus)),
                         "batch_dependence": dependence[name], "queries": int(len(diff))}
        print(f"{name}: nDCG@10 - {base} {diff.mean():+.4f} (95% CI {diff.mean() - half:+.4f} to "
              f"{diff.mean() + half:+.4f}, {int((diff != 0).sum())} queries changed); Kendall tau within a query "
              f"median {statistics.median(taus):.3f}, min {min(taus):.3f}")
    for fast in [n for n in FAST if n in figures]:
        f = figures[fast]
        met = (abs(f["ndcg_delta"]) <= GOALS["ndcg_delta"] and max(map(abs, f["ci"])) <= GOALS["ci_half_bound"]
               and f["tau_median"] >= GOALS["tau"] and f["batch_dependence"] <= GOALS["batch_dependence"]
               and f["queries"] >= 500)
        print(f"\n{fast} quality goals (|delta| <= 0.005, CI inside +-0.01, tau >= 0.95, batch dependence <= 1e-3, "
              f">= 500 queries): {'met' if met else 'NOT met'}")
        bf16 = fast == "kdcl-bf16" or (fast == "kdcl-fast" and auto_method() == "bf16")
        if args.record and met and bf16:
            record(f, args)


def per_query_ndcg(frame: pd.DataFrame, scores: np.ndarray, qrels: pd.DataFrame) -> pd.Series:
    run = pd.DataFrame({"query_id": frame["qid"].to_numpy(), "doc_id": frame["docno"].to_numpy(), "score": scores})
    values = {m.query_id: m.value for m in ir_measures.iter_calc([ir_measures.nDCG @ 10], qrels, run)}
    return pd.Series(values).reindex(frame["qid"].unique()).fillna(0.0)


def record(figures: dict, args) -> None:
    """Adds the model family's entry to fast_equivalence.json (what evaluation.fast accepts)."""
    entries = json.loads(EQUIVALENCE.read_text()) if EQUIVALENCE.exists() else {}
    entries["minilm-l6"] = {**figures, "method": "bf16", "dataset": DATASET, "depth": args.depth,
                            "max_length": args.max_length, "date": time.strftime("%Y-%m-%d"),
                            "checkpoint": args.checkpoint or f"minilm-l6 CL on {args.train_queries} training queries",
                            "measured_by": "benchmarks/fast_inference.py"}
    EQUIVALENCE.write_text(json.dumps(entries, indent=2, sort_keys=True) + "\n")
    print(f"recorded in {EQUIVALENCE}")


if __name__ == "__main__":
    sys.exit(main())
