"""Where the package keeps what it builds once: converted models (cache) and collections (data); how it writes a
file or a directory so that a reader never sees half of one (:func:`write_atomically`, :func:`finalized_directory`),
and how it reads back what it wrote (:func:`read_written`): a file left truncated or empty by a kill or a full disk
is named, then computed again or refused with what to do.

Both directories are per user and can be moved with an environment variable:
``KDCL_CACHE`` (default ``~/.cache/pyterrier_kdcl``) and ``KDCL_DATA`` (default
``~/.local/share/pyterrier_kdcl``). Nothing here creates them; callers create what they write.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import functools
import glob
import json
import os
import secrets
import shutil
import stat
import sys
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any


def _user_dir(env_var: str, xdg_var: str, fallback: str) -> Path:
    if os.environ.get(env_var):
        return Path(os.environ[env_var]).expanduser()
    base = os.environ.get(xdg_var) or str(Path.home() / fallback)
    return Path(base).expanduser() / "pyterrier_kdcl"


def cache_dir() -> Path:
    """Converted models and other caches that can be rebuilt at any time."""
    return _user_dir("KDCL_CACHE", "XDG_CACHE_HOME", ".cache")


def data_dir() -> Path:
    """Built collections and their indexes."""
    return _user_dir("KDCL_DATA", "XDG_DATA_HOME", ".local/share")


def write_atomically(path: str | os.PathLike, write: Callable[[Path], Any]) -> None:
    """``write(tmp)`` fills a temporary file beside ``path``, which is then renamed to ``path`` in one step: a kill
    or a full disk at any instant leaves the old file (or none), never half of the new one. The temporary name
    ends in ``path``'s suffix, so writers that go by it (pandas' compression, matplotlib's format) work; one that a
    killed writer of ``path`` left is removed first (a caller holds the directory's lock or is its only writer, so
    it is nobody's now).

    Example::

        write_atomically(out / "log.csv", lambda tmp: frame.to_csv(tmp, index=False))
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    for leftover in path.parent.glob(f".{glob.escape(path.name)}.*.tmp{glob.escape(path.suffix)}"):
        leftover.unlink(missing_ok=True)
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(4)}.tmp{path.suffix}")
    os.close(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))  # the umask's mode, as a plain write gives
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException:  # a KeyboardInterrupt too
        tmp.unlink(missing_ok=True)
        raise


def write_text_atomically(path: str | os.PathLike, text: str) -> None:
    """:func:`write_atomically` of UTF-8 text."""
    write_atomically(path, lambda tmp: tmp.write_text(text, encoding="utf-8"))


class UnreadableFile(OSError):
    """A file this package wrote cannot be read back (truncated, emptied or corrupt); the message names it and says
    what to do."""


def read_written(path: str | os.PathLike, read: Callable[[Path], Any] | None = None, *, remedy: str | None = None,
                 log: Callable[[str], None] | None = None) -> Any:
    """Reads back a file (or directory) this package wrote, through ``read(path)`` (default: JSON): the one guard
    for what a kill, a full disk or a broken disk may have left. None when ``path`` does not exist.

    When ``read`` fails, the file is unreadable: with ``remedy`` this raises :class:`UnreadableFile` naming the
    file, the error and the remedy; without, it is something the caller computes again: ``log`` says so, naming the
    file, and None is returned.

    Example::

        fitted = read_written(out / "teacher-temperature.json", log=print)  # None: fit it (again)
    """
    path = Path(path)
    if not path.exists():
        return None
    try:
        return read(path) if read is not None else json.loads(path.read_text(encoding="utf-8"))
    except Exception as err:  # noqa: BLE001 — whatever the reader raises, the file could not be read
        if remedy is not None:
            raise unreadable(path, err, remedy) from err
        if log is not None:
            log(f"{_problem(path, err)}: computing it again")
        return None


def unreadable(path: str | os.PathLike, err: BaseException, remedy: str) -> UnreadableFile:
    """The error :func:`read_written` raises, for readers that cannot go through it (a database open for hours)."""
    return UnreadableFile(f"{_problem(path, err)}: {remedy}")


def _problem(path, err: BaseException) -> str:
    return f"{path} cannot be read ({type(err).__name__}: {str(err)[:300]}; truncated or corrupt?)"


@contextlib.contextmanager
def finalized_directory(path: str | os.PathLike, *, replace: bool = False) -> Iterator[Path]:
    """The block fills a private temporary directory beside ``path`` (mode ``0o700`` while it is written); when the
    block ends without error it gets the mode a plain ``mkdir`` would give (the umask's) and is renamed to ``path``
    in one step, and when the block fails it is removed. So ``path`` is absent or complete, and never writable by
    others for an instant (PyTerrier's ``pt.io.finalized_directory`` renames a ``0o777`` directory into place).

    Without ``replace``, an existing non-empty ``path`` makes the rename fail with ``OSError`` (a race lost to
    another writer). With ``replace=True`` an existing directory is swapped for the new one in one step (Linux's
    ``renameat2(RENAME_EXCHANGE)``) and deleted afterwards: a reader, or a kill at any instant, finds the old
    directory or the new one at ``path``, never neither. Where the swap is unavailable (other systems, some
    network file systems) the old directory is first renamed aside to ``.<name>.old-<pid>``: a kill between the
    two renames leaves it there, complete (:func:`interrupted_replacement` finds it).

    Example::

        with finalized_directory(target) as tmp:
            (tmp / "config.json").write_text("{}")
    """
    path = Path(path)
    stem, ext = os.path.splitext(path.name)  # the temporary name pt.io gives: cleaners of leftovers glob for it
    tmp = Path(tempfile.mkdtemp(prefix=f".{stem}.", suffix=f".tmp{ext}", dir=path.parent))
    try:
        yield tmp
        os.chmod(tmp, _mkdir_mode(tmp))
        if replace and path.is_dir() and not path.is_symlink():
            _swap_in(tmp, path)
        else:
            os.replace(tmp, path)
    except BaseException:  # a KeyboardInterrupt too: nothing half-written stays behind
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def interrupted_replacement(path: str | os.PathLike) -> Path | None:
    """The complete old directory that a replacement of ``path`` interrupted between its two renames left aside
    (only where the one-step swap is unavailable), or None."""
    path = Path(path)
    aside = sorted(path.parent.glob(f".{path.name}.old-*")) if path.parent.is_dir() else []
    return aside[-1] if aside and not path.exists() else None


def _mkdir_mode(inside: Path) -> int:
    """The mode a new directory gets from the process's umask (read without changing the umask, thread-safely)."""
    probe = inside / ".mode-probe"
    probe.mkdir()
    try:
        return stat.S_IMODE(probe.stat().st_mode)
    finally:
        probe.rmdir()


def _swap_in(new: Path, path: Path) -> None:
    """Puts directory ``new`` at ``path`` in place of the directory there, then deletes the old one."""
    if _exchange(new, path):
        shutil.rmtree(new, ignore_errors=True)  # ``new`` now names the old directory
        return
    aside = path.with_name(f".{path.name}.old-{os.getpid()}")
    os.replace(path, aside)
    try:
        os.replace(new, path)
    except BaseException:
        os.replace(aside, path)  # the old directory back: the caller removes the new one
        raise
    shutil.rmtree(aside, ignore_errors=True)


_RENAME_EXCHANGE = 2
_AT_FDCWD = -100


def _exchange(a: Path, b: Path) -> bool:
    """Swaps two paths atomically (Linux ``renameat2``); False where the system or file system cannot."""
    renameat2 = _renameat2()
    if renameat2 is None:
        return False
    if renameat2(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP):  # no RENAME_EXCHANGE here: rename aside instead
        return False
    raise OSError(err, f"could not swap {a} into {b}: {os.strerror(err)}")


@functools.cache
def _renameat2():
    if not sys.platform.startswith("linux"):
        return None
    try:
        function = ctypes.CDLL(None, use_errno=True).renameat2  # glibc 2.28+, musl 1.2.3+
    except (AttributeError, OSError):
        return None
    function.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    function.restype = ctypes.c_int
    return function
