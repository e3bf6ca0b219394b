"""Where the package keeps what it builds once: converted models (cache) and collections (data).

Both directories are per user and can be moved with an environment variable:
``KDCL_CACHE`` (default ``~/.cache/pyterrier_kdcl``) and ``KDCL_DATA`` (default
``~/.local/share/pyterrier_kdcl``). Nothing here creates files; callers create what they write.
"""

from __future__ import annotations

import os
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
