"""What every benchmark shares: the same real BM25 pairs, the same fixed-head checkpoint, the machine's own
fp32 matmul peak, FLOP counts, and timing that alternates between contenders so background load cancels out.

The machine these run on has 2 cores shared with other jobs, so absolute figures drift by tens of percent
from minute to minute. Every goal is therefore a ratio measured within one run, with the contenders timed
in a balanced rotation (A B C, C B A, B C A, A C B, ...) and the median of the per-round ratios reported.
"""

from __future__ import annotations

import os
import platform
import statistics
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pandas as pd  # noqa: E402
import torch  # noqa: E402

DATASET = "kdcl/manpages/test"


def cache_dir() -> Path:
    """Where benchmarks keep what they build once (checkpoints, trained models): ``<kdcl cache>/benchmarks``."""
    from pyterrier_kdcl import paths

    path = paths.cache_dir() / "benchmarks"
    path.mkdir(parents=True, exist_ok=True)
    return path


def machine() -> str:
    """CPU model, core count and torch threads, from /proc/cpuinfo."""
    name = platform.processor() or "unknown CPU"
    flags = set()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                name = line.split(":", 1)[1].strip()
            elif line.startswith("flags") and not flags:
                flags = set(line.split(":", 1)[1].split())
    except OSError:
        pass
    simd = "AVX-512" if "avx512f" in flags else "AVX2" if "avx2" in flags else "no AVX2"
    vnni = ", VNNI" if "avx512_vnni" in flags or "avx_vnni" in flags else ""
    bf16 = ", AMX" if "amx_bf16" in flags else ", AVX512-BF16" if "avx512_bf16" in flags else ", no native bf16"
    threads = torch.get_num_threads()
    return f"{name} ({os.cpu_count()} cores, {simd}{vnni}{bf16}); torch {torch.__version__}, {threads} threads"


# -- data ----------------------------------------------------------------------------------------------------
def bm25_frame(dataset: str = DATASET, queries: int = 20, depth: int = 50, offset: int = 0,
               topics: pd.DataFrame | None = None) -> pd.DataFrame:
    """BM25's top ``depth`` with text for ``topics``, or ``queries`` topics of ``dataset`` in order from ``offset``."""
    import pyterrier as pt

    import pyterrier_kdcl as kdcl

    ds = pt.get_dataset("irds:" + dataset)
    if topics is None:
        topics = ds.get_topics().iloc[offset : offset + queries]
    pipeline = kdcl.datasets.bm25(dataset, num_results=depth) >> pt.text.get_text(ds, "text")
    return pipeline(topics).reset_index(drop=True)


def real_pairs(n: int, dataset: str = DATASET, depth: int = 50) -> pd.DataFrame:
    """At least ``n`` real (query, document) pairs: BM25 top ``depth`` of the first queries of ``dataset``."""
    frame = bm25_frame(dataset, queries=-(-n // depth), depth=depth)
    return frame.head(n).reset_index(drop=True)


def fixed_head_checkpoint(model: str = "minilm-l6", seed: int = 0) -> Path:
    """A ``CrossEncoder(model)`` with a seeded fresh head, saved once; both libraries load this directory.

    The directory is an ordinary Hugging Face ``*ForSequenceClassification`` directory plus ``kdcl.json``, so
    sentence-transformers' ``CrossEncoder(path)`` loads the very same weights.
    """
    path = cache_dir() / f"{model}-head{seed}"
    if not (path / "kdcl.json").exists():
        import pyterrier_kdcl as kdcl

        torch.manual_seed(seed)
        kdcl.CrossEncoder(model, device="cpu", verbose=False).save(path)
    return path


class ForwardTimer:
    """Seconds spent inside ``module.forward`` (the model alone: no tokenization, batching or copying)."""

    def __init__(self, module: torch.nn.Module):
        self.seconds = 0.0
        self._start = None
        module.register_forward_pre_hook(self._before)
        module.register_forward_hook(self._after)

    def _before(self, *_):
        self._start = time.perf_counter()

    def _after(self, *_):
        self.seconds += time.perf_counter() - self._start


def trained_checkpoint(model: str = "minilm-l6", queries: int = 800, depth: int = 30, max_length: int = 128,
                       seed: int = 0) -> Path:
    """A reranker that ranks meaningfully: ``model`` CL-trained on kdcl/manpages/train, saved once.

    ContrastiveTrainer, groups of 1 positive + 7 BM25 negatives (of the top ``depth``), 4 queries a step, one
    epoch over the first ``queries`` training queries, lr 1e-4 with 10% warm-up, max_length ``max_length``
    (the recipe that learned in the collection's prototype). About 5-10 minutes on 2 cores the first time.
    """
    import pyterrier as pt

    import pyterrier_kdcl as kdcl

    path = cache_dir() / f"{model}-cl{queries}-len{max_length}-seed{seed}"
    if (path / "kdcl.json").exists():
        return path
    train = "kdcl/manpages/train"
    frame = bm25_frame(train, queries=queries, depth=depth)
    torch.manual_seed(seed)
    reranker = kdcl.CrossEncoder(model, device="cpu", max_length=max_length, verbose=False)
    trainer = kdcl.ContrastiveTrainer(reranker, group_size=8, batch_size=4, epochs=1, learning_rate=1e-4,
                                      warmup_ratio=0.1, seed=seed)
    start = time.perf_counter()
    log = trainer.fit(frame, pt.get_dataset("irds:" + train).get_qrels())
    print(f"trained {path.name}: {int(log['step'].max())} steps, {int(log['pairs'].max())} pairs, "
          f"{time.perf_counter() - start:.0f}s, final loss {log['loss'].tail(10).mean():.3f} (ln 8 = 2.079)")
    reranker.save(path)
    return path


# -- hardware ------------------------------------------------------------------------------------------------
def matmul_gflops(size: int = 1024, seconds: float = 1.0) -> float:
    """Achieved fp32 GFLOP/s of a square ``size`` matmul with torch's threads (one measurement)."""
    a, b = torch.randn(size, size), torch.randn(size, size)
    out = torch.empty(size, size)
    torch.mm(a, b, out=out)
    reps, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        torch.mm(a, b, out=out)
        reps += 1
    return 2 * size**3 * reps / (time.perf_counter() - start) / 1e9


def matmul_peak(seconds: float = 1.0, sizes=(512, 1024, 2048)) -> float:
    """The machine's fp32 matmul peak now: the best of a few square sizes (what MKL reaches at best)."""
    return max(matmul_gflops(s, seconds) for s in sizes)


def bert_flops(lengths, config) -> float:
    """Forward FLOPs of a BERT-style encoder over sequences of the given (unpadded) token lengths.

    Per layer and token: 2·(4h² + 2hi) for the projections and feed-forward, plus 4·L·h for QKᵀ and AV over a
    sequence of L tokens. Embeddings, norms, softmax and the head are left out (well under 1%).
    """
    h, i, layers = config.hidden_size, config.intermediate_size, config.num_hidden_layers
    total = 0.0
    for length in lengths:
        total += layers * length * (2 * (4 * h * h + 2 * h * i) + 4 * length * h)
    return total


# -- timing --------------------------------------------------------------------------------------------------
def rotation(names: list[str], round_: int) -> list[str]:
    """The order of round ``round_``: forward, then backward, then rotated by one, and so on (A B C, C B A,
    B C A, A C B, ...). Any two consecutive rounds cancel a linear drift in background load, and over
    2 x len(names) rounds every contender runs in every position equally often."""
    shift = (round_ // 2) % len(names)
    order = names[shift:] + names[:shift]
    return order[::-1] if round_ % 2 else order


def alternate(contenders: dict, rounds: int, warmup: bool = True) -> dict[str, list[float]]:
    """Times each ``name -> fn()`` once per round, in rotating order; seconds per call."""
    names = list(contenders)
    if warmup:
        for name in names:
            contenders[name]()
    times = {name: [] for name in names}
    for r in range(rounds):
        for name in rotation(names, r):
            start = time.perf_counter()
            contenders[name]()
            times[name].append(time.perf_counter() - start)
    return times


def paired_ratio(slow: list[float], fast: list[float]) -> tuple[float, float, float]:
    """Median, min and max of the per-round ratios ``slow / fast`` (each round's pair shares its background)."""
    ratios = [s / f for s, f in zip(slow, fast)]
    return statistics.median(ratios), min(ratios), max(ratios)


def header(title: str) -> None:
    print(f"# {title}")
    print(f"# {time.strftime('%Y-%m-%d %H:%M')}  {machine()}")
    print(f"# load average {os.getloadavg()[0]:.2f} (other jobs share these cores)  python {sys.version.split()[0]}")
