"""Inference: kdcl.CrossEncoder against sentence-transformers' CrossEncoder.predict, same checkpoint, same pairs.

    python benchmarks/inference.py                      # 1,024 pairs in 6 slices (a few minutes on 2 cores)
    python benchmarks/inference.py --pairs 4096 --slices 8

Both libraries load one directory: ``CrossEncoder("minilm-l6")`` with a seeded fresh head, saved once
(``common.fixed_head_checkpoint``). The pairs are BM25's top 50 for the first queries of kdcl/manpages/test,
with text. Batch 32, max_length 256, float32, CPU. The pairs are cut into slices; each slice is scored by
every contender in turn, the order rotating from slice to slice (each contender in each position
equally often), and the machine's fp32 matmul peak is
measured before each slice, so each slice's ratios compare runs that shared the same background load.

Contenders: ``kdcl`` (the package as it is, which tokenizes only a prefix of documents far longer than the
budget: same ids as tokenizing the whole text, see ``PairEncoder.encode``) and ``st`` (sentence-transformers,
its logits: activation Identity). FLOPs count only real tokens (no padding) of each pair.
"""

from __future__ import annotations

import argparse
import statistics
import time

import numpy as np
import torch
from common import ForwardTimer, bert_flops, fixed_head_checkpoint, header, matmul_peak, real_pairs, rotation

import pyterrier_kdcl as kdcl


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--pairs", type=int, default=1024)
    parser.add_argument("--slices", type=int, default=6, help="a multiple of the contenders")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--max-length", type=int, default=256)
    parser.add_argument("--model", default="minilm-l6")
    args = parser.parse_args()
    header(f"inference: kdcl vs sentence-transformers, {args.model}, batch {args.batch_size}, "
           f"max_length {args.max_length}, fp32 CPU")

    from sentence_transformers import CrossEncoder as STCrossEncoder

    path = fixed_head_checkpoint(args.model)
    frame = real_pairs(args.pairs)
    queries, texts = frame["query"].tolist(), frame["text"].tolist()
    chars = np.mean([len(t) for t in texts])
    print(f"pairs: {len(frame)} from {frame['qid'].nunique()} queries; documents of {chars:,.0f} characters on average")

    settings = {"device": "cpu", "verbose": False, "batch_size": args.batch_size, "max_length": args.max_length}
    ours = kdcl.CrossEncoder.load(path, **settings)
    st = STCrossEncoder(str(path), max_length=args.max_length, activation_fn=torch.nn.Identity(), device="cpu")
    contenders = {
        "kdcl": lambda q, t: ours.score_pairs(q, t, progress=False),
        "st": lambda q, t: st.predict(list(zip(q, t)), batch_size=args.batch_size, show_progress_bar=False),
    }
    timers = {"kdcl": ForwardTimer(ours.ranker), "st": ForwardTimer(st[0])}  # st calls model.forward itself
    names = list(contenders)

    lengths = np.array([len(p.input_ids) for p in ours.encoder.encode(queries, texts)])
    config = ours.ranker.model.config
    for name in names:  # warm-up: first calls allocate and load kernels
        contenders[name](queries[:8], texts[:8])
    for timer in timers.values():
        timer.seconds = 0.0

    bounds = np.linspace(0, len(frame), args.slices + 1).astype(int)
    scores = {name: np.empty(len(frame), dtype=np.float32) for name in names}
    rows = []
    for i, (lo, hi) in enumerate(zip(bounds[:-1], bounds[1:])):
        peak = matmul_peak(0.3)
        flops = bert_flops(lengths[lo:hi], config)
        row = {"slice": i, "pairs": hi - lo, "peak": peak, "gflop": flops / 1e9}
        for name in rotation(names, i):
            forward_before = timers[name].seconds
            start = time.perf_counter()
            scores[name][lo:hi] = contenders[name](queries[lo:hi], texts[lo:hi])
            row[name] = time.perf_counter() - start
            row[name + ":forward"] = timers[name].seconds - forward_before
        rows.append(row)
        print(f"slice {i}: {hi - lo} pairs, peak {peak:.0f} GFLOP/s, "
              + ", ".join(f"{n} {row[n]:.1f}s (forward {row[n + ':forward']:.1f}s)" for n in names), flush=True)

    report(rows, names, scores)


def report(rows: list[dict], names: list[str], scores: dict) -> None:
    pairs = sum(r["pairs"] for r in rows)
    gflop = sum(r["gflop"] for r in rows)
    peak = statistics.median(r["peak"] for r in rows)
    print(f"\nfp32 matmul peak (median of {len(rows)} measurements in this run): {peak:.0f} GFLOP/s "
          f"(range {min(r['peak'] for r in rows):.0f}-{max(r['peak'] for r in rows):.0f})")
    print(f"work: {gflop:.0f} GFLOP over real tokens ({gflop / pairs:.2f} GFLOP a pair)")
    print(f"{'contender':<12} {'pairs/s':>8} {'GFLOP/s':>8} {'of peak':>8} {'forward GFLOP/s':>16} {'of peak':>8} "
          f"{'forward share':>14}  max |score - st|")
    for name in names:
        seconds = sum(r[name] for r in rows)
        forward = sum(r[name + ":forward"] for r in rows)
        of_peak = statistics.median(r["gflop"] / r[name] / r["peak"] for r in rows)
        forward_of_peak = statistics.median(r["gflop"] / r[name + ":forward"] / r["peak"] for r in rows)
        diff = float(np.abs(scores[name] - scores["st"]).max())
        print(f"{name:<12} {pairs / seconds:>8.1f} {gflop / seconds:>8.0f} {of_peak:>8.0%} {gflop / forward:>16.0f} "
              f"{forward_of_peak:>8.0%} {forward / seconds:>14.0%}  {diff:.2e} "
              f"{'(equal to 1e-4)' if diff <= 1e-4 else '(NOT equal to 1e-4)'}")
    ratios = [r["st"] / r["kdcl"] for r in rows]
    print(f"ratio kdcl/st pairs/s: {statistics.median(ratios):.2f}x (median of {len(rows)} slices, "
          f"range {min(ratios):.2f}-{max(ratios):.2f}; goal >= 1.10)")


if __name__ == "__main__":
    main()
