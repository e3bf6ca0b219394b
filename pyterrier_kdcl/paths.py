"""Where the package keeps what it builds once: converted models (cache) and collections (data), and how it
writes a directory so that a reader never sees half of one.

Both directories are per user and can be moved with an environment variable:
``KDCL_CACHE`` (default ``~/.cache/pyterrier_kdcl``) and ``KDCL_DATA`` (default
``~/.local/share/pyterrier_kdcl``). Nothing here creates files; callers create what they write.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from pathlib import Path


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


@contextlib.contextmanager
def finalized_directory(path: str | os.PathLike) -> Iterator[Path]:
    """``pt.io.finalized_directory``: the block fills a temporary directory beside ``path``, which is renamed to
    ``path`` when the block ends without error and removed when it fails, so ``path`` is absent or complete.

    The rename cannot replace a non-empty directory: a block that replaces one removes (or moves aside) the old
    ``path`` as its last step. The directory's mode then follows the umask, as for any ``mkdir``: PyTerrier 1.1
    leaves it ``0o777``, writable by every user, which would let anyone swap a saved model's weights.

    Example::

        with finalized_directory(target) as tmp:
            (tmp / "config.json").write_text("{}")
    """
    import pyterrier as pt

    with pt.io.finalized_directory(str(path)) as tmp:
        yield Path(tmp)
    umask = os.umask(0o022)
    os.umask(umask)
    os.chmod(path, 0o777 & ~umask)
