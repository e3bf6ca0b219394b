"""Offline test collections from Debian documentation, served through ir_datasets.

The ids, resolvable in any process that imports PyTerrier (no ``import pyterrier_kdcl`` needed):

- ``kdcl/manpages/train``, ``kdcl/manpages/dev``, ``kdcl/manpages/test`` (and the corpus ``kdcl/manpages``):
  man-page NAME descriptions as queries, the pages as documents;
- ``kdcl/faq/python``, ``kdcl/faq/debian``, ``kdcl/faq/perl``: FAQ questions and their answers.

Build them once with ``python -m pyterrier_kdcl.offline.datasets build``; then
``pt.get_dataset("irds:kdcl/manpages/test")`` works like any dataset, and :func:`bm25` gives a cached
PISA BM25 over any of them. :func:`register` also lists the ids in ``ir_datasets.registry``. See
``docs/collections.md``.
"""

from pyterrier_kdcl._pyterrier_hook import register_pattern

from .builder import COLLECTIONS, build, collection_dir, is_built
from .debian import SourcesUnavailable
from .first_stage import bm25, pisa_index
from .registry import CollectionNotBuilt, dataset, dataset_ids, register

register_pattern()  # where PyTerrier's entry point is not installed (a source checkout), importing this suffices

__all__ = ["COLLECTIONS", "CollectionNotBuilt", "SourcesUnavailable", "bm25", "build", "collection_dir", "dataset",
           "dataset_ids", "is_built", "pisa_index", "register"]
