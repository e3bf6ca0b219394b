"""bf16 against float32 training: pairs/s of ``precision="bf16"`` and the validation nDCG@10 after the same steps.

    python benchmarks/bf16_training.py                                  # minilm-l6 and mpnet-base LoRA, 3 seeds
    python benchmarks/bf16_training.py --models minilm-l6 --seeds 1 --steps 10   # a quick look
    python benchmarks/bf16_training.py --models gemma3-270m --precisions fp32 bf16 bf16-held \
        --seeds 2 --steps 5 --validation-queries 0                      # the decoder student: speed only
    python benchmarks/bf16_training.py --models gemma3-270m --precisions bf16-held fp32 --seeds 1 --steps 3 \
        --queries-per-step 1 --validation-queries 0                     # the same on a starved CPU (benchmarks/README)

The question of issue 24 item 2: on a CPU with native bfloat16 (AVX512-BF16 or AMX), does bf16 autocast over float32
master weights train faster, and does it train as well? Each (model, seed) is fitted once per precision, on the
same groups (kdcl's ``GroupSampler``: 1 positive + 7 BM25 negatives of kdcl/manpages/train, 4 queries a step unless
``--queries-per-step`` says otherwise, max_length 128) from the same seeded fresh head, and validated after the last
step on 40 dev queries × BM25 top 10 (as a science config does, in the precision it trained in). The order of the
two precisions alternates from seed to seed (three contenders rotate: A B C, C B A, ...), so a drift in
background load falls on each alike.

Contenders (the recipes of experiments/cpu-architectures.yaml):

- ``minilm-l6``: all-MiniLM-L6-v2, full fine-tuning, mean pooling, lr 1e-4, head at 1e-2.
- ``mpnet-base``: all-mpnet-base-v2 with LoRA (r 8, alpha 64) and mean pooling, lr 5e-4.
- ``gemma3-270m``: the decoder student of experiments/cpu-decoder.yaml: gemma-3-270m with LoRA (r 8,
  alpha 64, every linear layer), last-token scoring, lr 1e-4 (DESIGN.md's decoder recipe).
- ``e5-small``: multilingual-e5-small (12 layers, 384 wide), MiniLM-L6's recipe (not in the default ``--models``).

Precisions (``--precisions``): ``fp32``; ``bf16``, autocast over float32 weights; ``bf16-held``, the frozen weights
held in bf16 as well (``dtype="bf16"``, LoRA's trainable weights stay float32 masters), as the science configs hold
their LoRA students. ``--validation-queries 0`` measures speed alone (a decoder's validation costs minutes).

Steady pairs/s counts the optimizer steps after the first (each timed around the step: validation, logging and
checkpoints excluded), by the wall clock and, as a diagnostic, by the process's CPU clock. Pairs per CPU-second do
not stand in for a quiet machine: under a higher-priority job (2026-12-04, a nice -15 experiment on both cores)
MiniLM-L6 in bf16 gave 1.39 pairs/CPU-s at one group a step, 2.8 pairs/s for two threads, against 27-33 pairs/s
measured quiet at four groups a step (OpenMP threads spin while starved; caches go cold). Measure speed on a quiet
CPU. The verdict line compares the median ratio with the issue's 1.5x and the mean nDCG difference (bf16 − fp32,
paired by seed) with its spread over seeds.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time

import pandas as pd
import pyterrier as pt
from common import bm25_frame, header, rotation

import pyterrier_kdcl as kdcl
from pyterrier_kdcl.training.groups import GroupSampler

GROUP, MAX_LENGTH = 8, 128
RECIPES = {
    "minilm-l6": {"reranker": {"pooling": "mean"}, "trainer": {"learning_rate": 1e-4, "head_learning_rate": 1e-2}},
    "mpnet-base": {"reranker": {"pooling": "mean", "lora": True}, "trainer": {"learning_rate": 5e-4}},
    "gemma3-270m": {"reranker": {"lora": True}, "trainer": {"learning_rate": 1e-4}},
    "e5-small": {"reranker": {"pooling": "mean"}, "trainer": {"learning_rate": 1e-4, "head_learning_rate": 1e-2}},
}
PRECISIONS = {"fp32": ("fp32", None), "bf16": ("bf16", None), "bf16-held": ("bf16", "bf16")}  # (precision, dtype)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", nargs="+", default=["minilm-l6", "mpnet-base"], choices=list(RECIPES))
    parser.add_argument("--seeds", type=int, default=3, help="seeds 1..N, each fitted in both precisions")
    parser.add_argument("--steps", type=int, default=25, help="optimizer steps per fit")
    parser.add_argument("--queries-per-step", type=int, default=4, help="groups of 8 per step (the configs' 4)")
    parser.add_argument("--precisions", nargs="+", default=["fp32", "bf16"], choices=list(PRECISIONS),
                        help="contenders; the first is the reference of the ratios")
    parser.add_argument("--validation-queries", type=int, default=40,
                        help="dev queries (x BM25 top 10) validated after the last step; 0: speed only")
    args = parser.parse_args()
    header(f"bf16 vs fp32 training: {', '.join(args.models)}, {', '.join(args.precisions)}, {args.seeds} seeds, "
           f"{args.steps} steps of {args.queries_per_step} groups of {GROUP}, max_length {MAX_LENGTH}")
    qrels = pt.get_dataset("irds:kdcl/manpages/train").get_qrels()
    per_step = args.queries_per_step
    frame = bm25_frame("kdcl/manpages/train", queries=2 * args.steps * per_step, depth=30)
    usable = [g.qid for g in GroupSampler(frame, qrels, group_size=GROUP, seed=0).epoch(0)]
    frame = frame[frame["qid"].isin(usable[: args.steps * per_step])]  # exactly `steps` steps
    va_res = va_qrels = None
    if args.validation_queries:
        dev = pt.get_dataset("irds:kdcl/manpages/dev")
        va_qrels = dev.get_qrels()
        va_res = bm25_frame("kdcl/manpages/dev", topics=dev.get_topics().head(args.validation_queries), depth=10)
    rows = []
    for model in args.models:
        for seed in range(1, args.seeds + 1):
            for precision in rotation(args.precisions, seed - 1):
                rows.append({"model": model, "seed": seed, "precision": precision,
                             **fit(model, precision, seed, args.steps, per_step, frame, qrels, va_res, va_qrels)})
                r = rows[-1]
                print(f"{model:<11} seed {seed} {precision}: {r['pairs/s']:6.2f} pairs/s, {r['pairs/CPU-s']:6.2f} "
                      f"pairs/CPU-s, validation nDCG@10 {r['nDCG@10']:.4f} after {r['steps']} steps", flush=True)
    report(pd.DataFrame(rows), args.precisions)


def fit(model: str, precision: str, seed: int, steps: int, per_step: int, frame, qrels, va_res, va_qrels) -> dict:
    recipe = RECIPES[model]
    compute, dtype = PRECISIONS[precision]
    reranker = kdcl.CrossEncoder(model, max_length=MAX_LENGTH, device="cpu", verbose=False, dtype=dtype,
                                 **recipe["reranker"])
    with tempfile.TemporaryDirectory() as out:
        trainer = kdcl.ContrastiveTrainer(
            reranker, group_size=GROUP, batch_size=per_step, epochs=1, warmup_ratio=0.1,
            seed=seed, precision=compute, validate_every=steps, output_dir=out, verbose=False, **recipe["trainer"])
        clocks = []  # (wall, CPU) seconds of each optimizer step
        step = trainer._step  # the one training step (private: timed here alone, around the step and nothing else)

        def timed(*args, **kwargs):
            wall, cpu = time.perf_counter(), time.process_time()
            try:
                return step(*args, **kwargs)
            finally:
                clocks.append((time.perf_counter() - wall, time.process_time() - cpu))

        trainer._step = timed
        log = trainer.fit(frame, qrels, va_res, va_qrels)
    pairs = per_step * GROUP * (len(clocks) - 1)  # steady: the steps after the first
    metric = log["metric"].dropna()
    return {"pairs/s": pairs / sum(w for w, _ in clocks[1:]), "pairs/CPU-s": pairs / sum(c for _, c in clocks[1:]),
            "nDCG@10": float(metric.iloc[-1]) if len(metric) else float("nan"), "steps": len(log)}


def report(rows: pd.DataFrame, precisions: list[str]) -> None:
    """Each contender against the first (``ref``): median pairs/s, their per-seed ratio, the mean nDCG@10 difference."""
    ref = precisions[0]
    print(f"\n{'model':<11} {'contender':<10} {ref + ' pairs/s':>13} {'pairs/s':>9} {'ratio (seeds)':>22} "
          f"{ref + ' nDCG@10':>13} {'nDCG@10':>9} {'difference (sd over seeds)':>27}")
    for model, runs in rows.groupby("model", sort=False):
        wide = runs.pivot(index="seed", columns="precision")
        for other in precisions[1:]:
            ratios = (wide["pairs/s"][other] / wide["pairs/s"][ref]).tolist()
            cpu = (wide["pairs/CPU-s"][other] / wide["pairs/CPU-s"][ref]).tolist()
            diffs = (wide["nDCG@10"][other] - wide["nDCG@10"][ref]).tolist()
            spread = statistics.stdev(diffs) if len(diffs) > 1 else float("nan")
            print(f"{model:<11} {other:<10} {statistics.median(wide['pairs/s'][ref]):>13.2f} "
                  f"{statistics.median(wide['pairs/s'][other]):>9.2f} "
                  f"{statistics.median(ratios):>8.2f}x ({min(ratios):.2f}-{max(ratios):.2f}) "
                  f"{wide['nDCG@10'][ref].mean():>13.4f} {wide['nDCG@10'][other].mean():>9.4f} "
                  f"{statistics.mean(diffs):>+13.4f} ({spread:.4f})")
            print(f"{'':<11} {'by CPU s':<10} {statistics.median(wide['pairs/CPU-s'][ref]):>13.2f} "
                  f"{statistics.median(wide['pairs/CPU-s'][other]):>9.2f} "
                  f"{statistics.median(cpu):>8.2f}x ({min(cpu):.2f}-{max(cpu):.2f})   pairs per CPU-second "
                  "(a diagnostic, not a quiet machine's speed)")
    print("(pairs/s: medians over seeds; nDCG@10: means over seeds, nan without validation; goal: ratio >= 1.5x and "
          "bf16 no worse)")


if __name__ == "__main__":
    main()
