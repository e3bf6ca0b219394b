"""The fast CPU path in bfloat16: a pair's score does not depend on its batch mates, and it ranks as float32.

The per-row int8 method and ``auto`` are tested in test_fast_int8.py; the per-batch int8 method in test_serving.py,
with the fixtures used here.
"""

import numpy as np
import pytest
import torch
from scipy.stats import spearmanr
from test_serving import frame, saved  # noqa: F401 (a fixture)

import pyterrier_kdcl as kdcl
from pyterrier_kdcl.fast import FixedWidths, Float32Head, is_optimized

pytestmark = pytest.mark.usefixtures("one_thread")


def rescored(reranker, inp) -> dict[str, np.ndarray]:
    """The frame's scores in its own order, with other batch mates each time."""
    queries, texts = inp["query"].tolist(), inp["text"].tolist()
    order = np.random.default_rng(0).permutation(len(inp))
    shuffled = np.empty(len(inp), dtype=np.float32)
    shuffled[order] = reranker.score_pairs([queries[i] for i in order], [texts[i] for i in order])
    batch_size = reranker.batch_size
    reranker.batch_size = 3
    threes = reranker.score_pairs(queries, texts)
    reranker.batch_size = batch_size
    alone = np.array([reranker.score_pairs([q], [t])[0] for q, t in zip(queries, texts)])
    return {"shuffled": shuffled, "batches of 3": threes, "alone": alone}


def test_fast_scores_do_not_depend_on_batch_mates(saved):  # noqa: F811
    """Fails with per-batch activation scales (dynamic int8, the default before bf16) and without fixed shapes."""
    inp = frame()
    reranker = kdcl.optimize_for_cpu(kdcl.CrossEncoder.load(saved, device="cpu", verbose=False), "bf16")
    assert reranker.optimized == "bf16"
    scores = reranker.score_pairs(inp["query"], inp["text"])
    assert np.ptp(scores) > 0.1 and len(set(inp["text"].str.len())) > 5  # pairs of many lengths
    for how, again in rescored(reranker, inp).items():
        assert np.abs(again - scores).max() <= 1e-3, how


@pytest.mark.parametrize("family", ["bert", "qwen2"])
def test_fast_ranks_as_float32(saved, tiny_model, family):  # noqa: F811
    inp = frame()
    source = saved if family == "bert" else tiny_model(family, head="seqcls")
    load = kdcl.CrossEncoder.load if family == "bert" else kdcl.CrossEncoder
    fp32 = load(source, device="cpu", verbose=False, batch_size=4)
    fast = kdcl.optimize_for_cpu(load(source, device="cpu", verbose=False, batch_size=4), "bf16")
    a, b = fp32.score_pairs(inp["query"], inp["text"]), fast.score_pairs(inp["query"], inp["text"])
    assert np.ptp(a) > 0
    assert np.abs(a - b).max() < 0.05 * np.ptp(a)
    assert spearmanr(a, b).statistic > 0.97
    out = fast(inp)
    assert len(out) == len(inp) and out.groupby("qid")["score"].apply(lambda s: s.is_monotonic_decreasing).all()


def test_fast_runs_bfloat16_with_a_float32_head(saved):  # noqa: F811
    reranker = kdcl.optimize_for_cpu(kdcl.CrossEncoder.load(saved, device="cpu", verbose=False), "bf16")
    assert isinstance(reranker.ranker, FixedWidths) and is_optimized(reranker)
    heads = [m for m in reranker.ranker.modules() if isinstance(m, Float32Head)]
    assert len(heads) == 1 and heads[0].linear.weight.dtype == torch.float32 and heads[0].linear.out_features == 1
    others = {p.dtype for name, p in reranker.ranker.named_parameters() if ".linear." not in name}
    assert others == {torch.bfloat16}
    assert reranker.score_pairs(["read file"], ["read from a file descriptor"]).dtype == np.float32


def test_fast_refuses_a_second_method_and_answers_empty_frames(saved):  # noqa: F811
    reranker = kdcl.optimize_for_cpu(kdcl.CrossEncoder.load(saved, device="cpu", verbose=False), "bf16")
    assert kdcl.optimize_for_cpu(reranker, "bf16") is reranker and kdcl.optimize_for_cpu(reranker) is reranker
    with pytest.raises(ValueError, match="already optimised.*load the float32 checkpoint again"):
        kdcl.optimize_for_cpu(reranker, "int8")
    with pytest.raises(ValueError, match="keep_float.*method='int8-rows'"):
        kdcl.optimize_for_cpu(kdcl.CrossEncoder.load(saved, device="cpu", verbose=False), "bf16", keep_float=None)
    assert len(reranker(frame().iloc[:0])) == 0
