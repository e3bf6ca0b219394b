"""The per-row int8 fast path (``int8-rows``) and ``optimize_for_cpu``'s default, ``auto``, which picks it where the
CPU has no native bfloat16.

Comparisons hold on any x86-64 CPU (AVX2 or AVX-512): int8 sums are exact integers there (7-bit weights), and
every float comparison has a tolerance.
"""

import logging

import numpy as np
import pytest
import torch
from scipy.stats import spearmanr
from test_fast import rescored
from test_serving import frame, saved  # noqa: F401 (a fixture)

import pyterrier_kdcl as kdcl
import pyterrier_kdcl.fast
from pyterrier_kdcl.fast import FFN_OUTPUT, FixedWidths, RowInt8Linear

pytestmark = [pytest.mark.usefixtures("one_thread"),
              pytest.mark.skipif(not pyterrier_kdcl.fast.int8_supported(), reason="no fbgemm int8 kernels here")]


def load(path, **kw):
    return kdcl.CrossEncoder.load(path, device="cpu", verbose=False, **kw)


@pytest.fixture
def native(monkeypatch):
    """``native(True|False)`` makes this CPU one with (or without) native bfloat16."""
    return lambda value: monkeypatch.setattr(pyterrier_kdcl.fast, "native_bfloat16", lambda: value)


# -- the layer -------------------------------------------------------------------------------------------------
def test_each_row_is_quantised_with_its_own_scale():
    """Rows of magnitudes 1e-3 to 1e3 in one batch all keep about 1% accuracy: one scale per batch would round the
    small rows to nothing, and a wrong scale (per column, or a missing rescale) would miss by far more."""
    torch.manual_seed(0)
    linear = torch.nn.Linear(96, 48)
    x = torch.randn(40, 96) * torch.logspace(-3, 3, 40)[:, None]
    with torch.no_grad():
        expected, got = linear(x) - linear.bias, RowInt8Linear(linear)(x) - linear.bias
    error = (got - expected).norm(dim=1) / expected.norm(dim=1)
    assert error.max() < 0.05 and error.median() < 0.03, error


def test_integer_sums_are_exact_on_this_cpu():
    """The layer's output is what exact integer arithmetic on its quantised operands gives: on CPUs without VNNI
    (AVX2), int8 products are summed in pairs in saturating 16 bits, and 8-bit weights overflowed there (14% off)."""
    torch.manual_seed(1)
    linear = torch.nn.Linear(256, 64, bias=False)
    with torch.no_grad():
        linear.weight[:, ::2] = linear.weight[:, ::2].sign() * linear.weight.abs().amax()  # large neighbours
    x = torch.rand(32, 256)  # all positive: the largest unsigned activations
    layer = RowInt8Linear(linear)
    weight = linear.weight.detach().double()
    w_levels, x_levels = pyterrier_kdcl.fast._WEIGHT_LEVELS, pyterrier_kdcl.fast._ACTIVATION_LEVELS
    w_scale = weight.abs().amax(dim=1) / w_levels
    w_int = torch.round(weight / w_scale[:, None])
    x_scale = x.abs().amax(dim=1, keepdim=True).double()
    x_int = torch.round(x.double() / x_scale * x_levels)
    exact = (x_int @ w_int.t()) * w_scale * x_scale / x_levels
    assert ((layer(x).double() - exact).abs().max() / exact.abs().max()) < 1e-3


def test_a_row_scores_alike_alone_and_among_others():
    torch.manual_seed(2)
    layer = RowInt8Linear(torch.nn.Linear(64, 32))
    x = torch.randn(50, 64) * torch.rand(50, 1) * 10
    together = layer(x)
    alone = torch.cat([layer(x[i : i + 1]) for i in range(len(x))])
    assert (together - alone).abs().max() <= 1e-5 * together.abs().max()
    assert layer(x.reshape(5, 10, 64)).shape == (5, 10, 32)
    assert torch.equal(layer(torch.zeros(2, 64)), layer.bias.expand(2, -1))  # zero rows: the bias, no NaN


# -- the reranker ----------------------------------------------------------------------------------------------
def test_int8_rows_scores_do_not_depend_on_batch_mates(saved):  # noqa: F811
    inp = frame()
    reranker = kdcl.optimize_for_cpu(load(saved), "int8-rows")
    assert reranker.optimized == "int8-rows" and isinstance(reranker.ranker, FixedWidths)
    scores = reranker.score_pairs(inp["query"], inp["text"])
    assert scores.dtype == np.float32 and np.ptp(scores) > 0.1 and len(set(inp["text"].str.len())) > 5
    for how, again in rescored(reranker, inp).items():
        assert np.abs(again - scores).max() <= 1e-3, how


def test_int8_rows_runs_small_sub_batches_with_the_same_scores(saved):  # noqa: F811
    """Sub-batches of at most ``tokens`` tokens (for speed: small activations) change no score: every row of an
    int8-rows layer is computed from that row alone."""
    inp = frame()
    reranker = kdcl.optimize_for_cpu(load(saved, batch_size=16), "int8-rows")
    assert reranker.ranker.tokens == pyterrier_kdcl.fast._INT8_TOKENS
    reranker.ranker.tokens = None
    whole = reranker.score_pairs(inp["query"], inp["text"])
    calls = []
    reranker.ranker.ranker.register_forward_pre_hook(lambda _, args: calls.append(tuple(args[0].shape)))
    reranker.ranker.tokens = 64  # one sequence of 64 tokens or two of 32 a call
    split = reranker.score_pairs(inp["query"], inp["text"])
    assert all(rows * width <= 64 for rows, width in calls) and max(rows for rows, _ in calls) == 2
    assert len(calls) >= len(inp) // 2
    assert np.abs(split - whole).max() <= 1e-5 * np.abs(whole).max()


def test_fixed_widths_splits_a_width_into_sub_batches_of_whole_pairs():
    class Recorder(torch.nn.Module):
        pooling = "classifier"

        def forward(self, input_ids, attention_mask, token_type_ids=None):
            shapes.append(tuple(input_ids.shape))
            return attention_mask.sum(dim=1).float()

    shapes = []
    lengths = torch.tensor([5, 40, 3, 64, 33, 7, 1])
    mask = (torch.arange(64)[None, :] < lengths[:, None]).long()
    scores = FixedWidths(Recorder(), limit=64, tokens=64)(mask, mask)
    assert torch.equal(scores, lengths.float())  # every pair back in its place
    assert sorted(shapes) == [(1, 64), (1, 64), (1, 64), (2, 32), (2, 32)]  # 4 pairs of width 32, 3 of width 64
    shapes.clear()
    FixedWidths(Recorder(), limit=64, tokens=16)(mask, mask)  # a sub-batch holds at least one pair
    assert sorted(shapes) == [(1, 32)] * 4 + [(1, 64)] * 3


def test_int8_rows_ranks_as_float32(saved):  # noqa: F811
    inp = frame()
    a = load(saved).score_pairs(inp["query"], inp["text"])
    fast = kdcl.optimize_for_cpu(load(saved), "int8-rows")
    b = fast.score_pairs(inp["query"], inp["text"])
    assert np.ptp(a) > 0.1
    assert np.abs(a - b).max() < 0.15 * np.ptp(a)  # quantisation moves the tiny model's scores by about 0.01
    assert np.abs((a - a.mean()) - (b - b.mean())).max() < 0.1 * np.ptp(a)
    assert spearmanr(a, b).statistic > 0.97
    out = fast(inp)
    assert len(out) == len(inp) and out.groupby("qid")["score"].apply(lambda s: s.is_monotonic_decreasing).all()
    assert len(fast(inp.iloc[:0])) == 0


def test_int8_rows_quantises_every_layer_but_the_head_unless_told(saved):  # noqa: F811
    layers = dict(kdcl.optimize_for_cpu(load(saved), "int8-rows").ranker.named_modules())
    quantised = [n for n, m in layers.items() if isinstance(m, RowInt8Linear)]
    assert "ranker.model.bert.encoder.layer.0.output.dense" in quantised and len(quantised) >= 12
    assert type(layers["ranker.model.classifier"]) is torch.nn.Linear  # the one-logit head stays float32
    kept = dict(kdcl.optimize_for_cpu(load(saved), "int8-rows", keep_float=FFN_OUTPUT).ranker.named_modules())
    assert type(kept["ranker.model.bert.encoder.layer.0.output.dense"]) is torch.nn.Linear
    assert isinstance(kept["ranker.model.bert.encoder.layer.0.intermediate.dense"], RowInt8Linear)


# -- auto ------------------------------------------------------------------------------------------------------
def test_auto_picks_int8_rows_without_native_bfloat16_and_says_so(saved, native, caplog):  # noqa: F811
    native(False)
    with caplog.at_level(logging.INFO, logger="pyterrier_kdcl.fast"):
        reranker = kdcl.optimize_for_cpu(load(saved))
    assert reranker.optimized == "int8-rows" and "optimized=int8-rows" in repr(reranker)
    assert "chose 'int8-rows'" in caplog.text and "no native bfloat16" in caplog.text
    assert any(isinstance(m, RowInt8Linear) for m in reranker.ranker.modules())
    assert kdcl.optimize_for_cpu(reranker) is reranker  # auto again: kept as it is


@pytest.mark.filterwarnings("ignore:.*bfloat16")  # a CPU without native bfloat16 warns that it is slow there
def test_auto_picks_bf16_with_native_bfloat16(saved, native, caplog):  # noqa: F811
    native(True)
    with caplog.at_level(logging.INFO, logger="pyterrier_kdcl.fast"):
        reranker = kdcl.optimize_for_cpu(load(saved), "auto")
    assert reranker.optimized == "bf16" and "chose 'bf16'" in caplog.text
    with pytest.raises(ValueError, match="already optimised \\(bf16\\).*'int8-rows'"):
        kdcl.optimize_for_cpu(reranker, "int8-rows")


def test_auto_errors_say_what_to_do(saved, native, monkeypatch):  # noqa: F811
    native(True)
    with pytest.raises(ValueError, match="keep_float applies to the int8 methods.*chose 'bf16'"):
        kdcl.optimize_for_cpu(load(saved), keep_float=None)
    native(False)
    monkeypatch.setattr(pyterrier_kdcl.fast, "int8_supported", lambda: False)
    with pytest.raises(ValueError, match="int8-rows.*fbgemm.*method='bf16'"):
        kdcl.optimize_for_cpu(load(saved), "int8-rows")
    assert pyterrier_kdcl.fast.auto_method() == "bf16"  # no int8 kernels: bf16, slow but working
    with pytest.raises(ValueError, match="method must be one of .*'auto'.*'int8-rows'"):
        kdcl.optimize_for_cpu(load(saved), "int4")
