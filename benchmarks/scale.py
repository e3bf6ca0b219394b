"""Scale: memory of a fit against training-set size, and reranking time against candidates per query.

    python benchmarks/scale.py                          # 20 vs 60 training queries; 10/100/1000 candidates (~8 min)
    python benchmarks/scale.py --queries 40 --rerank-max-length 256
    python benchmarks/scale.py --only memory            # or --only rerank, transform-memory, sharded-memory

1. Peak RSS of a ``minilm-l6`` ContrastiveTrainer fit (group 8, 4 queries a step, max_length 256, one epoch)
   with 1x and 3x the training queries of kdcl/manpages/train, each fit in its own fresh process. Reported:
   the process's peak RSS (``getrusage``), its RSS when ``fit`` starts (model and training frame loaded), and
   the highest RSS sampled every 20 ms during ``fit``. Goal: peak within 10% between 1x and 3x. The peak is
   one step's activations (a bare Hugging Face forward + backward of one 32 x 256 batch peaks as high), and the
   allocator settles only after a few steps (bare PyTorch: 4.6 GB after 2 steps, 4.8 GB after 4 and after 8),
   so the 1x fit must run several steps, or the comparison measures step count instead of data size.
2. ``CrossEncoder.transform`` time with 10, 100 and 1000 candidates per query: for each query the candidates
   are drawn (seeded) from its BM25 top 1000, so every size sees documents of the same length distribution.
   Goal: linear (time per pair flat; log-log slope from 10 to 1000 candidates near 1).
3. Peak RSS of ``CrossEncoder.transform`` over 2,000 and 20,000 pairs (BM25's top 100 of 20 and 200 man-page test
   queries, max_length 64), each in its own fresh process: no per-call leak, bounded tokenisation chunks.
   Goal: peak within 10% (issue 16). The input frame belongs to the caller and holds the documents' text
   (3,225 distinct man pages at 20,000 pairs against 1,000 at 2,000): its own size is measured (each distinct
   string once) and the ratio is given with and without it.
4. The same for ``ShardedScorer`` with two CPU workers: the peak RSS of the parent and of each worker (the
   kernel's high-water mark, ``VmHWM``, read before the workers stop), summed over the three processes.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import resource
import statistics
import subprocess
import sys
import threading
import time

import numpy as np
import pandas as pd
from common import bm25_frame, fixed_head_checkpoint, header

TRAIN = "kdcl/manpages/train"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--queries", type=int, default=20, help="training queries of the 1x fit (3x: three times)")
    parser.add_argument("--max-length", type=int, default=256, help="max_length of the fits")
    parser.add_argument("--repeats", type=int, default=2, help="fits per size, alternating")
    parser.add_argument("--rerank-queries", type=int, default=2)
    parser.add_argument("--rerank-max-length", type=int, default=64,
                        help="max_length for the reranking sizes (the model's cost per pair does not change linearity)")
    parser.add_argument("--only", choices=["memory", "rerank", "transform-memory", "sharded-memory"])
    parser.add_argument("--child-fit", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--child-transform", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--child-sharded", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child_fit:
        return child_fit(args.child_fit, args.max_length)
    if args.child_transform:
        return child_transform(args.child_transform)
    if args.child_sharded:
        return child_transform(args.child_sharded, sharded=True)
    if args.only in ("transform-memory", "sharded-memory"):
        return transform_memory(sharded=args.only == "sharded-memory")
    header("scale: memory against training queries, reranking time against candidates")
    if args.only != "rerank":
        memory(args.queries, args.max_length, args.repeats)
    if args.only != "memory":
        rerank(args.rerank_queries, args.rerank_max_length)


# -- 1. memory ---------------------------------------------------------------------------------------------------
def memory(queries: int, max_length: int, repeats: int) -> None:
    fixed_head_checkpoint()  # built here, not inside the measured processes
    runs = {1: [], 3: []}
    for _ in range(repeats):  # 1x, 3x, 1x, 3x, ...: the same setting's spread shows what a difference means
        for factor in (1, 3):
            command = [sys.executable, __file__, "--child-fit", str(factor * queries), "--max-length", str(max_length)]
            out = subprocess.run(command, capture_output=True, text=True,
                                 env={**os.environ, "PYTHONWARNINGS": "ignore"})
            if out.returncode:
                sys.exit(f"fit with {factor * queries} queries failed:\n{out.stderr[-3000:]}")
            r = json.loads(out.stdout.strip().splitlines()[-1])
            runs[factor].append(r)
            print(f"{factor}x: {r['queries']} queries, {r['steps']} steps, {r['pairs']} pairs in {r['seconds']:.0f}s; "
                  f"RSS at fit start {r['rss_start_mb']:.0f} MB, max during fit {r['rss_fit_mb']:.0f} MB, "
                  f"process peak {r['peak_mb']:.0f} MB; training frame {r['frame_mb']:.0f} MB", flush=True)
    peak = {f: statistics.median(r["peak_mb"] for r in rs) for f, rs in runs.items()}
    spread = {f: (min(r["peak_mb"] for r in rs), max(r["peak_mb"] for r in rs)) for f, rs in runs.items()}
    print(f"peak RSS (median of {repeats}): 1x {peak[1]:.0f} MB (range {spread[1][0]:.0f}-{spread[1][1]:.0f}), "
          f"3x {peak[3]:.0f} MB (range {spread[3][0]:.0f}-{spread[3][1]:.0f})")
    print(f"ratio peak RSS 3x/1x: {peak[3] / peak[1]:.3f} (goal <= 1.10)")


def child_fit(queries: int, max_length: int) -> None:
    import psutil
    import pyterrier as pt

    import pyterrier_kdcl as kdcl

    frame = bm25_frame(TRAIN, queries=queries, depth=30)
    qrels = pt.get_dataset("irds:" + TRAIN).get_qrels()
    reranker = kdcl.CrossEncoder.load(fixed_head_checkpoint(), device="cpu", verbose=False, max_length=max_length)
    trainer = kdcl.ContrastiveTrainer(reranker, group_size=8, batch_size=4, epochs=1, seed=0, verbose=False)
    process = psutil.Process()
    start_rss = process.memory_info().rss
    highest = [start_rss]
    done = threading.Event()

    def sample():
        while not done.wait(0.02):
            highest[0] = max(highest[0], process.memory_info().rss)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    start = time.perf_counter()
    log = trainer.fit(frame, qrels)
    seconds = time.perf_counter() - start
    done.set()
    sampler.join()
    mb = 1024 * 1024
    print(json.dumps({
        "queries": queries, "steps": int(log["step"].max()), "pairs": int(log["pairs"].max()), "seconds": seconds,
        "rss_start_mb": start_rss / mb, "rss_fit_mb": highest[0] / mb,
        "peak_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "frame_mb": frame.memory_usage(deep=True).sum() / mb,
    }))


# -- 3. memory of scoring ---------------------------------------------------------------------------------------
def transform_memory(sizes=(20, 200), sharded: bool = False) -> None:
    fixed_head_checkpoint()
    flag = "--child-sharded" if sharded else "--child-transform"
    runs = {}
    for queries in sizes:
        out = subprocess.run([sys.executable, __file__, flag, str(queries)], capture_output=True, text=True,
                             env={**os.environ, "PYTHONWARNINGS": "ignore"})
        if out.returncode:
            sys.exit(f"transform over {queries} queries failed:\n{out.stderr[-3000:]}")
        r = runs[queries] = json.loads(out.stdout.strip().splitlines()[-1])
        each = " + ".join(f"{w:.0f}" for w in r["worker_peaks_mb"])
        workers = f" (parent {r['parent_peak_mb']:.0f} + workers {each})" if sharded else ""
        print(f"{r['pairs']} pairs in {r['seconds']:.0f}s: RSS before transform {r['rss_start_mb']:.0f} MB, "
              f"input frame {r['frame_mb']:.0f} MB, peak {r['peak_mb']:.0f} MB{workers}", flush=True)
    small, large = runs[sizes[0]], runs[sizes[1]]
    print(f"ratio peak RSS {sizes[1]}/{sizes[0]} queries: {large['peak_mb'] / small['peak_mb']:.3f}; without the "
          f"input frame: {(large['peak_mb'] - large['frame_mb']) / (small['peak_mb'] - small['frame_mb']):.3f} "
          "(goal <= 1.10)")


def child_transform(queries: int, sharded: bool = False) -> None:
    import psutil

    import pyterrier_kdcl as kdcl
    from pyterrier_kdcl.serving import ShardedScorer

    frame = bm25_frame("kdcl/manpages/test", queries=queries, depth=100)
    if sharded:
        reranker = ShardedScorer(fixed_head_checkpoint(), workers=2, max_length=64)
    else:
        reranker = kdcl.CrossEncoder.load(fixed_head_checkpoint(), device="cpu", verbose=False, max_length=64)
    start_rss = psutil.Process().memory_info().rss
    start = time.perf_counter()
    out = reranker(frame)
    seconds = time.perf_counter() - start
    mb = 1024 * 1024
    parent = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    workers = [high_water_mb(child.pid) for child in psutil.Process().children()  # not the resource tracker
               if "spawn_main" in " ".join(child.cmdline())]
    print(json.dumps({"pairs": len(out), "seconds": seconds, "rss_start_mb": start_rss / mb,
                      "frame_mb": frame_bytes(frame) / mb, "parent_peak_mb": parent, "worker_peaks_mb": workers,
                      "peak_mb": parent + sum(workers)}))


def frame_bytes(frame: pd.DataFrame) -> int:
    """What the frame holds: its arrays, and each distinct Python object in them once (rows share documents)."""
    objects = {id(v): v for column in frame.columns if frame[column].dtype.kind in "OT" for v in frame[column]}
    return int(frame.memory_usage(index=True, deep=False).sum()) + sum(map(sys.getsizeof, objects.values()))


def high_water_mb(pid: int) -> float:
    """Peak RSS of a running process (``VmHWM`` in /proc/<pid>/status)."""
    with open(f"/proc/{pid}/status") as status:
        line = next(line for line in status if line.startswith("VmHWM:"))
    return int(line.split()[1]) / 1024


# -- 2. reranking time ---------------------------------------------------------------------------------------------
def rerank(queries: int, max_length: int, sizes=(10, 100, 1000), repeats=(9, 3, 1)) -> None:
    import pyterrier_kdcl as kdcl

    pool = bm25_frame("kdcl/manpages/test", queries=queries, depth=max(sizes))
    reranker = kdcl.CrossEncoder.load(fixed_head_checkpoint(), device="cpu", verbose=False, max_length=max_length)
    reranker(pool.head(4))  # warm-up
    groups = [g for _, g in pool.groupby("qid", sort=False)]
    frames = {k: pd.concat([g.sample(n=min(k, len(g)), random_state=0) for g in groups]) for k in sizes}
    times = {k: [] for k in sizes}
    schedule = [k for rep in range(max(repeats)) for k, n in zip(sizes, repeats) if rep < n]
    for k in schedule:  # interleaved: 10, 100, 1000, 10, 100, 10, ...
        start = time.perf_counter()
        out = reranker(frames[k])
        times[k].append(time.perf_counter() - start)
        assert len(out) == len(frames[k])
    print(f"\nreranking {queries} queries, max_length {max_length} (median of {', '.join(map(str, repeats))} runs)")
    print(f"{'candidates':>10} {'pairs':>6} {'s per query':>12} {'ms per pair':>12}")
    per_pair = {}
    for k in sizes:
        seconds = statistics.median(times[k])
        per_pair[k] = seconds / len(frames[k])
        print(f"{k:>10} {len(frames[k]):>6} {seconds / queries:>12.2f} {1000 * per_pair[k]:>12.1f}")
    per_query = {k: statistics.median(times[k]) / queries for k in sizes}
    slope = math.log(per_query[sizes[-1]] / per_query[sizes[0]]) / math.log(sizes[-1] / sizes[0])
    spread = max(per_pair.values()) / min(per_pair.values())
    print(f"time per pair: largest/smallest {spread:.2f}")
    print(f"log-log slope of time vs candidates ({sizes[0]} to {sizes[-1]}): {slope:.3f} (linear: 1.0)")


if __name__ == "__main__":
    np.seterr(all="ignore")
    main()
