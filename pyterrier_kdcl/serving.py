"""Serving rerankers: an opt-in fast CPU path, and scoring sharded across worker processes or devices.

* :func:`optimize_for_cpu` (from :mod:`pyterrier_kdcl.fast`, importable from here too) makes a ``CrossEncoder``
  faster on CPU in place: by default bfloat16 where the CPU computes it natively and int8 with one activation scale
  per row elsewhere, both with scores that do not depend on the batch; or dynamic int8 (per batch).
* :class:`ShardedScorer` reranks a result frame with several copies of one reranker, one worker process per
  device (or several CPU workers), each query's rows all in one shard. The merged frame has the scores,
  ranks and row order that the single-process reranker gives.

What it never does: an optimised reranker is for inference only — train and save the float32 model, and
optimise after loading it (``optimize_for_cpu(CrossEncoder.load(path))``).
"""

from __future__ import annotations

import os
import shutil
import tempfile
import weakref
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from pathlib import Path

import numpy as np
import pandas as pd
import pyterrier as pt
import torch

from pyterrier_kdcl import models
from pyterrier_kdcl.fast import FFN_OUTPUT, OPTIMIZATIONS, is_optimized, optimize_for_cpu  # noqa: F401 (public here)
from pyterrier_kdcl.reranker import CrossEncoder, _check_strings, _validate_result_frame


# -- sharded scoring ---------------------------------------------------------------------------------------------
class ShardedScorer(pt.Transformer):
    """Reranks with one copy of a reranker per worker process, each query's rows in one shard; results as one.

    Workers start at the first non-empty frame (``pt.Experiment`` probes with empty frames first, which are
    answered without them), each loading the reranker saved with ``CrossEncoder.save``, and stay up for the
    next frames until :meth:`close` (or the end of the program, or a ``with`` block).

    Example::

        reranker = kdcl.CrossEncoder.load("my-reranker")
        with ShardedScorer(reranker, devices=["cuda:0", "cuda:1"]) as sharded:   # or workers=2 on CPU
            pt.Experiment([bm25 >> text >> reranker, bm25 >> text >> sharded], topics, qrels, [nDCG @ 10])

    Scripts that use it need the ``if __name__ == "__main__":`` guard: workers start with ``spawn``.

    Args:
        reranker: a ``CrossEncoder`` (saved once to a temporary directory) or the directory of a saved one.
        devices: one worker per entry (``"cuda:0"``, ``"cpu"``); default every CUDA device, else ``workers``
            CPU workers.
        workers: number of CPU workers when ``devices`` is not given (default 2).
        threads: torch threads per CPU worker (default: the cores shared out between them).
        optimize: ``"auto"``, ``"bf16"``, ``"int8-rows"`` (all three batch-independent) or ``"int8"`` applies
            :func:`optimize_for_cpu` with that method in each CPU worker.
        batch_size, max_length: override the saved settings in the workers.
    """

    schematic = {"label": "ShardedScorer", "help_url": "docs/serving.md#sharded-scoring"}
    # a shard goes to its worker in pieces of this many rows (one tokenisation chunk of CrossEncoder.transform),
    # the next as the worker finishes one, so that a worker holds one piece's documents, not its whole shard's
    piece_rows = 2048

    def __init__(self, reranker: CrossEncoder | str | os.PathLike, *, devices: list[str] | None = None,
                 workers: int | None = None, threads: int | None = None, optimize: str | None = None,
                 batch_size: int | None = None, max_length: int | None = None, verbose: bool = False):
        if optimize is not None and optimize not in OPTIMIZATIONS:
            raise ValueError(f"optimize must be None or one of {OPTIMIZATIONS}, got {optimize!r}")
        if devices is None:
            gpus = torch.cuda.device_count()
            devices = [f"cuda:{i}" for i in range(gpus)] if gpus and workers is None else ["cpu"] * (workers or 2)
        elif workers is not None and workers != len(devices):
            raise ValueError(f"workers={workers} but {len(devices)} devices: give one or the other")
        if not devices:
            raise ValueError("ShardedScorer needs at least one device or worker")
        if optimize and any(torch.device(d).type != "cpu" for d in devices):
            raise ValueError(f"optimize={optimize!r} is a CPU path; on GPUs load the reranker with dtype='bfloat16'")
        self.devices = [str(d) for d in devices]
        cpu_workers = sum(torch.device(d).type == "cpu" for d in self.devices)
        self.threads = threads or max(1, (os.cpu_count() or 1) // max(1, cpu_workers))
        self.workers = workers
        self.optimize = optimize
        self.batch_size, self.max_length = batch_size, max_length
        self.overrides = {k: v for k, v in (("batch_size", batch_size), ("max_length", max_length)) if v is not None}
        self.verbose = verbose
        self._tmp = None
        if isinstance(reranker, CrossEncoder):
            if is_optimized(reranker):
                raise ValueError("pass the float32 reranker with optimize='auto' (or a method): an optimised one "
                                 "cannot be saved for the workers")
            self.text_field = reranker.text_field
            self.name = repr(reranker)
            self._tmp = tempfile.mkdtemp(prefix="kdcl-sharded-")
            self.path = Path(self._tmp) / "reranker"
            reranker.save(self.path)
        else:
            self.path = Path(reranker)
            settings = models.read_settings(self.path)  # fails early, with a clear message, on a wrong directory
            self.text_field = settings.get("text_field", "text")
            self.name = f"CrossEncoder.load({str(self.path)!r})"
        self._reranker = self.path  # for pt.inspect: what the workers load (a CrossEncoder given is saved there)
        self._pools: list[ProcessPoolExecutor] | None = None
        self._stop = None  # stops the running workers: on close(), garbage collection or exit
        if self._tmp is not None:  # the saved copy outlives close(), so that the next frame can restart workers
            weakref.finalize(self, shutil.rmtree, self._tmp, True)

    # -- scoring -------------------------------------------------------------------------------------------------
    def transform(self, inp: pd.DataFrame) -> pd.DataFrame:
        _validate_result_frame(inp, self.text_field, self)
        if len(inp) == 0:
            return pt.model.add_ranks(inp.assign(score=pd.Series(dtype="float64")))
        _check_strings(inp["query"], "query", allow_empty=False)  # as CrossEncoder: an empty query ranks by nothing
        _check_strings(inp[self.text_field], self.text_field)
        scores = self.score_pairs(inp["qid"], inp["query"], inp[self.text_field])
        out = pt.model.add_ranks(inp.assign(score=scores.astype("float64")))
        return out.sort_values(["qid", "rank"], kind="stable").reset_index(drop=True)

    def score_pairs(self, qids, queries, texts) -> np.ndarray:
        """Scores in input order; rows sharing a qid are scored by the same worker.

        A worker that dies while scoring (killed, for example by the out-of-memory killer) raises a
        ``RuntimeError`` naming its device and its queries; one that could not load the reranker raises one
        with the error it met. No scores are returned either way, and the next call starts new workers."""
        qids = np.asarray(list(qids))
        queries, texts = np.asarray(list(queries), dtype=object), np.asarray(list(texts), dtype=object)
        shards = shard_by_query(qids, len(self.devices))
        pools = self._start()
        work = [(worker, rows, [pool.submit(_score, queries[piece].tolist(), texts[piece].tolist())
                                for piece in np.array_split(rows, -(-len(rows) // self.piece_rows))])
                for worker, (rows, pool) in enumerate(zip(shards, pools)) if len(rows)]
        out = np.empty(len(queries), dtype=np.float32)
        for worker, rows, futures in work:
            try:
                out[rows] = np.concatenate([future.result() for future in futures])
            except BrokenProcessPool:
                self._abandon()
                raise RuntimeError(self._died(worker, qids[rows])) from None
            except WorkerSetupError as err:
                self._abandon()
                raise RuntimeError(f"{self!r}: worker {worker} (device {self.devices[worker]!r}) could not load "
                                   f"the reranker from {self.path}: {err}. No frame is returned; remove the cause "
                                   "(a device that does not exist, too little memory for the model, a damaged "
                                   "saved reranker) and run the frame again: the next call starts new "
                                   "workers") from None
        return out

    def _died(self, worker: int, qids: np.ndarray) -> str:
        names = pd.unique(qids).tolist()
        shown = ", ".join(repr(q) for q in names[:5]) + (", ..." if len(names) > 5 else "")
        return (f"{self!r}: worker {worker} (device {self.devices[worker]!r}) died while scoring its shard of "
                f"{len(qids)} rows, {len(names)} queries (qids {shown}); no frame is returned. It was killed or "
                "crashed (often the out-of-memory killer: see `dmesg`). The workers were stopped and the next call "
                "starts new ones: run the frame again, and if a worker dies again, give it more memory (fewer "
                "workers, a smaller batch_size or max_length, or smaller frames)")

    # -- workers -------------------------------------------------------------------------------------------------
    def _start(self) -> list[ProcessPoolExecutor]:
        if self._pools is None:
            import multiprocessing

            context = multiprocessing.get_context("spawn")  # fork would copy torch's threads and CUDA state
            self._pools = [
                ProcessPoolExecutor(1, mp_context=context, initializer=_load_worker,
                                    initargs=(str(self.path), device, self.threads, self.optimize, self.overrides,
                                              self.verbose))
                for device in self.devices
            ]
            self._stop = weakref.finalize(self, _shutdown, self._pools)
        return self._pools

    def close(self) -> None:
        """Stops the workers (the next frame starts them again)."""
        if self._stop is not None:
            self._stop()
        self._pools = self._stop = None

    def _abandon(self) -> None:
        # after a worker died: stop at once, without waiting for the other workers' shards (they exit after them)
        if self._stop is not None:
            self._stop.detach()
            _shutdown(self._pools, wait=False)
        self._pools = self._stop = None

    def __enter__(self) -> ShardedScorer:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"ShardedScorer({self.name}, devices={self.devices})"


def score_sharded(reranker: CrossEncoder | str | os.PathLike, frame: pd.DataFrame, **kwargs) -> pd.DataFrame:
    """Reranks ``frame`` once with a :class:`ShardedScorer` (same arguments), then stops its workers."""
    with ShardedScorer(reranker, **kwargs) as scorer:
        return scorer(frame)


def shard_by_query(qids: np.ndarray, shards: int) -> list[np.ndarray]:
    """Row positions per shard: whole queries, largest first onto the least-loaded shard (balanced by rows)."""
    codes = pd.factorize(qids)[0]
    sizes = np.bincount(codes)
    loads = [0] * shards
    owner = np.empty(len(sizes), dtype=np.int64)
    for query in np.argsort(-sizes, kind="stable"):
        shard = loads.index(min(loads))
        owner[query] = shard
        loads[shard] += sizes[query]
    row_owner = owner[codes]
    return [np.flatnonzero(row_owner == shard) for shard in range(shards)]


def _shutdown(pools: list[ProcessPoolExecutor], wait: bool = True) -> None:
    for pool in pools:
        pool.shutdown(wait=wait, cancel_futures=True)


# -- inside a worker process -------------------------------------------------------------------------------------
_WORKER: dict = {}


class WorkerSetupError(RuntimeError):
    """A worker could not load the reranker; raised by each call it gets, so the caller learns why (an error in a
    pool's initializer only breaks the pool, as a killed worker does)."""


def _load_worker(path: str, device: str, threads: int, optimize: str | None, overrides: dict, verbose: bool):
    try:
        if torch.device(device).type == "cpu":
            torch.set_num_threads(threads)
        reranker = CrossEncoder.load(path, device=device, verbose=verbose, **overrides)
        if optimize:
            optimize_for_cpu(reranker, optimize)
        _WORKER["reranker"] = reranker
    except Exception as err:  # kept for the calls: raised here, it would read as a killed worker
        _WORKER["error"] = f"{type(err).__name__}: {err}"


def _score(queries: list[str], texts: list[str]) -> np.ndarray:
    if "error" in _WORKER:
        raise WorkerSetupError(_WORKER["error"])
    return _WORKER["reranker"].score_pairs(queries, texts)
