"""Reliability: bad result frames given to a CrossEncoder end in a clear message or in correct scores, never garbage.

Already covered elsewhere (see docs/reliability.md): missing docno/text columns and None text
(test_reranker.py), an empty frame (test_reranker.py, test_conformance.py), truncation keeping the query
(test_reranker.py).
"""

import numpy as np
import pandas as pd
import pyterrier as pt
import pytest

import pyterrier_kdcl as kdcl

FAMILIES = ["bert", "qwen2"]  # a WordPiece encoder and a byte-level BPE decoder


pytestmark = pytest.mark.usefixtures("one_thread")  # conftest.py


@pytest.fixture(scope="module")
def rerankers(tiny_model):
    return {f: kdcl.CrossEncoder(tiny_model(f), verbose=False, max_length=48, batch_size=8) for f in FAMILIES}


def frame(**columns):
    base = {"qid": ["q1", "q1", "q2"], "query": ["read a file", "read a file", "copy files"],
            "docno": ["d1", "d2", "d3"], "text": ["read from a file descriptor", "list directory contents",
                                                  "copy files and directories"]}
    return pd.DataFrame({**base, **columns})


def alone(ce, query, text):
    return ce.score_pairs([query], [text], progress=False)[0]


# -- missing columns -----------------------------------------------------------------------------------------
@pytest.mark.parametrize("column, hint", [("qid", "'qid' column"), ("query", "'query' column")])
def test_missing_column_names_the_column_and_the_fix(rerankers, column, hint):
    with pytest.raises(pt.validate.InputValidationError, match=hint):
        rerankers["bert"](frame().drop(columns=[column]))


def test_custom_text_field_missing_names_that_field(tiny_model):
    ce = kdcl.CrossEncoder(tiny_model("bert"), verbose=False, text_field="body")
    with pytest.raises(pt.validate.InputValidationError, match=r'get_text\(dataset, "body"\)'):
        ce(frame())


# -- bad query or text values --------------------------------------------------------------------------------
@pytest.mark.parametrize("value", [None, np.nan, 42, b"read a file", "", "   \t\n"])
def test_a_query_that_is_missing_empty_or_not_a_string_is_refused(rerankers, value):
    with pytest.raises(ValueError, match=r"1 rows have a 'query' that is empty or not a string.*dropna"):
        rerankers["bert"](frame(query=["read a file", value, "copy files"]))


@pytest.mark.parametrize("value", [np.nan, 3.5, b"bytes", ["a", "list"]])
def test_a_text_that_is_not_a_string_is_refused(rerankers, value):
    bad = frame()
    bad["text"] = pd.Series(["fine", value, "fine"], dtype=object)
    with pytest.raises(ValueError, match=r"1 rows have a 'text' that is not a string.*dropna\(subset=\['text'\]\)"):
        rerankers["bert"](bad)


@pytest.mark.parametrize("family", FAMILIES)
def test_an_empty_document_is_scored_not_refused(rerankers, family):
    """A document without text is a real document (a title-only page); it gets a finite score like any other."""
    ce = rerankers[family]
    out = ce(frame(text=["", "   ", "copy files"]))
    assert np.isfinite(out["score"]).all()
    assert out.set_index("docno")["score"]["d1"] == pytest.approx(alone(ce, "read a file", ""), abs=1e-5)


# -- duplicates, many candidates, identifiers ----------------------------------------------------------------
def test_duplicate_qid_docno_rows_are_kept_and_scored_identically(rerankers):
    out = rerankers["qwen2"](frame(docno=["d1", "d1", "d3"], text=["same text"] * 3))
    assert len(out) == 3
    d1 = out[out["docno"] == "d1"]
    # two rows of one batch may take different SIMD paths: equal within rounding, not bit for bit on every CPU
    assert np.ptp(d1["score"]) < 1e-6 and sorted(d1["rank"]) == [0, 1]


def test_a_query_with_thousands_of_candidates_keeps_every_row_and_its_own_score(rerankers):
    ce = rerankers["bert"]  # batch_size 8: 3000 pairs cross several tokenisation chunks of 512
    words = "read write open close list copy move print change install remove link".split()
    texts = [" ".join(words[(i * 7 + j) % 12] for j in range(1 + i % 9)) + f" {i}" for i in range(3000)]
    inp = pd.DataFrame({"qid": "q1", "query": "copy a file", "docno": [f"d{i}" for i in range(3000)], "text": texts})
    out = ce(inp)
    assert len(out) == 3000 and list(out["rank"]) == list(range(3000))
    assert out["score"].is_monotonic_decreasing
    scores = out.set_index("docno")["score"]
    for i in (0, 511, 512, 1999, 2999):
        assert scores[f"d{i}"] == pytest.approx(alone(ce, "copy a file", texts[i]), abs=1e-5)


def test_integer_qids_and_docnos_and_stale_scores(rerankers):
    ce = rerankers["bert"]
    inp = frame(qid=[7, 7, 8], docno=[101, 102, 103]).assign(score=[9.0, 8.0, 7.0], rank=[0, 1, 0])
    out = ce(inp)
    assert out["qid"].tolist().count(7) == 2 and set(out["docno"]) == {101, 102, 103}
    expected = [alone(ce, q, t) for q, t in zip(inp["query"], inp["text"])]
    assert out.set_index("docno").loc[[101, 102, 103], "score"].tolist() == pytest.approx(expected, abs=1e-5)
    for _, group in out.groupby("qid"):
        assert sorted(group["rank"]) == list(range(len(group)))


def test_mixed_integer_and_string_qids_do_not_crash_the_sort(rerankers):
    out = rerankers["bert"](frame(qid=[1, 1, "q2"]))
    assert len(out) == 3 and set(out["qid"]) == {1, "q2"}


def test_scores_follow_rows_whatever_the_index(rerankers):
    ce = rerankers["qwen2"]
    inp = frame().set_axis([5, 5, 0])  # duplicate, unsorted labels
    out = ce(inp)
    for _, row in out.iterrows():
        assert row["score"] == pytest.approx(alone(ce, row["query"], row["text"]), abs=1e-5)


# -- unicode and control characters --------------------------------------------------------------------------
ODD_TEXTS = {
    "cjk and emoji": "文件描述符 😀🚀 ファイル",
    "combining marks": "cafe\u0301 nai\u0308ve",
    "right-to-left override": "\u202eelif a daer\u202c",
    "zero-width": "re\u200bad\u200d fi\ufeffle",
    "nul and bell": "read\x00a\x07file",
    "terminal escapes": "\x1b[31mred\x1b[0m \r\n\t tabs",
    "only control characters": "\x00\x01\x02\x1f",
    "private use and noncharacters": "\ue000\uffff\U0010fffd",
}


@pytest.mark.parametrize("family", FAMILIES)
def test_unicode_and_control_characters_score_finitely(rerankers, family):
    ce = rerankers[family]
    inp = pd.DataFrame({"qid": "q1", "query": "read a file ☃", "docno": list(ODD_TEXTS),
                        "text": list(ODD_TEXTS.values())})
    out = ce(inp)
    assert len(out) == len(ODD_TEXTS) and np.isfinite(out["score"]).all()


@pytest.mark.parametrize("family", FAMILIES)
def test_lone_surrogates_are_replaced_not_a_tokenizer_crash(rerankers, family):
    """Text decoded with errors='surrogateescape' holds lone surrogates, which tokenizers refuse."""
    ce = rerankers[family]
    inp = frame()  # Arrow-backed strings cannot even hold them: such text arrives in object columns
    inp["text"] = pd.Series(["bad \udcff byte", "fine", "also \ud800 bad"], dtype=object)
    inp["query"] = pd.Series(["q \udc80", "q \udc80", "copy"], dtype=object)
    out = ce(inp)
    assert np.isfinite(out["score"]).all()
    assert out.set_index("docno")["score"]["d1"] == pytest.approx(alone(ce, "q ?", "bad ? byte"), abs=1e-5)


def test_looking_for_lone_surrogates_copies_no_text(rerankers):
    """Checking a chunk's documents by joining them held the chunk's text twice more (as a UCS-4 string up to four
    times its size, and as UTF-8 bytes): the peak of scoring 20,000 man-page pairs (issue 16)."""
    import tracemalloc

    texts = ["ünïcode text ☃ " * 6_000 + str(i) for i in range(50)]  # 50 documents of 90,000 characters
    tracemalloc.start()
    rerankers["bert"].encoder.encode(["copy"] * len(texts), texts)
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert peak < 1_000_000, f"encoding 4.5 million characters allocated {peak / 1e6:.1f} MB in Python"


# -- documents far longer than max_length --------------------------------------------------------------------
@pytest.mark.parametrize("family", FAMILIES)
def test_a_document_far_longer_than_max_length_is_truncated(rerankers, family):
    ce = rerankers[family]  # max_length 48 tokens; the document is about 200,000 characters
    long_text = "copy files and directories recursively " * 5000
    out = ce(frame(text=[long_text, "short", long_text[:400]], query=["copy a file"] * 3))
    scores = out.set_index("docno")["score"]
    assert np.isfinite(scores).all()
    assert scores["d1"] == pytest.approx(scores["d3"], abs=1e-5)  # only the first tokens count


def test_max_length_beyond_an_encoders_positions_is_refused_up_front(tiny_model):
    with pytest.raises(ValueError, match=r"max_length=1024 is longer than the 512 positions.*max_length=512"):
        kdcl.CrossEncoder(tiny_model("bert"), verbose=False, max_length=1024)
    kdcl.CrossEncoder(tiny_model("bert"), verbose=False, max_length=512)  # the limit itself is fine


def test_max_length_beyond_a_rotary_decoders_training_length_still_scores(tiny_model):
    ce = kdcl.CrossEncoder(tiny_model("qwen2"), verbose=False, max_length=1024)  # 512 positions in its config
    out = ce(frame(text=["copy files " * 600, "x", "y"]))
    assert np.isfinite(out["score"]).all()
