"""Building the collections once into the data directory, and finding them there.

``build()`` fetches the Debian packages (cached as ``.deb`` files under ``<data>/debs``), builds each
collection that is missing or was built by an older builder, and writes it atomically to
``<data>/collections/<name>``. A collection already built is reused as it is.
"""

from __future__ import annotations

import tempfile
import time
from collections.abc import Iterable
from functools import partial
from pathlib import Path

from pyterrier_kdcl.paths import data_dir

from . import collection, debian, faqs, manpages

BUILDER_VERSION = 1
COLLECTIONS = ("manpages", *(f"faq-{name}" for name in faqs.FAQS))


def collections_dir(data: Path | None = None) -> Path:
    return (data or data_dir()) / "collections"


def collection_dir(name: str, data: Path | None = None) -> Path:
    """Where collection ``name`` (``manpages``, ``faq-python``, …) lives once built."""
    return collections_dir(data) / name


def debs_dir(data: Path | None = None) -> Path:
    return (data or data_dir()) / "debs"


def is_built(name: str, data: Path | None = None) -> bool:
    meta = collection.read_meta(collection_dir(name, data))
    return meta is not None and meta.get("builder_version") == BUILDER_VERSION


def _fetch(spec: str | tuple[str, ...], debs: Path, workdir: Path) -> debian.Package:
    """The first of the alternative packages in ``spec`` that can be had."""
    errors = []
    for name in (spec,) if isinstance(spec, str) else spec:
        try:
            return debian.fetch(name, debs, workdir)
        except debian.SourcesUnavailable as e:
            errors.append(str(e))
    raise debian.SourcesUnavailable("; ".join(errors) + "\n" + unavailable_hint())


def make(name: str, fetch) -> collection.Collection:
    """Collection ``name`` built in memory from packages got through ``fetch``."""
    if name == "manpages":
        return manpages.build(fetch)
    if name.startswith("faq-") and name[4:] in faqs.FAQS:
        return faqs.build(name[4:], fetch)
    raise KeyError(f"unknown collection {name!r}; known: {', '.join(COLLECTIONS)}")


def build(names: Iterable[str] | None = None, *, data: Path | None = None, debs: Path | None = None,
          force: bool = False, verbose: bool = True) -> dict[str, Path]:
    """Build the collections ``names`` (all by default) unless built already; returns their folders.

    ``data`` is the data folder (default :func:`pyterrier_kdcl.paths.data_dir`), ``debs`` the folder
    of downloaded packages (default ``<data>/debs``).

    >>> from pyterrier_kdcl import datasets
    >>> datasets.build(["faq-python"])  # doctest: +SKIP
    {'faq-python': PosixPath('/home/me/.local/share/pyterrier_kdcl/collections/faq-python')}
    """
    out = {}
    for name in names or COLLECTIONS:
        target = collection_dir(name, data)
        if not force and is_built(name, data):
            out[name] = target
            if verbose:
                print(f"{name}: already built in {target}")
            continue
        start = time.time()
        with tempfile.TemporaryDirectory(prefix=f"kdcl-{name}-") as work:
            col = make(name, partial(_fetch, debs=debs or debs_dir(data), workdir=Path(work)))
            out[name] = collection.write(col, target, BUILDER_VERSION)
        if verbose:
            print(f"{name}: built {col.counts()} in {time.time() - start:.0f}s -> {target}")
    return out


def working_irds_datasets() -> list[str]:
    """Built-in ir_datasets ids whose files are already on this machine (so they work offline)."""
    try:
        import ir_datasets
        home = Path(ir_datasets.util.home_path())
    except Exception:  # noqa: BLE001 - only used to word an error message
        return []
    names = []
    for folder in sorted(home.iterdir()) if home.is_dir() else []:
        if folder.is_dir() and any(p.is_file() for p in folder.rglob("*")):
            names.append(f"irds:{folder.name}")
    return names


def unavailable_hint() -> str:
    built = [name for name in COLLECTIONS if is_built(name)]
    alternatives = [f"irds:kdcl/{n.replace('faq-', 'faq/')}" for n in built] + working_irds_datasets()
    return ("The kdcl collections are built from Debian packages (`apt-get download`, `dpkg-deb -x`): run "
            "`python -m pyterrier_kdcl.offline.datasets build` on a Debian/Ubuntu machine that reaches a Debian "
            "archive, or copy a built data folder here and point KDCL_DATA at it. "
            + (f"Datasets that work here now: {', '.join(alternatives)}." if alternatives
               else "No irds: dataset has local files here (ir_datasets itself needs network for its downloads)."))
