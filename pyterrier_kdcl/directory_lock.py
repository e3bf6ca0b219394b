"""One writer per directory: an advisory lock that a run holds for as long as it writes to its directory.

Two runs pointed at one output directory (a second terminal, a scheduler retrying a job) would otherwise clean up
each other's in-progress files as "leftovers of a killed run". The lock is ``filelock``'s (an OS ``flock`` on
``<dir>/.kdcl.lock``, released by the kernel when its process dies; on file systems without ``flock``, filelock's
own soft lock with stale-owner detection, from filelock 3.24.4: the declared lower bound). Next to it,
``<dir>/.kdcl.lock.json`` names the holder (pid, host, start time, command) so that the refusal can say who it is.

- A second run refuses at once with :class:`DirectoryLocked`, naming the holder and what to do; with ``wait=True``
  it says whom it waits for and waits.
- A lock left by a killed run is taken over, with a line saying whose it was: the kernel released its ``flock``,
  and its holder file is still there (a clean release removes it).
- Re-entrant within a thread: a nested ``directory_lock`` on a directory this thread holds is a no-op. Another
  thread of the same process is another writer: it is refused (or waits) as another process would be.
- It never protects against a program that does not take the lock, and never locks across hosts on file systems
  whose ``flock`` is local (some NFS set-ups).

Example::

    from pyterrier_kdcl.directory_lock import directory_lock

    with directory_lock("runs/quick"):      # raises DirectoryLocked if another run writes there
        ...                                 # write, clean leftovers of killed writes, etc.
"""

from __future__ import annotations

import json
import os
import socket
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

LOCK_FILE = ".kdcl.lock"
HOLDER_FILE = ".kdcl.lock.json"
DEFAULT_HINT = "write to another directory, or wait for it to finish (wait=True)"

_held: dict[tuple[int, str], int] = {}  # (thread, directory) this process holds -> nesting depth
_guard = threading.Lock()


class DirectoryLocked(RuntimeError):
    """Another run holds the directory. ``holder`` is its record (pid, host, started, command), or None."""

    def __init__(self, path: Path, holder: dict | None, hint: str = DEFAULT_HINT):
        self.path, self.holder, self.hint = Path(path), holder, hint
        super().__init__(f"{path} is in use by another run ({describe(holder)}); only one run may write to a "
                         f"directory at a time. To go on: {hint}.")


def describe(holder: dict | None) -> str:
    """``pid 123 on host h, started 2026-…, running `kdcl experiment …```; what is known of a holder."""
    if not holder:
        return "holder unknown: it has not written its details yet, or is not a kdcl process"
    text = f"pid {holder.get('pid')} on host {holder.get('host')}, started {holder.get('started')}"
    if holder.get("command"):
        text += f", running `{holder['command']}`"
    if _is_gone(holder):
        text += "; that process is no longer running, so a process it started may still hold the lock"
    return text


def _say(message: str) -> None:
    print(f"[kdcl] {message}", file=sys.stderr, flush=True)


@contextmanager
def directory_lock(path: str | os.PathLike, *, wait: bool = False, hint: str = DEFAULT_HINT,
                   log: Callable[[str], None] = _say, poll_interval: float = 0.5) -> Iterator[Path]:
    """Holds ``path``'s lock (creating ``path``) for the ``with`` block; yields ``path``.

    Args:
        path: the directory the run writes to.
        wait: wait for the holder to finish instead of raising :class:`DirectoryLocked`.
        hint: what the refusal tells the user to do (the CLI names ``--out`` and ``--wait``).
        log: where the lines about waiting and about taking over a killed run's lock go (default: stderr).
        poll_interval: seconds between attempts while waiting.
    """
    from filelock import FileLock, Timeout

    folder = Path(path)
    folder.mkdir(parents=True, exist_ok=True)
    key = (threading.get_ident(), str(folder.resolve()))
    with _guard:
        if key in _held:  # this thread holds it already: nested use by the same run
            _held[key] += 1
            nested = True
        else:
            nested = False
    if nested:
        try:
            yield folder
        finally:
            with _guard:
                _held[key] -= 1
        return

    lock = FileLock(str(folder / LOCK_FILE))
    try:
        lock.acquire(timeout=0)
    except Timeout:
        holder = _read_holder(folder, patience=1.0)
        if not wait:
            raise DirectoryLocked(folder, holder, hint) from None
        log(f"{folder} is in use by another run ({describe(holder)}); waiting for it to finish")
        started = time.monotonic()
        lock.acquire(timeout=-1, poll_interval=poll_interval)
        log(f"{folder}: the other run finished after {time.monotonic() - started:.0f}s; going on")
    try:
        previous = _read_holder(folder)
        if previous and not _is_this_process(previous):
            log(f"{folder}: taking over the lock left by {_left_by(previous)}")
        _write_holder(folder)
        with _guard:
            _held[key] = 1
        try:
            yield folder
        finally:
            with _guard:
                _held.pop(key, None)
            (folder / HOLDER_FILE).unlink(missing_ok=True)  # before the release: a clean exit leaves no record
    finally:
        lock.release()


def holder(path: str | os.PathLike) -> dict | None:
    """The record of the run that holds (or last held without releasing) ``path``'s lock, or None."""
    return _read_holder(Path(path))


# -- the holder record ---------------------------------------------------------------------------------------------
def _is_this_process(record: dict) -> bool:
    return record.get("pid") == os.getpid() and record.get("host") == socket.gethostname()


def _write_holder(folder: Path) -> None:
    record = {"pid": os.getpid(), "host": socket.gethostname(), "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
              "command": " ".join([Path(sys.argv[0]).name, *sys.argv[1:]])[:300] if sys.argv else ""}
    fd, tmp = tempfile.mkstemp(prefix=f".{HOLDER_FILE}.", dir=folder)
    with os.fdopen(fd, "w", encoding="utf-8") as f:
        json.dump(record, f, indent=1)
    os.replace(tmp, folder / HOLDER_FILE)


def _read_holder(folder: Path, patience: float = 0.0) -> dict | None:
    """The holder record; waits up to ``patience`` seconds for a holder that has the lock but not yet written it."""
    deadline = time.monotonic() + patience
    while True:
        try:
            record = json.loads((folder / HOLDER_FILE).read_text(encoding="utf-8"))
            return record if isinstance(record, dict) else None
        except (OSError, ValueError):
            if time.monotonic() >= deadline:
                return None
            time.sleep(0.1)


def _is_gone(record: dict) -> bool:
    """True when the recorded process ran on this host and runs no more."""
    if os.name == "nt" or record.get("host") != socket.gethostname() or not isinstance(record.get("pid"), int):
        return False  # (on Windows, os.kill(pid, 0) would signal the process)
    try:
        os.kill(record["pid"], 0)
    except ProcessLookupError:
        return True
    except PermissionError:  # it exists, under another user
        return False
    return False


def _left_by(record: dict) -> str:
    who = f"pid {record.get('pid')} on host {record.get('host')} (started {record.get('started')})"
    if _is_gone(record):
        return f"{who}, which is no longer running (killed?)"
    if record.get("host") == socket.gethostname():
        return f"{who}, which released it without cleaning up (its pid now belongs to another process)"
    return f"{who}, which released it without cleaning up (killed?)"


__all__ = ["DirectoryLocked", "directory_lock", "holder"]
