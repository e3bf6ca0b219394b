"""bf16 against float32 scoring: pairs/s of a packaged model held in bf16 (``dtype="bf16"``) and in float32.

    python benchmarks/bf16_scoring.py --model gemma3-270m      # 200 BM25 pairs of kdcl/manpages/test, max_length 128

What ``--check``'s planner needs for a ``dtype: bf16`` model (``plan.CPU_BF16_PAIRS_PER_SECOND``, inference): each
precision scores a first batch to warm up, then every pair once, timed by the wall clock. Run it on a quiet CPU.
"""

from __future__ import annotations

import argparse
import time

from common import header, real_pairs

import pyterrier_kdcl as kdcl


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="gemma3-270m")
    parser.add_argument("--pairs", type=int, default=200)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--max-length", type=int, default=128)
    args = parser.parse_args()
    header(f"bf16 vs fp32 scoring: {args.model}, {args.pairs} pairs, batch {args.batch_size}, "
           f"max_length {args.max_length}")
    pairs = real_pairs(args.pairs)
    queries, texts = pairs["query"].tolist(), pairs["text"].tolist()
    for dtype in ("bf16", "float32"):
        reranker = kdcl.CrossEncoder(args.model, dtype=dtype, max_length=args.max_length,
                                     batch_size=args.batch_size, verbose=False)
        reranker.score_pairs(queries[: args.batch_size], texts[: args.batch_size])  # warm-up
        start = time.perf_counter()
        reranker.score_pairs(queries, texts)
        print(f"{dtype:8s} {len(queries) / (time.perf_counter() - start):6.1f} pairs/s", flush=True)


if __name__ == "__main__":
    main()
