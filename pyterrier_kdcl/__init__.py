"""Train and serve cross-encoder rerankers in PyTerrier, by contrastive learning or knowledge distillation.

Example::

    import pyterrier as pt
    import pyterrier_kdcl as kdcl

    reranker = kdcl.CrossEncoder("minilm-l6")
    trainer = kdcl.ContrastiveTrainer(reranker, group_size=8)

Every name loads on first use (PEP 562): PyTerrier imports this package at its own start, through the
``pyterrier.modules`` entry point that makes ``irds:kdcl/…`` resolvable (``pyterrier_kdcl._pyterrier_hook``), and
that must cost nothing. Importing it makes those ids resolvable too, for ir_datasets used without PyTerrier.
``kdcl.datasets`` (the offline collections, loaded only then), ``kdcl.losses`` and ``kdcl.model_card`` (a saved
reranker's README.md) are modules.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

from pyterrier_kdcl._pyterrier_hook import register_pattern

__version__ = "0.1.0"  # the one place: pyproject.toml reads it

_HOMES = {  # public name -> the module that defines it
    "CrossEncoder": "pyterrier_kdcl.reranker",
    "ShardedScorer": "pyterrier_kdcl.serving",
    "optimize_for_cpu": "pyterrier_kdcl.fast",
    "RerankerTrainer": "pyterrier_kdcl.training.trainer",
    "ContrastiveTrainer": "pyterrier_kdcl.training.trainer",
    "DistillationTrainer": "pyterrier_kdcl.training.trainer",
    "GroupSampler": "pyterrier_kdcl.training.groups",
    "ScoreFusion": "pyterrier_kdcl.fusion",
    "FirstStageScore": "pyterrier_kdcl.fusion",
}
_MODULES = {"losses": "pyterrier_kdcl.training.losses", "datasets": "pyterrier_kdcl.offline.datasets",
            "model_card": "pyterrier_kdcl.model_card"}

__all__ = ["ContrastiveTrainer", "CrossEncoder", "DistillationTrainer", "FirstStageScore", "GroupSampler",
           "RerankerTrainer", "ScoreFusion", "ShardedScorer", "datasets", "losses", "model_card", "optimize_for_cpu"]


register_pattern()


def __getattr__(name: str):
    if name in _HOMES:
        value = getattr(importlib.import_module(_HOMES[name]), name)
    elif name in _MODULES:
        value = importlib.import_module(_MODULES[name])
    else:
        raise AttributeError(f"module 'pyterrier_kdcl' has no attribute {name!r}")
    globals()[name] = value  # later look-ups skip this function
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *__all__})


if TYPE_CHECKING:  # what type checkers and IDEs see
    from pyterrier_kdcl import model_card
    from pyterrier_kdcl.fast import optimize_for_cpu
    from pyterrier_kdcl.fusion import FirstStageScore, ScoreFusion
    from pyterrier_kdcl.offline import datasets
    from pyterrier_kdcl.reranker import CrossEncoder
    from pyterrier_kdcl.serving import ShardedScorer
    from pyterrier_kdcl.training import losses
    from pyterrier_kdcl.training.groups import GroupSampler
    from pyterrier_kdcl.training.trainer import ContrastiveTrainer, DistillationTrainer, RerankerTrainer
