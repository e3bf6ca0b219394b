"""PyTerrier's own conformance checks: pt.inspect can learn the reranker's and trainer's inputs and outputs."""

import sys
import tempfile
from pathlib import Path

import pyterrier as pt

import pyterrier_kdcl as kdcl

sys.path.insert(0, str(Path(__file__).parent))
from tiny_models import write_tiny_model  # noqa: E402

_MODEL = None


def tiny_bert() -> str:
    global _MODEL
    if _MODEL is None:
        _MODEL = str(write_tiny_model("bert", Path(tempfile.mkdtemp(prefix="kdcl-conformance-"))))
    return _MODEL


class TestCrossEncoderConformance(pt.testing.TransformerTestCase):
    @staticmethod
    def get_transformer():
        return kdcl.CrossEncoder(tiny_bert(), verbose=False)

    def test_outputs_add_score_and_rank(self):
        outputs = pt.inspect.transformer_outputs(self.transformer, ["qid", "query", "docno", "text"])
        self.assertTrue({"score", "rank"} <= set(outputs))


class TestTrainerConformance(pt.testing.TransformerTestCase):
    @staticmethod
    def get_transformer():
        return kdcl.ContrastiveTrainer(kdcl.CrossEncoder(tiny_bert(), verbose=False), verbose=False)
