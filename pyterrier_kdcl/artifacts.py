"""Downloading a file (weights, an archived reranker, a data file) from a URL, checked against its sha256.

``fetch(url, sha256=...)`` hashes the bytes as it writes them to a temporary file beside the target, and moves
the file into place only when the digest matches: a file under the final name is always complete and, when a
digest was given, verified. A cached copy is hashed again before it is returned, and fetched again if it no
longer matches. It only downloads: it never unpickles, unpacks or imports what it fetched.

PyTerrier's own artifact packages have ``pt.Artifact.from_url(url, expected_sha256=...)``; this is for plain files.

Example::

    from pyterrier_kdcl.artifacts import fetch
    path = fetch("https://example.org/reranker.tar.gz", sha256="9f86d08...")
"""

from __future__ import annotations

import hashlib
import os
import re
import tempfile
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path

from pyterrier_kdcl import paths

SCHEMES = ("http", "https", "file")
_CHUNK = 1 << 20


def fetch(url: str, sha256: str | None = None, dest: str | os.PathLike | None = None, *,
          timeout: float = 60.0) -> Path:
    """Downloads ``url`` to ``dest`` (default: under ``paths.cache_dir() / "downloads"``) and returns its path.

    With ``sha256`` (64 hex digits) the download is refused unless its digest matches; nothing is kept then.
    """
    scheme = urllib.parse.urlparse(url).scheme
    if scheme not in SCHEMES:
        raise ValueError(f"cannot fetch {url!r}: only {', '.join(SCHEMES)} URLs are supported")
    if sha256 is not None:
        if not re.fullmatch(r"[0-9a-fA-F]{64}", sha256):
            raise ValueError(f"sha256 must be 64 hexadecimal digits, got {sha256!r}")
        sha256 = sha256.lower()
    dest = Path(dest) if dest is not None else _default_dest(url)
    if dest.exists():
        if sha256 is None or file_sha256(dest) == sha256:
            return dest
        dest.unlink()  # a stale or altered copy: fetch it again
    dest.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{dest.name}.", dir=dest.parent)
    try:
        digest = hashlib.sha256()
        with os.fdopen(fd, "wb") as out:
            try:
                with urllib.request.urlopen(url, timeout=timeout) as response:
                    while chunk := response.read(_CHUNK):
                        digest.update(chunk)
                        out.write(chunk)
            except urllib.error.URLError as err:
                raise OSError(f"could not download {url}: {err}") from err
        if sha256 is not None and digest.hexdigest() != sha256:
            raise ValueError(f"{url} has sha256 {digest.hexdigest()}, not the expected {sha256}: the download is "
                             "corrupt or not the file you asked for; nothing was kept")
        os.replace(tmp, dest)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return dest


def file_sha256(path: str | os.PathLike) -> str:
    """The sha256 of a file's bytes, as 64 lowercase hex digits."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def _default_dest(url: str) -> Path:
    name = Path(urllib.parse.urlparse(url).path).name or "download"
    return paths.cache_dir() / "downloads" / hashlib.sha256(url.encode()).hexdigest()[:16] / name
