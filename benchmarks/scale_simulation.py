"""Scale, simulated (issue 24, item 3): the plumbing's time and memory on a synthetic MS MARCO-shaped collection.

    python benchmarks/scale_simulation.py                                  # 10k, 50k, 200k queries, both modes
    python benchmarks/scale_simulation.py --queries 10000 --modes stream   # one size, one mode
    python benchmarks/scale_simulation.py --record benchmarks/results/scale-simulation.json

The collection is generated deterministically from hashes of ids, so any size is the same recipe and the same
text at every run: ``8,841,823 / 502,939`` passages a training query (MS MARCO's ratio), passage lengths
log-normal with mean 56 words and median 50, cut to 5..200 words; queries log-normal with mean 6 words; per
query BM25-like candidates: 30 docnos with descending scores, one of them the judged positive at a uniformly
drawn rank (every positive is retrieved: a simplification; MS MARCO's BM25 top 30 misses some). Words are
pseudo-words of a Zipf vocabulary, so the tokenizer sees text of the right length.

Each (size, mode, phase) runs in its own fresh process, which reports its peak RSS (``VmHWM``), the RSS the
training frame added, and the seconds of each step:

- ``groups``: ``GroupSampler`` over the frame (group 8) and one epoch's draw;
- ``teacher``: the same, then ``TeacherScores.prepare`` over epoch 0's groups with a tiny teacher (a document's
  length / 100: the cost of the plumbing, not of a model) into an empty ``ScoreStore``; the cache's size on disk;
- ``lookup``: the same groups' keys read back from that store (``ScoreStore.get``: pairs/s), and a warm
  ``prepare`` (what a second fit pays);
- ``fit``: ``DistillationTrainer`` with a tiny randomly initialised BERT (tests/tiny_models.py; no download)
  reading the warm cache, stopped after ``--steps`` optimizer steps (batch 4 groups, max_length 64).

Modes: ``memory`` hands the trainer a frame with every candidate's text (``pt.text.get_text`` before the trainer);
``stream`` hands it ids only and ``text_source=`` a docstore, so text is fetched per block of groups; ``chunks``
hands it ids a frame of 1,000 queries at a time (a generator, as a retriever's ``transform_gen(topics,
batch_size=1000)`` gives: no frame of every candidate exists) and ``text_source=`` a transformer that fetches a
block's texts at once (as ``pt.text.get_text`` does). The caller holds the qrels in every mode.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Mapping
from pathlib import Path

import numpy as np
import pyterrier as pt

import pyterrier_kdcl as kdcl

MARCO_PASSAGES, MARCO_QUERIES = 8_841_823, 502_939
CANDIDATES = 30
WORDS_MEAN, WORDS_MEDIAN, WORDS_MAX = 56, 50, 200
QUERY_WORDS_MEAN = 6
PHASES = ("groups", "teacher", "lookup", "fit")
CHUNK_QUERIES = 1000  # queries a frame in mode "chunks"


# -- the collection ----------------------------------------------------------------------------------------------
def _mix(x: np.ndarray, salt: int) -> np.ndarray:
    """splitmix64 of ``x`` and ``salt``: a deterministic uniform 64-bit hash, vectorised."""
    with np.errstate(over="ignore"):
        z = x.astype(np.uint64) * np.uint64(0x9E3779B97F4A7C15) + np.uint64(salt * 0xBF58476D1CE4E5B9 % 2**64)
        z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        return z ^ (z >> np.uint64(31))


def _uniform(x: np.ndarray, salt: int) -> np.ndarray:
    return (_mix(x, salt) >> np.uint64(11)).astype(np.float64) / 2**53


def _lognormal_words(x: np.ndarray, salt: int, mean: float, median: float, low: int, high: int) -> np.ndarray:
    sigma = np.sqrt(2 * np.log(mean / median))  # mean = median * exp(sigma^2 / 2)
    u1, u2 = np.maximum(_uniform(x, salt), 1e-12), _uniform(x, salt + 1)
    normal = np.sqrt(-2 * np.log(u1)) * np.cos(2 * np.pi * u2)
    return np.clip(np.round(median * np.exp(sigma * normal)), low, high).astype(np.int64)


class Collection:
    """A synthetic MS MARCO of ``queries`` training queries: every text a slice of one seeded word stream."""

    def __init__(self, queries: int, stream_words: int = 1_000_000, vocabulary: int = 30_000):
        self.queries = queries
        self.passages = max(CANDIDATES * 2, round(queries * MARCO_PASSAGES / MARCO_QUERIES))
        rng = np.random.default_rng(0)
        letters = "etaoinshrdlcumwfgypbvkjxqz"
        words = ["".join(rng.choice(list(letters), n)) for n in rng.integers(2, 10, vocabulary)]
        zipf = 1 / np.arange(1, vocabulary + 1)
        drawn = rng.choice(vocabulary, stream_words, p=zipf / zipf.sum())
        self.stream = " ".join(words[i] for i in drawn.tolist()) + " "
        sizes = np.array([len(w) + 1 for w in words])[drawn]
        self.starts = np.concatenate([[0], np.cumsum(sizes)])  # each word's first character in the stream
        self.words = stream_words

    def _slices(self, ids: np.ndarray, salt: int, lengths: np.ndarray) -> list[str]:
        first = (_mix(ids, salt) % np.uint64(self.words - WORDS_MAX)).astype(np.int64)
        begin, end = self.starts[first], self.starts[first + lengths] - 1
        stream = self.stream
        return [stream[b:e] for b, e in zip(begin.tolist(), end.tolist())]

    def passage_texts(self, ids: np.ndarray) -> list[str]:
        return self._slices(ids, 1, _lognormal_words(ids, 2, WORDS_MEAN, WORDS_MEDIAN, 5, WORDS_MAX))

    def query_texts(self, ids: np.ndarray) -> list[str]:
        return self._slices(ids, 4, _lognormal_words(ids, 5, QUERY_WORDS_MEAN, 5, 1, 30))

    def candidates(self, first: int = 0, last: int | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Queries ``first..last``'s (queries, 30) passage ids, their BM25-like scores (descending), and each query's
        positive's column."""
        last = self.queries if last is None else last
        q = np.arange(first, last, dtype=np.uint64)[:, None]
        col = np.arange(CANDIDATES, dtype=np.uint64)[None, :]
        ids = (_mix(q * np.uint64(CANDIDATES) + col, 7) % np.uint64(self.passages)).astype(np.int64)
        positive = (_mix(q[:, 0], 8) % np.uint64(CANDIDATES)).astype(np.int64)
        gaps = -np.log(np.maximum(_uniform(q * np.uint64(CANDIDATES) + col, 9), 1e-12)) * 0.3
        scores = 25.0 + 5 * _uniform(q, 10) - np.cumsum(gaps, axis=1)
        return ids, scores, positive

    def frame(self, with_text: bool, first: int = 0, last: int | None = None):
        """The first stage's result frame (qid, query, docno, score, rank, and text when asked) of queries
        ``first..last``."""
        import pandas as pd

        ids, scores, _ = self.candidates(first, last)
        n = len(ids)
        qids = np.array([f"q{i}" for i in range(first, first + n)], dtype=object)
        queries = np.array(self.query_texts(np.arange(first, first + n)), dtype=object)
        flat = ids.ravel()
        frame = pd.DataFrame({"qid": np.repeat(qids, CANDIDATES), "query": np.repeat(queries, CANDIDATES),
                              "docno": np.array([f"p{i}" for i in flat.tolist()], dtype=object),
                              "score": scores.ravel(), "rank": np.tile(np.arange(CANDIDATES), n)})
        if with_text:  # a string per row, as pt.text.get_text gives
            frame["text"] = self.passage_texts(flat)
        return frame

    def frame_chunks(self, queries_per_frame: int):
        """The same rows, ids only, a frame of ``queries_per_frame`` queries at a time (what a retriever's
        ``transform_gen(topics, batch_size=queries_per_frame)`` gives)."""
        for first in range(0, self.queries, queries_per_frame):
            yield self.frame(False, first, min(first + queries_per_frame, self.queries))

    def qrels(self):
        """Each query's one judged positive (the candidate at its positive's column: computed alone, not from the
        whole (queries, 30) array)."""
        import pandas as pd

        q = np.arange(self.queries, dtype=np.uint64)
        positive = _mix(q, 8) % np.uint64(CANDIDATES)
        ids = (_mix(q * np.uint64(CANDIDATES) + positive, 7) % np.uint64(self.passages)).astype(np.int64)
        return pd.DataFrame({"qid": [f"q{i}" for i in range(self.queries)],
                             "docno": [f"p{i}" for i in ids.tolist()], "label": 1})

    def frames(self, with_text: bool):
        """The whole result frame and the qrels."""
        return self.frame(with_text), self.qrels()

    def docstore(self) -> Docstore:
        return Docstore(self)

    def get_text(self) -> GetText:
        return GetText(self)


class Docstore(Mapping):
    """docno → text, computed on demand (like ir_datasets' ``docs_store()``, nothing held in memory)."""

    def __init__(self, collection: Collection):
        self.collection = collection

    def __getitem__(self, docno: str) -> str:
        return self.collection.passage_texts(np.array([_passage_id(docno, self.collection.passages)]))[0]

    def get_many(self, docnos) -> list[str]:
        return self.collection.passage_texts(np.array([_passage_id(d, self.collection.passages) for d in docnos]))

    def __len__(self) -> int:
        return self.collection.passages

    def __iter__(self):
        return (f"p{i}" for i in range(self.collection.passages))


class GetText(pt.Transformer):
    """Adds each row's passage text, all rows at once (as ``pt.text.get_text`` does with a docstore's ``get_many``)."""

    def __init__(self, collection: Collection):
        self.collection = collection

    def transform(self, inp):
        passages = self.collection.passages
        return inp.assign(text=self.collection.passage_texts(np.array([_passage_id(d, passages)
                                                                       for d in inp["docno"]])))


def _passage_id(docno: str, passages: int) -> int:
    if not docno.startswith("p") or not docno[1:].isdigit() or int(docno[1:]) >= passages:
        raise KeyError(docno)
    return int(docno[1:])


# -- measuring ---------------------------------------------------------------------------------------------------
def rss_mb() -> float:
    with open("/proc/self/status") as status:
        return int(next(line for line in status if line.startswith("VmRSS:")).split()[1]) / 1024


def peak_mb() -> float:
    """This process image's peak RSS (``VmHWM``). Not ``getrusage``'s ``ru_maxrss``: Linux keeps that across
    ``execve``, so a child reports at least its parent's RSS at the fork (here the parent's ~450 MB after writing
    the tiny models)."""
    with open("/proc/self/status") as status:
        return int(next(line for line in status if line.startswith("VmHWM:")).split()[1]) / 1024


def child(phase: str, queries: int, mode: str, work: Path, steps: int) -> dict:
    import torch

    from pyterrier_kdcl.training.groups import GroupSampler
    from pyterrier_kdcl.training.teachers import ScoreStore, TeacherScores, pair_key, teacher_fingerprint

    torch.set_num_threads(1)
    out = {"phase": phase, "queries": queries, "mode": mode, "rss_imports_mb": rss_mb()}
    t = time.perf_counter()
    collection = Collection(queries)
    if mode == "chunks":  # the caller holds the qrels and one frame of CHUNK_QUERIES queries at a time
        frame, qrels = collection.frame_chunks(CHUNK_QUERIES), collection.qrels()
    else:
        frame, qrels = collection.frames(with_text=mode == "memory")
    out.update(passages=collection.passages, rows=queries * CANDIDATES, generate_s=time.perf_counter() - t,
               frame_rss_mb=rss_mb() - out["rss_imports_mb"])
    source = {"stream": collection.docstore(), "chunks": collection.get_text()}.get(mode)
    teacher = LengthTeacher()
    cache = work / "teacher_cache"

    if phase == "fit":
        model = work / "tiny-bert"
        student = kdcl.CrossEncoder(str(model), device="cpu", verbose=False, max_length=64)
        trainer = StoppingTrainer(steps, student, teacher, group_size=8, batch_size=4, seed=0, verbose=False,
                                  teacher_cache=cache, text_source=source, teacher_temperature=0.3)
        t = time.perf_counter()
        try:
            trainer.fit(frame, qrels)
        except Enough:
            pass
        out.update(fit_s=time.perf_counter() - t, steps=trainer.steps_done,
                   before_first_step_s=trainer.first_step_at - t,
                   step_s=(trainer.last_step_at - trainer.first_step_at) / max(trainer.steps_done - 1, 1))
    else:
        t = time.perf_counter()
        sampler = GroupSampler(frame, qrels, group_size=8, seed=0, text_source=source)
        out.update(sampler_s=time.perf_counter() - t, sampler_mb=sampler.nbytes / 2**20,
                   sampler_peak_rss_mb=peak_mb())
        if hasattr(sampler, "file_bytes"):  # the candidates in the sampler's temporary file (commit 8a2e8f4 on)
            out["sampler_file_mb"] = sampler.file_bytes / 2**20
        t = time.perf_counter()
        drawn = sum(1 for _ in sampler.epoch(0))
        out.update(epoch_draw_s=time.perf_counter() - t, groups=drawn)
        if phase == "teacher":
            shutil.rmtree(cache, ignore_errors=True)
            scores = TeacherScores(teacher, cache)
            t = time.perf_counter()
            scores.prepare(sampler.epoch(0))
            scores.close()
            out.update(teacher_s=time.perf_counter() - t, pairs_scored=scores.scored,
                       cache_mb=sum(f.stat().st_size for f in cache.rglob("*") if f.is_file()) / 2**20)
        if phase == "lookup":
            t = time.perf_counter()
            keys = list({pair_key(g.query, d, x): None for g in sampler.epoch(0) for d, x in zip(g.docnos, g.texts)})
            out["keys_s"] = time.perf_counter() - t
            store = ScoreStore(cache / teacher_fingerprint(teacher))
            t = time.perf_counter()
            found = store.get(keys)
            seconds = time.perf_counter() - t
            store.close()
            assert len(found) == len(keys), (len(found), len(keys))
            out.update(lookup_pairs=len(keys), lookup_s=seconds, lookup_pairs_per_s=len(keys) / seconds)
            scores = TeacherScores(teacher, cache)
            t = time.perf_counter()
            scores.prepare(sampler.epoch(0))
            scores.close()
            out.update(warm_prepare_s=time.perf_counter() - t, warm_scored=scores.scored)
    out["peak_rss_mb"] = peak_mb()
    return out


class LengthTeacher(pt.Transformer):
    """A tiny teacher: a document's length / 100. Deterministic, fingerprinted, and nearly free."""

    def transform(self, inp):
        return inp.assign(score=inp["text"].str.len().to_numpy("float64") / 100)

    def fingerprint(self) -> str:
        return "length/100"

    def __repr__(self) -> str:
        return "LengthTeacher()"


class Enough(Exception):
    """Stops a fit after its measured steps."""


class StoppingTrainer(kdcl.DistillationTrainer):
    """A DistillationTrainer that stops after ``steps`` optimizer steps and notes when its steps ended."""

    def __init__(self, steps, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.steps_wanted, self.steps_done, self.first_step_at, self.last_step_at = steps, 0, None, None

    def _step(self, *args, **kwargs):
        loss = super()._step(*args, **kwargs)
        self.steps_done += 1
        self.last_step_at = time.perf_counter()
        if self.first_step_at is None:
            self.first_step_at = self.last_step_at
        if self.steps_done >= self.steps_wanted:
            raise Enough
        return loss


# -- the parent ----------------------------------------------------------------------------------------------------
def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--queries", type=int, nargs="+", default=[10_000, 50_000, 200_000])
    parser.add_argument("--modes", nargs="+", default=["memory", "stream"], choices=["memory", "stream", "chunks"])
    parser.add_argument("--phases", nargs="+", default=list(PHASES), choices=PHASES)
    parser.add_argument("--steps", type=int, default=5, help="optimizer steps of the fit")
    parser.add_argument("--work", type=Path, default=Path("/tmp/kdcl-scale-simulation"))
    parser.add_argument("--record", type=Path, help="append the runs to this JSON file")
    parser.add_argument("--report", type=Path, help="print the table and the cost model of a recorded file")
    parser.add_argument("--child", nargs=3, metavar=("PHASE", "QUERIES", "MODE"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.report:
        return report(json.loads(args.report.read_text())["runs"])
    if args.child:
        phase, queries, mode = args.child[0], int(args.child[1]), args.child[2]
        print(json.dumps(child(phase, queries, mode, args.work / f"{queries}-{mode}", args.steps)))
        return
    (args.work).mkdir(parents=True, exist_ok=True)
    if "fit" in args.phases:
        from tiny_models import write_tiny_model

        for queries in args.queries:
            for mode in args.modes:
                (args.work / f"{queries}-{mode}").mkdir(parents=True, exist_ok=True)
                write_tiny_model("bert", args.work / f"{queries}-{mode}" / "tiny-bert", seed=0)
    runs = []
    for queries in args.queries:
        for mode in args.modes:
            (args.work / f"{queries}-{mode}").mkdir(parents=True, exist_ok=True)
            for phase in args.phases:
                load = os.getloadavg()
                command = [sys.executable, *sys.argv[:1], "--child", phase, str(queries), mode,
                           "--work", str(args.work), "--steps", str(args.steps)]
                if sys.flags.no_site:  # run through a wrapper that put a checkout first on the path: the same
                    command = [sys.executable, "-S", *_wrapper(), *command[1:]]
                started = time.perf_counter()
                done = subprocess.run(command, capture_output=True, text=True,
                                      env={**os.environ, "PYTHONWARNINGS": "ignore", "OMP_NUM_THREADS": "1"})
                if done.returncode:
                    sys.exit(f"{phase} at {queries} queries ({mode}) failed:\n{done.stderr[-3000:]}")
                run = json.loads(done.stdout.strip().splitlines()[-1])
                run.update(load_before=load[0], load_after=os.getloadavg()[0],
                           wall_s=time.perf_counter() - started, when=time.strftime("%Y-%m-%d %H:%M:%S %Z"))
                runs.append(run)
                print(json.dumps(run), flush=True)
    if args.record:
        old = json.loads(args.record.read_text()) if args.record.exists() else {"runs": []}
        from common import machine

        old.setdefault("machine", machine())
        old["runs"] += runs
        args.record.parent.mkdir(parents=True, exist_ok=True)
        args.record.write_text(json.dumps(old, indent=1) + "\n")


# -- the cost model -------------------------------------------------------------------------------------------------
FIGURES = {  # (phase, field): what it measures
    ("groups", "sampler_s"): "GroupSampler built, s",
    ("groups", "epoch_draw_s"): "one epoch drawn (with text), s",
    ("teacher", "teacher_s"): "teacher scoring into an empty cache, s",
    ("teacher", "cache_mb"): "cache on disk, MB",
    ("lookup", "lookup_pairs_per_s"): "cache lookup, pairs/s",
    ("lookup", "warm_prepare_s"): "warm prepare (all cached), s",
    ("fit", "before_first_step_s"): "fit: start to first step, s",
    ("fit", "step_s"): "fit: one step, s",
    ("groups", "frame_rss_mb"): "training frame, RSS MB",
    ("groups", "sampler_mb"): "GroupSampler's own arrays, MB",
    ("groups", "sampler_file_mb"): "GroupSampler's temporary file, MB",
    ("groups", "sampler_peak_rss_mb"): "peak RSS, sampler built, MB",
    ("groups", "peak_rss_mb"): "peak RSS, groups, MB",
    ("teacher", "peak_rss_mb"): "peak RSS, teacher scoring, MB",
    ("fit", "peak_rss_mb"): "peak RSS, fit, MB",
}
TARGET_QUERIES = MARCO_QUERIES


def report(runs: list[dict]) -> None:
    """The measured table per mode, a least-squares line a + b * queries per figure, and its value at MS MARCO's
    502,939 training queries (8.8M passages, 15.1M candidate rows)."""
    for mode in sorted({r["mode"] for r in runs}):
        mine = [r for r in runs if r["mode"] == mode]
        sizes = sorted({r["queries"] for r in mine})
        print(f"\n### mode: {mode}\n")
        print("| figure | " + " | ".join(f"{q:,} q" for q in sizes) + f" | fit a + b·q | at {TARGET_QUERIES:,} q |")
        print("| --- | " + " | ".join("---:" for _ in sizes) + " | --- | ---: |")
        for (phase, name), label in FIGURES.items():
            points = {r["queries"]: r[name] for r in mine if r["phase"] == phase and name in r}
            if not points:
                continue
            cells = [_fmt(points[q]) if q in points else "" for q in sizes]
            model, predicted = "", ""
            if len(points) >= 2 and name != "lookup_pairs_per_s":
                b, a = np.polyfit(list(points), list(points.values()), 1)
                model = f"{_fmt(a)} + {b * 1000:.3g}/1k q"
                predicted = _fmt(a + b * TARGET_QUERIES)
            print(f"| {label} | " + " | ".join(cells) + f" | {model} | {predicted} |")
        loads = [f"{r['load_before']:.1f}-{r['load_after']:.1f}" for r in mine]
        print(f"\nload average (1 min) before-after each process: {', '.join(loads)}")


def _fmt(x: float) -> str:
    return f"{x:,.0f}" if abs(x) >= 100 else f"{x:.3g}"


def _wrapper() -> list[str]:
    wrapper = os.environ.get("KDCL_WRAPPER")
    return [wrapper] if wrapper else []


if __name__ == "__main__":
    main()
