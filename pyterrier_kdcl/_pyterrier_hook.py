"""What PyTerrier loads from this package when it starts: the ``kdcl`` entry point of ``pyterrier.modules``.

``pt.get_dataset("irds:kdcl/…")`` asks ir_datasets, and ir_datasets 0.6 discovers no plugins by itself (it has no
entry points). So at ``import pyterrier`` the package is imported, and importing it adds one pattern to
``ir_datasets.registry``: any ``kdcl/…`` id ir_datasets does not know yet is handed to
:mod:`pyterrier_kdcl.offline.datasets`, which is imported only then. PyTerrier sets ``pt.kdcl`` to the package;
its names load on first use, so the hook costs an ``import ir_datasets`` and nothing more.

What it never does: import the inference core, torch, or the offline room; build or download anything.
"""

from __future__ import annotations

import warnings
from types import ModuleType

KDCL_IDS = r"kdcl/"  # ir_datasets matches its patterns at the start of an id
_registered = False


def pyterrier_module() -> ModuleType:
    """The entry point: the package, which PyTerrier calls ``pt.kdcl`` (importing it registered the pattern)."""
    import pyterrier_kdcl

    return pyterrier_kdcl


def register_pattern() -> None:
    """Hands every ``kdcl/…`` id that ir_datasets does not know yet to the offline collections (once a process)."""
    global _registered
    if _registered:
        return
    try:
        import ir_datasets
    except ImportError as err:  # this runs inside `import pyterrier`: never break that for everyone else
        warnings.warn(f"pyterrier_kdcl: the irds:kdcl/… datasets are unavailable ({err})", stacklevel=2)
        return
    ir_datasets.registry.register_pattern(KDCL_IDS, _resolve)
    _registered = True


def _resolve(dataset_id: str, _groups: tuple):
    from pyterrier_kdcl.offline.datasets.registry import dataset

    return dataset(dataset_id)
