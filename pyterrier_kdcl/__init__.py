"""Train and serve cross-encoder rerankers in PyTerrier, by contrastive learning or knowledge distillation."""

from pyterrier_kdcl.offline import datasets
from pyterrier_kdcl.reranker import CrossEncoder
from pyterrier_kdcl.training import ContrastiveTrainer, DistillationTrainer, RerankerTrainer, losses

__version__ = "0.1.0"
__all__ = ["ContrastiveTrainer", "CrossEncoder", "DistillationTrainer", "RerankerTrainer", "datasets", "losses"]
