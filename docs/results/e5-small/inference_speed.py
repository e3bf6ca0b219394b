"""Probe (2026-12-04): cross-encoder inference pairs/s of e5-small against minilm-l6, fp32, max_length 128, batch 32,
on 320 BM25 pairs of kdcl/manpages/dev (fresh heads, mean pooling). Rounds alternate the order (A B, B A, ...) so
background load on the shared 2-core CPU falls on both; the medians of three rounds are printed.

Run from the repository root: ``python docs/results/e5-small/inference_speed.py`` (needs benchmarks/ on the path).
"""

import statistics
import sys
import time

sys.path.insert(0, "benchmarks")
from common import bm25_frame, machine  # noqa: E402

import pyterrier_kdcl as kdcl  # noqa: E402

frame = bm25_frame("kdcl/manpages/dev", queries=32, depth=10)
models = {name: kdcl.CrossEncoder(name, pooling="mean", max_length=128, batch_size=32, device="cpu", verbose=False)
          for name in ("minilm-l6", "e5-small")}
for model in models.values():
    model(frame.head(32))  # warm-up
speeds = {name: [] for name in models}
for r in range(3):
    for name in (list(models) if r % 2 == 0 else list(models)[::-1]):
        start = time.perf_counter()
        models[name](frame)
        speeds[name].append(len(frame) / (time.perf_counter() - start))
print(machine())
for name, values in speeds.items():
    print(f"{name}: {statistics.median(values):.1f} pairs/s (rounds: {', '.join(f'{v:.1f}' for v in values)})")
