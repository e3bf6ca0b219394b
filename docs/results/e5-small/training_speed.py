"""Probe (2026-12-04): cross-encoder training pairs/s of e5-small against minilm-l6 under ``precision="bf16"``
(autocast over float32 master weights), 8 steps of 4 groups of 8 (1 positive + 7 BM25 negatives of
kdcl/manpages/train), max_length 128, mean pooling, full fine-tuning (lr 1e-4, head 1e-2), no validation.
The two models alternate (A B, then B A) so drifting background load on the shared 2-core CPU falls on both;
pairs/s counts from the end of the first step to the end of the last.

Run from the repository root: ``python docs/results/e5-small/training_speed.py``; output: ``training_speed.out``.
"""

import sys
import tempfile

sys.path.insert(0, "benchmarks")
import pyterrier as pt  # noqa: E402
from common import bm25_frame, machine  # noqa: E402

import pyterrier_kdcl as kdcl  # noqa: E402
from pyterrier_kdcl.training.groups import GroupSampler  # noqa: E402

STEPS, GROUP, PER_STEP = 8, 8, 4
qrels = pt.get_dataset("irds:kdcl/manpages/train").get_qrels()
frame = bm25_frame("kdcl/manpages/train", queries=2 * STEPS * PER_STEP, depth=30)
usable = [g.qid for g in GroupSampler(frame, qrels, group_size=GROUP, seed=0).epoch(0)]
frame = frame[frame["qid"].isin(usable[: STEPS * PER_STEP])]


def pairs_per_second(model: str) -> float:
    reranker = kdcl.CrossEncoder(model, pooling="mean", max_length=128, device="cpu", verbose=False)
    with tempfile.TemporaryDirectory() as out:
        trainer = kdcl.ContrastiveTrainer(
            reranker, group_size=GROUP, batch_size=PER_STEP, epochs=1, warmup_ratio=0.1, seed=1, precision="bf16",
            learning_rate=1e-4, head_learning_rate=1e-2, output_dir=out, verbose=False)
        log = trainer.fit(frame, qrels)
    seconds = log["seconds"].tolist()
    return PER_STEP * GROUP * (len(seconds) - 1) / (seconds[-1] - seconds[0])


print(machine())
for rnd, order in enumerate([["minilm-l6", "e5-small"], ["e5-small", "minilm-l6"]]):
    for model in order:
        print(f"round {rnd + 1} {model}: {pairs_per_second(model):.2f} pairs/s (bf16, {STEPS} steps)", flush=True)
