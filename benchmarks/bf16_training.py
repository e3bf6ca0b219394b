"""bf16 against float32 training: pairs/s of ``precision="bf16"`` and the validation nDCG@10 after the same steps.

    python benchmarks/bf16_training.py                                  # minilm-l6 and mpnet-base LoRA, 3 seeds
    python benchmarks/bf16_training.py --models minilm-l6 --seeds 1 --steps 10   # a quick look

The question of issue 24 item 2: on a CPU with native bfloat16 (AVX512-BF16 or AMX), does bf16 autocast over float32
master weights train faster, and does it train as well? Each (model, seed) is fitted twice, once per precision, on
the same groups (kdcl's ``GroupSampler``: 1 positive + 7 BM25 negatives of kdcl/manpages/train, 4 queries a step,
max_length 128) from the same seeded fresh head, and validated after the last step on 40 dev queries × BM25 top 10
(as a science config does, in the precision it trained in). The order of the two precisions alternates from seed
to seed, so a drift in background load falls on both.

Contenders (the recipes of experiments/cpu-architectures.yaml):

- ``minilm-l6``: all-MiniLM-L6-v2, full fine-tuning, mean pooling, lr 1e-4, head at 1e-2.
- ``mpnet-base``: all-mpnet-base-v2 with LoRA (r 8, alpha 64) and mean pooling, lr 5e-4.
- ``e5-small``: multilingual-e5-small (12 layers, 384 wide), MiniLM-L6's recipe (not in the default ``--models``).

Steady pairs/s counts from the end of the first step to the end of the last (validation excluded). The verdict
line compares the median ratio with the issue's 1.5x and the mean nDCG difference (bf16 − fp32, paired by seed)
with its spread over seeds.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile

import pandas as pd
import pyterrier as pt
from common import bm25_frame, header

import pyterrier_kdcl as kdcl
from pyterrier_kdcl.training.groups import GroupSampler

GROUP, QUERIES_PER_STEP, MAX_LENGTH = 8, 4, 128
RECIPES = {
    "minilm-l6": {"reranker": {"pooling": "mean"}, "trainer": {"learning_rate": 1e-4, "head_learning_rate": 1e-2}},
    "mpnet-base": {"reranker": {"pooling": "mean", "lora": True}, "trainer": {"learning_rate": 5e-4}},
    "e5-small": {"reranker": {"pooling": "mean"}, "trainer": {"learning_rate": 1e-4, "head_learning_rate": 1e-2}},
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", nargs="+", default=["minilm-l6", "mpnet-base"], choices=list(RECIPES))
    parser.add_argument("--seeds", type=int, default=3, help="seeds 1..N, each fitted in both precisions")
    parser.add_argument("--steps", type=int, default=25, help="optimizer steps per fit")
    args = parser.parse_args()
    header(f"bf16 vs fp32 training: {', '.join(args.models)}, {args.seeds} seeds, {args.steps} steps of "
           f"{QUERIES_PER_STEP} groups of {GROUP}, max_length {MAX_LENGTH}")
    qrels = pt.get_dataset("irds:kdcl/manpages/train").get_qrels()
    frame = bm25_frame("kdcl/manpages/train", queries=2 * args.steps * QUERIES_PER_STEP, depth=30)
    usable = [g.qid for g in GroupSampler(frame, qrels, group_size=GROUP, seed=0).epoch(0)]
    frame = frame[frame["qid"].isin(usable[: args.steps * QUERIES_PER_STEP])]  # exactly `steps` steps
    dev = pt.get_dataset("irds:kdcl/manpages/dev")
    va_topics = dev.get_topics().head(40)
    va_qrels = dev.get_qrels()
    va_res = bm25_frame("kdcl/manpages/dev", topics=va_topics, depth=10)
    rows = []
    for model in args.models:
        for seed in range(1, args.seeds + 1):
            order = ["fp32", "bf16"] if seed % 2 else ["bf16", "fp32"]
            for precision in order:
                rows.append({"model": model, "seed": seed, "precision": precision,
                             **fit(model, precision, seed, args.steps, frame, qrels, va_res, va_qrels)})
                r = rows[-1]
                print(f"{model:<11} seed {seed} {precision}: {r['pairs/s']:6.2f} pairs/s, validation nDCG@10 "
                      f"{r['nDCG@10']:.4f} after {r['steps']} steps", flush=True)
    report(pd.DataFrame(rows))


def fit(model: str, precision: str, seed: int, steps: int, frame, qrels, va_res, va_qrels) -> dict:
    recipe = RECIPES[model]
    reranker = kdcl.CrossEncoder(model, max_length=MAX_LENGTH, device="cpu", verbose=False, **recipe["reranker"])
    with tempfile.TemporaryDirectory() as out:
        trainer = kdcl.ContrastiveTrainer(
            reranker, group_size=GROUP, batch_size=QUERIES_PER_STEP, epochs=1, warmup_ratio=0.1,
            seed=seed, precision=precision, validate_every=steps, output_dir=out, verbose=False, **recipe["trainer"])
        log = trainer.fit(frame, qrels, va_res, va_qrels)
    seconds = log["seconds"].tolist()
    per_step = QUERIES_PER_STEP * GROUP
    steady = [b - a for a, b in zip(seconds, seconds[1:-1])]  # the last step's time includes its validation
    return {"pairs/s": per_step * len(steady) / sum(steady), "nDCG@10": float(log["metric"].dropna().iloc[-1]),
            "steps": len(log)}


def report(rows: pd.DataFrame) -> None:
    print(f"\n{'model':<11} {'fp32 pairs/s':>13} {'bf16 pairs/s':>13} {'ratio (seeds)':>22} "
          f"{'fp32 nDCG@10':>13} {'bf16 nDCG@10':>13} {'bf16 - fp32 (sd over seeds)':>28}")
    for model, runs in rows.groupby("model", sort=False):
        wide = runs.pivot(index="seed", columns="precision")
        ratios = (wide["pairs/s"]["bf16"] / wide["pairs/s"]["fp32"]).tolist()
        diffs = (wide["nDCG@10"]["bf16"] - wide["nDCG@10"]["fp32"]).tolist()
        spread = statistics.stdev(diffs) if len(diffs) > 1 else float("nan")
        print(f"{model:<11} {statistics.median(wide['pairs/s']['fp32']):>13.2f} "
              f"{statistics.median(wide['pairs/s']['bf16']):>13.2f} "
              f"{statistics.median(ratios):>8.2f}x ({min(ratios):.2f}-{max(ratios):.2f}) "
              f"{wide['nDCG@10']['fp32'].mean():>13.4f} {wide['nDCG@10']['bf16'].mean():>13.4f} "
              f"{statistics.mean(diffs):>+14.4f} ({spread:.4f})")
    print("(pairs/s: medians over seeds; nDCG@10: means over seeds; goal: ratio >= 1.5x and bf16 no worse)")


if __name__ == "__main__":
    main()
