"""The packaged minilm-l6 reranking PISA BM25 results of a real offline collection inside pt.Experiment."""

import numpy as np
import pyterrier as pt
import pytest
import torch
from pyterrier.measures import RR, nDCG

import pyterrier_kdcl as kdcl

DATASET = "kdcl/faq/debian"

pytestmark = pytest.mark.skipif(not kdcl.datasets.is_built("faq-debian"),
                                reason="collections not built: python -m pyterrier_kdcl.offline.datasets build")


@pytest.fixture(scope="module")
def minilm(tmp_path_factory):
    return kdcl.CrossEncoder("minilm-l6", verbose=False, max_length=128, batch_size=16)


def test_minilm_reranks_bm25_inside_pt_experiment(minilm):
    dataset = pt.get_dataset(f"irds:{DATASET}")
    topics = dataset.get_topics().head(8)
    bm25 = kdcl.datasets.bm25(DATASET, num_results=10)
    pipeline = bm25 >> pt.text.get_text(dataset, "text") >> minilm
    table = pt.Experiment([bm25, pipeline], topics, dataset.get_qrels(), [nDCG @ 10, RR @ 10],
                          names=["BM25", "BM25 >> minilm-l6"], baseline=0)
    assert list(table["name"]) == ["BM25", "BM25 >> minilm-l6"]
    assert {"nDCG@10", "RR@10", "nDCG@10 p-value"} <= set(table.columns)
    assert 0 < table["nDCG@10"].iloc[0] <= 1
    # same candidates, so recall cannot change; the reranker reorders them
    out = pipeline(topics)
    assert out.groupby("qid").size().max() <= 10
    assert (out.groupby("qid")["rank"].min() == 0).all()


def test_packaged_minilm_gives_sentence_transformers_logits(minilm, tmp_path):
    from sentence_transformers import CrossEncoder as STCrossEncoder

    minilm.save(tmp_path / "minilm")  # fixes the freshly initialised head so both libraries read the same one
    st = STCrossEncoder(str(tmp_path / "minilm"), device="cpu", max_length=128)
    dataset = pt.get_dataset(f"irds:{DATASET}")
    frame = (kdcl.datasets.bm25(DATASET, num_results=5) >> pt.text.get_text(dataset, "text"))(
        dataset.get_topics().head(4))
    expected = st.predict(list(zip(frame["query"], frame["text"])), activation_fn=torch.nn.Identity())
    np.testing.assert_allclose(minilm.score_pairs(frame["query"], frame["text"]), expected, atol=1e-4)
