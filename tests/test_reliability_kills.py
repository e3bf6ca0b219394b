"""Reliability: an experiment killed at any write resumes to the results of an uninterrupted run (issue 23 item 21).

The harness (:func:`kill_at_write`) makes the process SIGKILL itself at its N-th write inside ``--out``: a Python
audit hook sees every ``open`` for writing, rename, removal and ``rmtree`` there (ours, pandas', PyTerrier's,
matplotlib's), and at the chosen one kills the process either just before it, or, for an ``open`` that empties the
file (mode ``w``), just after it did so (a kill or a full disk in the middle of writing it). Each run is a forked
child of the test process (models, collections and imports are loaded once), so a kill costs no interpreter start.

The test runs a tiny experiment once uninterrupted and counts its writes (about 210), then for a sample of write
points kills a fresh run there, reruns it to the end, and asserts that the per-query results (``perquery.csv.gz``),
the fitted teacher temperature and every stage's ``done.json`` fingerprint equal the uninterrupted run's. The sample
is drawn with ``KDCL_KILL_SEED`` (random when unset, printed on failure): 12 points, two at a time.
``KDCL_KILL_POINTS=all`` runs every point (about 270: some 15 minutes on two idle cores), ``KDCL_KILL_POINTS=N`` a
sample of N, ``KDCL_KILL_ONLY=text`` only the writes whose path holds ``text`` (e.g. ``done.json``, ``runs/``).

Run one point by hand: ``KDCL_KILL_AT_WRITE=N`` in the environment of a process that calls :func:`kill_at_write`
with ``at=None``.
"""

from __future__ import annotations

import copy
import gzip
import json
import os
import random
import signal
import sys
from pathlib import Path

from test_experiment import _data_dir, _fast_cpu, collection, tiny_config  # noqa: F401 — fixtures

from pyterrier_kdcl.experiment import run_experiment

WRITE_EVENTS = {"os.rename", "os.remove", "os.rmdir", "shutil.rmtree", "os.truncate"}
_WRITE_FLAGS = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_APPEND


def _written(event: str, args: tuple) -> tuple[str, bool] | None:
    """(path, whether it is an ``open`` that empties the file) when ``event`` changes a file, else None."""
    if event == "open":
        path, mode, flags = args
        writing = any(c in mode for c in "wax+") if isinstance(mode, str) else bool(flags & _WRITE_FLAGS)
        empties = "w" in mode if isinstance(mode, str) else bool(flags & os.O_TRUNC)
        return (path, empties) if writing and isinstance(path, (str, bytes, os.PathLike)) else None
    if event in WRITE_EVENTS and args and isinstance(args[0], (str, bytes, os.PathLike)):
        return args[0], False
    return None


def kill_at_write(root: Path, at: int | None, how: str = "before", counted: list | None = None) -> None:
    """From now on this process counts its writes under ``root`` and SIGKILLs itself at the ``at``-th (default
    ``KDCL_KILL_AT_WRITE``): with ``how="before"`` before it happens; with ``how="empty"``, at an ``open`` that
    empties the file, just after it did so. ``counted`` collects (event, path, whether it empties) of each write.
    Irreversible (an audit hook): call it in a child process."""
    root, counted = os.path.realpath(root), [] if counted is None else counted
    at = int(os.environ.get("KDCL_KILL_AT_WRITE", "0")) if at is None else at
    busy = []

    def hook(event, args):
        if busy:
            return
        found = _written(event, args)
        if found is None:
            return
        path = os.path.realpath(os.fsdecode(found[0]))
        if not path.startswith(root + os.sep) or (found[1] and os.path.isdir(path)):  # a lock opens its folder
            return
        busy.append(1)
        try:
            if counted is not None:
                counted.append((event, os.path.relpath(path, root), found[1]))
            if len(counted) == at:
                if how == "empty" and found[1]:
                    os.makedirs(os.path.dirname(path), exist_ok=True)
                    open(path, "w").close()  # noqa: SIM115 — the file a writer emptied, then died
                os.kill(os.getpid(), signal.SIGKILL)
        finally:
            busy.pop()

    sys.addaudithook(hook)


def start_child(function, *args) -> tuple[int, int]:
    """Forks a child that runs ``function(*args)`` and sends its JSON-able value back; returns (pid, pipe)."""
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: never returns into pytest
        status = 0
        try:
            os.close(read)
            value = function(*args)
            with os.fdopen(write, "w") as pipe:
                json.dump(value, pipe)
        except BaseException as err:  # noqa: BLE001 — reported through the exit status
            sys.stderr.write(f"child failed: {type(err).__name__}: {err}\n")
            status = 1
        finally:
            os._exit(status)
    os.close(write)
    return pid, read


def finish_child(pid: int, read: int) -> tuple[int, object]:
    """(exit status, or -signal, of the child; the value it sent or None)."""
    with os.fdopen(read) as pipe:
        text = pipe.read()
    _, status = os.waitpid(pid, 0)
    return os.waitstatus_to_exitcode(status), (json.loads(text) if text else None)


def in_child(function, *args) -> tuple[int, object]:
    """Runs ``function(*args)`` in a forked child (a kill there leaves this process alone)."""
    return finish_child(*start_child(function, *args))


def kill_config(tiny_model, collection) -> dict:  # noqa: F811 — the fixture
    """A teacher, one student trained both ways (KD with a fitted temperature), one evaluation collection."""
    cfg = tiny_config(tiny_model, collection)
    cfg.update(seeds=[1], students=cfg["students"][:1])
    cfg["teacher"]["training"] = {"epochs": 1}
    cfg["training"].update(teacher_temperature="auto", validate_every=2, checkpoint_every=1)
    cfg["evaluation"] = {"in_domain": cfg["evaluation"]["in_domain"], "measures": ["nDCG@10", "RR@10"]}
    return cfg


def run(cfg: dict, out: Path, at: int = 0, how: str = "before") -> list:
    counted: list = []
    kill_at_write(out, at, how, counted)
    run_experiment(copy.deepcopy(cfg), out, verbose=False)
    return counted


def outcome(out: Path) -> dict:
    """What a run computed: per-query values, the fitted temperature, each stage's fingerprint."""
    stages = {str(p.parent.relative_to(out)): json.loads(p.read_text())["fingerprint"] for p in out.rglob("done.json")}
    temperature = json.loads((out / "teacher-temperature.json").read_text())
    return {"perquery": gzip.decompress((out / "perquery.csv.gz").read_bytes()).decode(),
            "temperature": [temperature["key"], temperature["temperature"]], "stages": stages}


def points(writes: list, seed: int, wanted: str, only: str = "") -> list[tuple[int, str]]:
    """The (write, how) pairs to kill at: all, or a seeded sample of ``wanted``; only writes whose path holds
    ``only``."""
    every = [(i, "before") for i, (_, path, _) in enumerate(writes, 1) if only in path]
    every += [(i, "empty") for i, (_, path, opened) in enumerate(writes, 1) if opened and only in path]
    if wanted == "all":
        return every
    return sorted(random.Random(seed).sample(every, min(int(wanted), len(every))))


def kill_and_rerun(cfg: dict, out: Path, at: int, how: str, expected: dict) -> str | None:
    """Kills a run at write ``at``, reruns it; what went wrong, or None."""
    status, _ = in_child(run, cfg, out, at, how)
    if status != -signal.SIGKILL:
        return f"not killed (status {status})"
    status, _ = in_child(run, cfg, out)
    if status != 0:
        return f"the rerun failed (status {status})"
    got = outcome(out)
    return None if got == expected else f"the rerun's results differ: {[k for k in got if got[k] != expected[k]]}"


def test_a_kill_at_any_write_then_a_rerun_gives_the_uninterrupted_results(tiny_model, collection, tmp_path):  # noqa: F811
    cfg = kill_config(tiny_model, collection)
    status, writes = in_child(run, cfg, tmp_path / "reference")
    assert status == 0, "the uninterrupted run failed"
    expected = outcome(tmp_path / "reference")
    seed = int(os.environ.get("KDCL_KILL_SEED", random.randrange(10**6)))
    chosen = points(writes, seed, os.environ.get("KDCL_KILL_POINTS", "12"), os.environ.get("KDCL_KILL_ONLY", ""))
    failures, running = [], []
    for n, (at, how) in enumerate(chosen):  # two at a time (two cores)
        running.append(((at, how), start_child(kill_and_rerun, cfg, tmp_path / f"killed-{at}-{how}", at, how,
                                               expected)))
        while running and (len(running) == 2 or n == len(chosen) - 1):
            (at_, how_), child = running.pop(0)
            status, problem = finish_child(*child)
            if status != 0 or problem:
                event, path, _ = writes[at_ - 1]
                failures.append(f"write {at_} ({how_}) of {len(writes)}, {event} {path}: {problem or status}")
    assert not failures, f"KDCL_KILL_SEED={seed}:\n" + "\n".join(failures)
