"""Training rerankers: the one training loop and what it needs.

``RerankerTrainer`` (with its faces ``ContrastiveTrainer`` and ``DistillationTrainer``) in ``trainer.py``; the
losses in ``losses.py``; the groups of one positive and hard negatives in ``groups.py``; teacher scores and their
cache in ``teachers.py``; crash-safe checkpoints in ``checkpoints.py``; dev-set metrics measured during training
in ``dev_metrics.py``; FSDP's sharding and the whole model gathered from it in ``sharding.py``. This room imports
the inference core (``pyterrier_kdcl.reranker``), never the experiment application or the offline collections.
"""

from pyterrier_kdcl.training import losses
from pyterrier_kdcl.training.groups import GroupSampler, NegativeFilter
from pyterrier_kdcl.training.trainer import ContrastiveTrainer, DistillationTrainer, RerankerTrainer

__all__ = ["ContrastiveTrainer", "DistillationTrainer", "GroupSampler", "NegativeFilter", "RerankerTrainer", "losses"]
