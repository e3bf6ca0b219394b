"""ir_datasets definitions of the kdcl collections, so ``pt.get_dataset("irds:kdcl/…")`` finds them.

Nothing here builds anything: file paths are resolved when a dataset is first read (so ``KDCL_DATA`` may change
after import), and reading a collection that is not built raises :class:`CollectionNotBuilt`, which says how to
build it. ir_datasets reaches :func:`dataset` through the ``kdcl/`` pattern that ``pyterrier_kdcl._pyterrier_hook``
registers when PyTerrier starts; :func:`register` also lists every id in ``ir_datasets.registry``.
"""

import contextlib
from pathlib import Path
from typing import NamedTuple

import ir_datasets
from ir_datasets.datasets.base import Dataset
from ir_datasets.formats import JsonlDocs, TrecQrels, TsvQueries

from . import builder

QREL_DEFS = {1: "relevant", 0: "not relevant"}


class KdclDoc(NamedTuple):
    # real types in __annotations__ (pt.text.get_text checks them): no `from __future__ import annotations` here
    doc_id: str
    text: str
    title: str


class CollectionNotBuilt(FileNotFoundError):
    """A kdcl collection was read before it was built."""


class BuiltFile:
    """An ir_datasets download (``path()``/``stream()``) for one file of a built collection."""

    def __init__(self, collection: str, filename: str) -> None:
        self.collection, self.filename = collection, filename

    def path(self, force: bool = True) -> str:
        path = builder.collection_dir(self.collection) / self.filename
        if force and not path.exists():
            raise CollectionNotBuilt(
                f"collection {self.collection!r} is not built (no {path}). Build it once with "
                f"`python -m pyterrier_kdcl.offline.datasets build` (or `make collections`). "
                + builder.unavailable_hint())
        return str(path)

    @contextlib.contextmanager
    def stream(self):
        with open(self.path(), "rb") as f:
            yield f


class BuiltJsonlDocs(JsonlDocs):
    """JsonlDocs whose docstore sits next to the docs file, wherever the data directory is now."""

    def docs_store(self, field="doc_id", options=None):
        self._docstore_path = f"{self.docs_path(force=False)}.pklz4"
        return super().docs_store(field) if options is None else super().docs_store(field, options)


def _docs(collection: str) -> BuiltJsonlDocs:
    return BuiltJsonlDocs(BuiltFile(collection, "docs.jsonl"), doc_cls=KdclDoc,
                          mapping={"doc_id": "docno", "text": "text", "title": "title"}, lang="en",
                          namespace=f"kdcl/{collection}")


def _split(collection: str, docs: BuiltJsonlDocs, split: str) -> Dataset:
    queries = TsvQueries(BuiltFile(collection, f"{split}.queries.tsv"), namespace=f"kdcl/{collection}", lang="en")
    qrels = TrecQrels(BuiltFile(collection, f"{split}.qrels"), QREL_DEFS)
    return Dataset(docs, queries, qrels)


def dataset_ids() -> dict[str, tuple[str, str | None]]:
    """ir_datasets id -> (collection folder name, split or None for the corpus alone)."""
    ids: dict[str, tuple[str, str | None]] = {"kdcl/manpages": ("manpages", None)}
    ids.update({f"kdcl/manpages/{s}": ("manpages", s) for s in ("train", "dev", "test")})
    ids.update({f"kdcl/faq/{n[4:]}": (n, "all") for n in builder.COLLECTIONS if n.startswith("faq-")})
    return ids


def collection_of(dataset_id: str) -> Path | None:
    """The folder of the kdcl collection behind ``dataset_id`` (with or without ``irds:``), else None."""
    entry = dataset_ids().get(dataset_id.removeprefix("irds:"))
    return builder.collection_dir(entry[0]) if entry else None


_CORPORA: dict[str, BuiltJsonlDocs] = {}
_DATASETS: dict[str, Dataset] = {}


def dataset(dataset_id: str) -> Dataset:
    """The ir_datasets dataset of a kdcl id (``kdcl/manpages/test``); the splits of a collection share one corpus."""
    if dataset_id not in _DATASETS:
        ids = dataset_ids()
        if dataset_id not in ids:
            raise KeyError(f"{dataset_id!r} is not a kdcl dataset; the kdcl ids are {', '.join(ids)}")
        collection, split = ids[dataset_id]
        corpus = _CORPORA.setdefault(collection, _docs(collection))
        _DATASETS[dataset_id] = Dataset(corpus) if split is None else _split(collection, corpus, split)
    return _DATASETS[dataset_id]


def register() -> None:
    """List every kdcl id in ``ir_datasets.registry`` (ids ir_datasets has resolved already stay as they are)."""
    for dataset_id in dataset_ids():
        if dataset_id not in ir_datasets.registry:
            ir_datasets.registry.register(dataset_id, dataset(dataset_id))
