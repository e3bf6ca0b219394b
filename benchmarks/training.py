"""Training pairs/s: ContrastiveTrainer and DistillationTrainer against sentence-transformers' CrossEncoderTrainer.

    python benchmarks/training.py                       # 5 steps a fit, 2 rounds, max_length 128 (~6 minutes)
    python benchmarks/training.py --max-length 256 --steps 10 --rounds 3

Same model (``minilm-l6`` with a seeded fresh head, one saved directory loaded by both libraries), same
groups (kdcl's ``GroupSampler``: 1 positive + 7 BM25 negatives of kdcl/manpages/train, seed 0), 4 queries
(32 pairs) a step, same max_length, AdamW (torch's) with lr 1e-4, 10% linear warm-up, weight decay 0.01,
gradient clipping at 1.0, float32 on CPU, dropout on.

Contenders, each a fresh fit per round, in alternating order from round to round:

- ``kdcl-CL``: ``ContrastiveTrainer`` (InfoNCE, τ = 1).
- ``kdcl-KD``: ``DistillationTrainer`` with teacher scores already cached (a cheap deterministic teacher
  scores the groups once before the first round; the steps then read the cache, as in real distillation).
- ``st-MNRL``: ``CrossEncoderTrainer`` with ``MultipleNegativesRankingLoss(num_negatives=0, scale=1,
  activation_fn=None)`` over (query, positive, negative_1..7): exactly InfoNCE over the group. It scores
  each column in its own forward pass (8 passes of 4 pairs a step).
- ``st-ListNet``: ``CrossEncoderTrainer`` with ``ListNetLoss(mini_batch_size=32)`` over (query, docs, labels):
  listwise, one forward pass of 32 pairs a step (its target is softmax(labels), not one-hot).

Steady-state pairs/s counts from the end of the first step to the end of the last (setup and the first
step's allocations excluded); wall-clock pairs/s divides all pairs by the whole ``fit``/``train`` call.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
import zlib

import pandas as pd
import pyterrier as pt
import torch
from common import cache_dir, fixed_head_checkpoint, header, rotation

import pyterrier_kdcl as kdcl
from pyterrier_kdcl.groups import GroupSampler
from pyterrier_kdcl.teachers import TeacherScores

GROUP, QUERIES_PER_STEP, SEED = 8, 4, 0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=5, help="optimizer steps per fit")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--max-length", type=int, default=128)
    parser.add_argument("--only", nargs="*", help="contenders to run (default all)")
    args = parser.parse_args()
    header(f"training: kdcl vs sentence-transformers, minilm-l6, group {GROUP}, {QUERIES_PER_STEP} queries a step, "
           f"max_length {args.max_length}, fp32 CPU")

    from common import bm25_frame

    path = fixed_head_checkpoint()
    train = "kdcl/manpages/train"
    qrels = pt.get_dataset("irds:" + train).get_qrels()
    frame = bm25_frame(train, queries=3 * args.steps * QUERIES_PER_STEP, depth=30)
    groups = list(GroupSampler(frame, qrels, group_size=GROUP, seed=SEED).epoch(0))
    groups = groups[: args.steps * QUERIES_PER_STEP]
    frame = frame[frame["qid"].isin({g.qid for g in groups})]
    # the trainers rebuild their groups from this frame: check they are the ones sentence-transformers gets
    again = list(GroupSampler(frame, qrels, group_size=GROUP, seed=SEED).epoch(0))
    assert [(g.qid, g.docnos) for g in again] == [(g.qid, g.docnos) for g in groups], "groups differ"
    print(f"{len(groups)} groups of {GROUP} ({len(groups) * GROUP} pairs a fit, {args.steps} steps)")

    contenders = {
        "kdcl-CL": lambda: fit_kdcl(path, frame, qrels, args.max_length, teacher=None),
        "kdcl-KD": lambda: fit_kdcl(path, frame, qrels, args.max_length, teacher=CheapTeacher()),
        "st-MNRL": lambda: fit_st(path, groups, args.max_length, "mnrl"),
        "st-ListNet": lambda: fit_st(path, groups, args.max_length, "listnet"),
    }
    names = [n for n in contenders if not args.only or n in args.only]
    if "kdcl-KD" in names:  # fill the teacher cache once, as a distillation run does before its first step
        TeacherScores(CheapTeacher(), cache_dir() / "teacher-cache").prepare(groups)
    results = {name: [] for name in names}
    for r in range(args.rounds):
        for name in rotation(names, r):
            results[name].append(contenders[name]())
            steady, wall = results[name][-1]
            print(f"round {r}: {name:<11} steady {steady:6.2f} pairs/s, wall-clock {wall:6.2f} pairs/s", flush=True)
    report(results)


def fit_kdcl(path, frame, qrels, max_length: int, teacher) -> tuple[float, float]:
    reranker = kdcl.CrossEncoder.load(path, device="cpu", verbose=False, max_length=max_length)
    options = {"group_size": GROUP, "batch_size": QUERIES_PER_STEP, "epochs": 1, "learning_rate": 1e-4,
               "warmup_ratio": 0.1, "weight_decay": 0.01, "max_grad_norm": 1.0, "seed": SEED, "precision": "fp32",
               "verbose": False}
    if teacher is None:
        trainer = kdcl.ContrastiveTrainer(reranker, **options)
    else:
        trainer = kdcl.DistillationTrainer(reranker, teacher=teacher, teacher_cache=cache_dir() / "teacher-cache",
                                           **options)
    start = time.perf_counter()
    log = trainer.fit(frame, qrels)
    wall = time.perf_counter() - start
    steady = (log["pairs"].iloc[-1] - log["pairs"].iloc[0]) / (log["seconds"].iloc[-1] - log["seconds"].iloc[0])
    return steady, log["pairs"].iloc[-1] / wall


def fit_st(path, groups, max_length: int, loss_name: str) -> tuple[float, float]:
    from datasets import Dataset
    from sentence_transformers.cross_encoder import CrossEncoder as STCrossEncoder
    from sentence_transformers.cross_encoder import CrossEncoderTrainer, CrossEncoderTrainingArguments
    from sentence_transformers.cross_encoder.losses import ListNetLoss, MultipleNegativesRankingLoss
    from transformers import TrainerCallback

    torch.manual_seed(SEED)
    model = STCrossEncoder(str(path), max_length=max_length, device="cpu")
    if loss_name == "mnrl":
        columns = {"query": [g.query for g in groups], "positive": [g.texts[0] for g in groups]}
        columns |= {f"negative_{j}": [g.texts[j] for g in groups] for j in range(1, GROUP)}
        loss = MultipleNegativesRankingLoss(model, num_negatives=0, scale=1.0, activation_fn=None)
    else:
        columns = {"query": [g.query for g in groups], "docs": [list(g.texts) for g in groups],
                   "labels": [list(g.labels) for g in groups]}
        loss = ListNetLoss(model, mini_batch_size=QUERIES_PER_STEP * GROUP)
    step_ends = []

    class StepTimer(TrainerCallback):
        def on_step_end(self, *args, **kwargs):
            step_ends.append(time.perf_counter())

    with tempfile.TemporaryDirectory() as out:
        arguments = CrossEncoderTrainingArguments(
            output_dir=out, per_device_train_batch_size=QUERIES_PER_STEP, num_train_epochs=1, learning_rate=1e-4,
            warmup_ratio=0.1, weight_decay=0.01, max_grad_norm=1.0, lr_scheduler_type="linear", optim="adamw_torch",
            seed=SEED, use_cpu=True, report_to="none", save_strategy="no", logging_steps=10**6, disable_tqdm=True,
            dataloader_num_workers=0)
        trainer = CrossEncoderTrainer(model=model, args=arguments, train_dataset=Dataset.from_dict(columns),
                                      loss=loss, callbacks=[StepTimer()])
        start = time.perf_counter()
        trainer.train()
        wall = time.perf_counter() - start
    pairs = len(groups) * GROUP
    steady = (len(step_ends) - 1) * QUERIES_PER_STEP * GROUP / (step_ends[-1] - step_ends[0])
    return steady, pairs / wall


class CheapTeacher(pt.Transformer):
    """A deterministic teacher that costs nothing: what matters here is reading its cached scores."""

    def transform(self, inp: pd.DataFrame) -> pd.DataFrame:
        return inp.assign(score=[zlib.crc32(d.encode()) % 1000 / 100.0 for d in inp["docno"]])

    def __repr__(self) -> str:
        return "CheapTeacher()"


def report(results: dict[str, list[tuple[float, float]]]) -> None:
    print(f"\n{'contender':<11} {'steady pairs/s':>15} {'wall-clock pairs/s':>19}  (median over rounds)")
    medians = {}
    for name, runs in results.items():
        medians[name] = statistics.median(s for s, _ in runs), statistics.median(w for _, w in runs)
        print(f"{name:<11} {medians[name][0]:>15.2f} {medians[name][1]:>19.2f}")
    if "kdcl-KD" in medians and "kdcl-CL" in medians:
        ratios = [kd[0] / cl[0] for kd, cl in zip(results["kdcl-KD"], results["kdcl-CL"])]
        print(f"ratio kdcl-KD/kdcl-CL steady pairs/s: {statistics.median(ratios):.2f}x (goal >= 0.95)")
    st = [n for n in medians if n.startswith("st-")]
    if "kdcl-CL" in medians and st:
        best = max(st, key=lambda n: medians[n][0])
        for name in sorted(st, key=lambda n: n == best):
            ratios = [cl[0] / other[0] for cl, other in zip(results["kdcl-CL"], results[name])]
            goal = "; goal >= 1.0 against the faster" if name == best else ""
            print(f"ratio kdcl-CL/{name} steady pairs/s: {statistics.median(ratios):.2f}x "
                  f"(range {min(ratios):.2f}-{max(ratios):.2f}{goal})")


if __name__ == "__main__":
    main()
