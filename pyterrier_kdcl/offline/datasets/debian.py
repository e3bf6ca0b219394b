"""Debian packages as sources: download once with ``apt-get download``, unpack with ``dpkg-deb -x``.

Nothing is installed on the system and nothing needs root. Downloaded ``.deb`` files are kept in a
cache folder and reused, so a rebuild reads exactly the same bytes. Where a package cannot be
downloaded but is installed on this machine, its installed files are read instead.
"""

from __future__ import annotations

import gzip
import os
import re
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path


class SourcesUnavailable(RuntimeError):
    """A Debian package needed to build a collection could not be had."""


@dataclass
class Package:
    """One unpacked Debian package: its files lie under ``root`` at their installed paths."""

    name: str
    version: str
    root: Path
    licence: str = ""
    listed: frozenset[str] | None = None  # for an installed package: the paths dpkg lists as its own

    def files(self, under: str, pattern: str = "*") -> list[Path]:
        """Regular files (no symlinks) below ``root/under`` matching ``pattern``, sorted by path."""
        base = self.root / under.lstrip("/")
        if not base.is_dir():
            return []
        found = [p for p in base.rglob(pattern) if p.is_file() and not p.is_symlink()]
        if self.listed is not None:
            found = [p for p in found if "/" + p.relative_to(self.root).as_posix() in self.listed]
        return sorted(found, key=lambda p: p.as_posix())

    def read_text(self, path: Path) -> str:
        """A file's text, gunzipped when it ends in ``.gz``; undecodable bytes are replaced."""
        data = path.read_bytes()
        if path.suffix == ".gz":
            data = gzip.decompress(data)
        return data.decode("utf-8", errors="replace")

    def source(self) -> dict:
        return {"package": self.name, "version": self.version, "licence": self.licence,
                "copyright": f"/usr/share/doc/{self.name}/copyright"}


def _run(cmd: list[str], cwd: Path | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=600, check=False)


# The licence of the documentation each package carries, summarised by hand from its
# /usr/share/doc/<package>/copyright (whose machine-readable fields cover the whole source package).
LICENCES = {
    "manpages": "Linux man-pages licences (Linux-man-pages-copyleft, GPL, BSD, Expat; stated per page)",
    "manpages-dev": "Linux man-pages licences (Linux-man-pages-copyleft, GPL, BSD, Expat; stated per page)",
    "perl-doc": "GPL-1+ or Artistic (Perl)",
    "git-man": "GPL-2",
    "openssl": "Apache-2.0",
    "libssl-doc": "Apache-2.0",
    "systemd": "LGPL-2.1+",
    "libx11-doc": "MIT/X11",
    "libxt-dev": "MIT/X11",
    "x11-xserver-utils": "MIT/X11",
    "coreutils": "GPL-3+",
    "util-linux": "GPL-2+ (some pages BSD or public domain)",
    "procps": "GPL-2+ and LGPL-2+",
    "iproute2": "GPL-2",
    "findutils": "GPL-3+",
    "tcl8.6-doc": "Tcl/Tk licence (BSD-style)",
    "tk8.6-doc": "Tcl/Tk licence (BSD-style)",
    "libcurl4-doc": "curl licence (MIT-style)",
    "debhelper": "GPL-2+",
    "devscripts": "GPL-2+ (some scripts GPL-3+, Artistic or Expat)",
    "dpkg-dev": "GPL-2+",
    "libpam0g-dev": "BSD-3-clause or GPL",
    "debian-faq": "verbatim and modified copying permitted with the notice kept (SPI permission notice)",
}
PATTERN_LICENCES = {r"python3\.\d+-doc": "PSF-2.0 (Python documentation licence)",
                    r"postgresql-client-\d+": "PostgreSQL licence (BSD-style)"}


def licence(name: str) -> str:
    """The documentation licence of package ``name``; see its copyright file for the details."""
    if name in LICENCES:
        return LICENCES[name]
    for pattern, text in PATTERN_LICENCES.items():
        if re.fullmatch(pattern, name):
            return text
    return f"see /usr/share/doc/{name}/copyright"


def _cached_deb(debs: Path, name: str) -> Path | None:
    found = sorted(debs.glob(f"{name}_*.deb"))
    return found[-1] if found else None


def download(name: str, debs: Path) -> Path:
    """The ``.deb`` of package ``name`` in folder ``debs``, downloading it when not there yet."""
    cached = _cached_deb(debs, name)
    if cached is not None:
        return cached
    if shutil.which("apt-get") is None:
        raise SourcesUnavailable(f"cannot download Debian package {name!r}: apt-get is not available here")
    debs.mkdir(parents=True, exist_ok=True)
    tmp = debs / f".download-{name}-{os.getpid()}"
    tmp.mkdir(exist_ok=True)
    try:
        proc = _run(["apt-get", "download", "-q", name], cwd=tmp)
        got = sorted(tmp.glob(f"{name}_*.deb"))
        if proc.returncode != 0 or not got:
            detail = (proc.stderr or proc.stdout).strip().splitlines()[-3:]
            hint = " (the package lists may be missing: `apt-get update` needs root)" if "locate" in proc.stderr else ""
            raise SourcesUnavailable(f"`apt-get download {name}` failed{hint}: " + " | ".join(detail))
        target = debs / got[0].name
        os.replace(got[0], target)
        return target
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _installed(name: str) -> Package | None:
    """The package as installed on this machine (its files read in place), or None."""
    if shutil.which("dpkg-query") is None:
        return None
    proc = _run(["dpkg-query", "-W", "-f=${Status}\t${Version}", name])
    if proc.returncode != 0 or "install ok installed" not in proc.stdout:
        return None
    listed = frozenset(_run(["dpkg", "-L", name]).stdout.split("\n"))
    return Package(name, proc.stdout.split("\t")[1].strip(), Path("/"), licence(name), listed)


def fetch(name: str, debs: Path, workdir: Path) -> Package:
    """Package ``name`` unpacked under ``workdir`` from the cached or downloaded ``.deb``.

    Falls back to the installed copy when the ``.deb`` cannot be had; raises
    :class:`SourcesUnavailable`, saying why, when neither works.
    """
    try:
        deb = download(name, debs)
    except SourcesUnavailable:
        installed = _installed(name)
        if installed is None:
            raise
        return installed
    if shutil.which("dpkg-deb") is None:
        raise SourcesUnavailable(f"cannot unpack {deb.name}: dpkg-deb is not available here")
    version = _run(["dpkg-deb", "-f", str(deb), "Version"]).stdout.strip()
    root = workdir / name
    shutil.rmtree(root, ignore_errors=True)
    root.mkdir(parents=True)
    proc = _run(["dpkg-deb", "-x", str(deb), str(root)])
    if proc.returncode != 0:
        raise SourcesUnavailable(f"`dpkg-deb -x {deb.name}` failed: {proc.stderr.strip()}")
    return Package(name, version, root, licence(name))
