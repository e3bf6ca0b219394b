"""Training pairs/s: ContrastiveTrainer and DistillationTrainer against sentence-transformers' CrossEncoderTrainer.

    python benchmarks/training.py                       # 5 steps a fit, 2 rounds, max_length 128 (a few minutes)
    python benchmarks/training.py --max-length 256 --steps 10 --rounds 4
    python benchmarks/training.py --only kdcl-CL st-MNRL --steps 4

Same model (``minilm-l6`` with a seeded fresh head, one saved directory loaded by both libraries), same
groups (kdcl's ``GroupSampler``: 1 positive + 7 BM25 negatives of kdcl/manpages/train, seed 0), 4 queries
(32 pairs) a step, same max_length, AdamW with lr 1e-4, 10% linear warm-up, weight decay 0.01,
gradient clipping at 1.0, float32 on CPU, dropout on.

Same optimizer kernel too: the fused AdamW. kdcl's trainers create ``torch.optim.AdamW(..., fused=True)``
whenever every trainable parameter is on CPU or CUDA, and sentence-transformers' ``CrossEncoderTrainer`` (the
Hugging Face Trainer) defaults to ``optim="adamw_torch_fused"`` with torch >= 2.8; the script names that
optimizer explicitly so that older versions use it as well. There is no plain-AdamW variant: kdcl offers no
switch back to the for-loop AdamW, so plain against plain would measure a patched package, not the one
shipped. kdcl's tokenization includes its own pre-cut of long documents (``PairEncoder.encode``: same ids).

Contenders, each a fresh fit per round, in a balanced rotating order from round to round:

- ``kdcl-CL``: ``ContrastiveTrainer`` (InfoNCE, τ = 1).
- ``kdcl-KD``: ``DistillationTrainer`` with teacher scores already cached (a cheap deterministic teacher
  scores the groups once before the first round; the steps then read the cache, as in real distillation).
- ``st-ListNet``: ``CrossEncoderTrainer`` with ``ListNetLoss(mini_batch_size=32)`` over (query, docs, labels):
  listwise, one forward pass of 32 pairs a step (its target is softmax(labels), not one-hot).
- ``st-MNRL`` (only when named with ``--only``; the slowest): ``CrossEncoderTrainer`` with
  ``MultipleNegativesRankingLoss(scale=1, activation_fn=None)`` over (query, positive, negative_1..7), its
  in-batch negatives switched off (a one-line subclass: ``num_negatives=0`` fails). That is exactly InfoNCE
  over the group, but it scores each column in its own forward pass (8 passes of 4 pairs a step).

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
from pyterrier_kdcl.training.groups import GroupSampler
from pyterrier_kdcl.training.teachers import TeacherScores

GROUP, QUERIES_PER_STEP, SEED = 8, 4, 0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=5, help="optimizer steps per fit")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--max-length", type=int, default=128)
    parser.add_argument("--only", nargs="*", help="contenders to run (default: all but st-MNRL)")
    args = parser.parse_args()
    header(f"training: kdcl vs sentence-transformers, minilm-l6, group {GROUP}, {QUERIES_PER_STEP} queries a step, "
           f"max_length {args.max_length}, fp32 CPU")

    from common import bm25_frame

    path = fixed_head_checkpoint()
    train = "kdcl/manpages/train"
    qrels = pt.get_dataset("irds:" + train).get_qrels()
    frame = bm25_frame(train, queries=3 * args.steps * QUERIES_PER_STEP, depth=30)
    usable = [g.qid for g in GroupSampler(frame, qrels, group_size=GROUP, seed=SEED).epoch(0)]
    frame = frame[frame["qid"].isin(usable[: args.steps * QUERIES_PER_STEP])]
    # the groups the trainers build from this frame (same sampler, same seed), in their training order
    groups = list(GroupSampler(frame, qrels, group_size=GROUP, seed=SEED).epoch(0))
    print(f"{len(groups)} groups of {GROUP} ({len(groups) * GROUP} pairs a fit, {args.steps} steps)")

    contenders = {
        "kdcl-CL": lambda: fit_kdcl(path, frame, qrels, args.max_length, teacher=None),
        "kdcl-KD": lambda: fit_kdcl(path, frame, qrels, args.max_length, teacher=CheapTeacher()),
        "st-ListNet": lambda: fit_st(path, groups, args.max_length, "listnet"),
        "st-MNRL": lambda: fit_st(path, groups, args.max_length, "mnrl"),
    }
    default = ["kdcl-CL", "kdcl-KD", "st-ListNet"]
    names = [n for n in contenders if n in (args.only or default)]
    if "kdcl-KD" in names:  # fill the teacher cache once, as a distillation run does before its first step
        TeacherScores(CheapTeacher(), cache_dir() / "teacher-cache").prepare(groups)
    results = {name: [] for name in names}
    for r in range(args.rounds):
        for name in rotation(names, r):
            results[name].append(contenders[name]())
            run = results[name][-1]
            print(f"round {r}: {name:<11} steady {run['steady']:6.2f} pairs/s, wall-clock {run['wall']:6.2f} pairs/s, "
                  f"steps {' '.join(f'{t:.1f}s' for t in run['steps'])}", flush=True)
    report(results)


def fit_kdcl(path, frame, qrels, max_length: int, teacher) -> dict:
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
    return summary(log["seconds"].tolist(), log["pairs"].iloc[-1], wall)


def fit_st(path, groups, max_length: int, loss_name: str) -> dict:
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
        class GroupOnly(MultipleNegativesRankingLoss):  # num_negatives=0 is refused by torch.multinomial
            def get_in_batch_negatives(self, anchors, candidates):
                return iter(())

        loss = GroupOnly(model, scale=1.0, activation_fn=None)
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
            warmup_steps=0.1, weight_decay=0.01, max_grad_norm=1.0, lr_scheduler_type="linear",
            optim="adamw_torch_fused", seed=SEED, use_cpu=True, report_to="none", save_strategy="no",
            logging_steps=10**6, disable_tqdm=True, dataloader_num_workers=0)
        trainer = CrossEncoderTrainer(model=model, args=arguments, train_dataset=Dataset.from_dict(columns),
                                      loss=loss, callbacks=[StepTimer()])
        start = time.perf_counter()
        trainer.train()
        wall = time.perf_counter() - start
    return summary(step_ends, len(groups) * GROUP, wall)


def summary(step_ends: list[float], pairs: int, wall: float) -> dict:
    """Steady pairs/s (first step excluded), wall-clock pairs/s, and the durations of the steps after the first."""
    per_step = QUERIES_PER_STEP * GROUP
    steps = [b - a for a, b in zip(step_ends, step_ends[1:])]
    return {"steady": per_step * len(steps) / sum(steps), "wall": pairs / wall, "steps": steps}


class CheapTeacher(pt.Transformer):
    """A deterministic teacher that costs nothing: what matters here is reading its cached scores."""

    def transform(self, inp: pd.DataFrame) -> pd.DataFrame:
        return inp.assign(score=[zlib.crc32(d.encode()) % 1000 / 100.0 for d in inp["docno"]])

    def __repr__(self) -> str:
        return "CheapTeacher()"

    def fingerprint(self) -> str:  # names its cached scores (a teacher without one is not cached on disk)
        return "CheapTeacher:crc32(docno)%1000/100"


def report(results: dict[str, list[dict]]) -> None:
    """Two views of the same runs: the median over rounds of steady pairs/s, and pairs/s of the quietest step
    (the fastest step of all rounds: the least disturbed by other jobs on a shared machine)."""
    per_step = QUERIES_PER_STEP * GROUP
    print(f"\n{'contender':<11} {'steady pairs/s':>15} {'wall-clock pairs/s':>19} {'quietest step pairs/s':>22}")
    steady, quiet = {}, {}
    for name, runs in results.items():
        steady[name] = statistics.median(r["steady"] for r in runs)
        quiet[name] = per_step / min(t for r in runs for t in r["steps"])
        wall = statistics.median(r["wall"] for r in runs)
        print(f"{name:<11} {steady[name]:>15.2f} {wall:>19.2f} {quiet[name]:>22.2f}")
    print("(steady and wall-clock: medians over rounds; quietest step: the fastest step after the first, all rounds)")
    lines = []
    if "kdcl-KD" in results and "kdcl-CL" in results:
        lines.append(("kdcl-KD", "kdcl-CL", "goal >= 0.95"))
    st = [n for n in results if n.startswith("st-")]
    if st:
        best = max(st, key=lambda n: steady[n])
        if "kdcl-CL" in results:
            lines += [("kdcl-CL", n, "") for n in st if n != best]
            lines.append(("kdcl-CL", best, "goal >= 1.0" + (" against the faster" if len(st) > 1 else "")))
    for a, b, goal in lines:
        rounds = [x["steady"] / y["steady"] for x, y in zip(results[a], results[b])]
        print(f"ratio {a}/{b}: quietest step {quiet[a] / quiet[b]:.2f}x, steady {statistics.median(rounds):.2f}x "
              f"(rounds {min(rounds):.2f}-{max(rounds):.2f}){'; ' + goal if goal else ''}")


if __name__ == "__main__":
    main()
