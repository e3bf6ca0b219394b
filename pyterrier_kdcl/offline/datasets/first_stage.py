"""BM25 over any ir_datasets collection with pyterrier-pisa, its index built once and cached.

For a kdcl collection the index lives inside the collection's folder (so a rebuild of the collection
drops it); for any other dataset under ``<data>/indexes/<dataset id>``.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pyterrier as pt

from pyterrier_kdcl.paths import data_dir, finalized_directory

from .registry import collection_of


def _index_path(dataset_id: str) -> Path:
    folder = collection_of(dataset_id)
    if folder is not None:
        return folder / "pisa.index"
    return data_dir() / "indexes" / dataset_id.removeprefix("irds:").replace("/", "_") / "pisa.index"


def pisa_index(dataset_id: str, fields: tuple[str, ...] = ("title", "text")):
    """The PISA index of dataset ``dataset_id`` (``kdcl/manpages/test`` or ``irds:vaswani``), built on first use."""
    from pyterrier_pisa import PisaIndex

    path = _index_path(dataset_id)
    if not PisaIndex(str(path)).built():
        dataset = pt.get_dataset("irds:" + dataset_id.removeprefix("irds:"))
        path.parent.mkdir(parents=True, exist_ok=True)
        first = next(iter(dataset.get_corpus_iter(verbose=False)), {})
        present = [f for f in fields if f in first] or ["text"]
        with finalized_directory(path) as tmp:
            PisaIndex(str(tmp), text_field=present, threads=1).index(dataset.get_corpus_iter(verbose=False))
            shutil.rmtree(path, ignore_errors=True)  # an unfinished index
    return PisaIndex(str(path))


def bm25(dataset_id: str, num_results: int = 100, **kwargs) -> pt.Transformer:
    """BM25 (PISA defaults k1=0.9, b=0.4) over a dataset's documents, indexed once and cached.

    >>> import pyterrier as pt, pyterrier_kdcl as kdcl
    >>> dataset = pt.get_dataset("irds:kdcl/manpages/test")
    >>> pipeline = kdcl.datasets.bm25("kdcl/manpages/test", num_results=100) >> pt.text.get_text(dataset, "text")
    """
    return pisa_index(dataset_id).bm25(num_results=num_results, **kwargs)
