"""Issue 12, the inference core: identical starts, what users can vary about padding, truncation that keeps the
template whole, a LoRA round trip that keeps its head, quiet loading, and best weights restored."""

import json
import logging
import random
import shutil
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from tiny_models import write_tiny_model
from training_data import WORDS, training_frames

import pyterrier_kdcl as kdcl

pytestmark = pytest.mark.usefixtures("one_thread")  # conftest.py


# -- identical starts ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("family, head", [("bert", "none"), ("bert", "base"), ("qwen2", "base"), ("mamba", "base")])
def test_rerankers_built_alike_hold_identical_weights_whatever_ran_between(tiny_model, family, head):
    path = tiny_model(family, head=head)
    torch.manual_seed(1)
    first = kdcl.CrossEncoder(path, verbose=False, lora=True)
    torch.rand(1000), random.random(), np.random.rand(3)  # anything at all may run in between
    kdcl.CrossEncoder(path, verbose=False, lora={"r": 2})
    state = torch.get_rng_state()
    second = kdcl.CrossEncoder(path, verbose=False, lora=True)
    a, b = first.ranker.state_dict(), second.ranker.state_dict()
    assert a.keys() == b.keys()
    assert [k for k in a if not torch.equal(a[k], b[k])] == []
    assert any("lora_A" in k and a[k].abs().sum() > 0 for k in a)  # the adapter's random half is compared too
    assert torch.equal(torch.get_rng_state(), state)  # the caller's random stream is left alone


# -- padding: what users can vary ------------------------------------------------------------------------------
PAIRS = (["copy", "how do I list a directory", "read a file", "print text"],
         ["copy files and directories " * 30, "list directory contents", "read from a file descriptor", "x"])


def with_tokenizer_config(tiny_model, family, dest, **changes):
    path = Path(shutil.copytree(tiny_model(family), dest))
    config = json.loads((path / "tokenizer_config.json").read_text())
    (path / "tokenizer_config.json").write_text(json.dumps({**config, **changes}))
    return path


@pytest.mark.parametrize("family", ["bert", "qwen2", "llama", "mamba"])
def test_a_left_padding_tokenizer_scores_exactly_like_a_right_padding_one(tiny_model, family, tmp_path):
    """Decoder tokenizers often ship with padding_side="left" (some with truncation_side="left"). Left padding
    shifts an encoder's absolute positions and, by rounding, a rotary decoder's scores: pairs are cut and padded
    on the right by hand, whatever the tokenizer says, so the scores are identical."""
    left_dir = with_tokenizer_config(tiny_model, family, tmp_path / "left", padding_side="left",
                                     truncation_side="left")
    right = kdcl.CrossEncoder(tiny_model(family), verbose=False, max_length=64, batch_size=4)
    left = kdcl.CrossEncoder(left_dir, verbose=False, max_length=64, batch_size=4)
    queries, texts = PAIRS
    assert [p.input_ids for p in left.encoder.encode(queries, texts)] == \
        [p.input_ids for p in right.encoder.encode(queries, texts)]
    mask = left.encoder.collate(left.encoder.encode(queries, texts))["attention_mask"]
    assert (mask[:, 0] == 1).all() and (mask.diff(dim=1) <= 0).all()  # padded on the right
    expected = right.score_pairs(queries, texts)
    np.testing.assert_array_equal(left.score_pairs(queries, texts), expected)  # same ids, same weights, same code
    right.tokenizer.padding_side = right.tokenizer.truncation_side = "left"  # set by hand after loading
    np.testing.assert_array_equal(right.score_pairs(queries, texts), expected)
    alone = [right.score_pairs([q], [t])[0] for q, t in zip(queries, texts)]  # no padding at all
    np.testing.assert_allclose(expected, alone, rtol=1e-5, atol=1e-5)


# -- truncation ------------------------------------------------------------------------------------------------
def test_split_budget_is_the_tokenizers_longest_first_rule(tiny_model):
    from tokenizers import Tokenizer
    from transformers import AutoTokenizer

    from pyterrier_kdcl.inputs import split_budget

    backend = Tokenizer.from_str(AutoTokenizer.from_pretrained(tiny_model("bert")).backend_tokenizer.to_str())
    backend.no_padding()
    for budget in (13, 14, 29):
        backend.enable_truncation(max_length=budget + 3, strategy="longest_first")
        for n_query in range(0, 2 * budget):
            for n_document in range(0, 2 * budget, 3):
                types = backend.encode(" ".join(["read"] * n_query), " ".join(["copy"] * n_document)).type_ids
                expected = (types.count(0) - 2, types.count(1) - 1)  # [CLS] query [SEP] / document [SEP]
                assert split_budget(n_query, n_document, budget) == expected, (n_query, n_document, budget)
    assert split_budget(10, 500, 100) == (10, 90) and split_budget(300, 500, 100) == (50, 50)
    assert split_budget(300, 20, 100) == (80, 20)


LONG_QUERY = " ".join(f"{w} the file" for w in WORDS * 3)  # about 110 tokens
LONG_TEXT = "copy files and directories " * 100


@pytest.mark.parametrize("query, text", [("how do i list a directory", LONG_TEXT), (LONG_QUERY, LONG_TEXT),
                                         (LONG_QUERY, "copy files"), (LONG_QUERY, "x" * 2000 + " tail")])
def test_encoder_pairs_are_cut_like_the_tokenizers_longest_first(tiny_model, query, text):
    ce = kdcl.CrossEncoder(tiny_model("bert"), verbose=False, max_length=32)
    expected = ce.tokenizer(query, text, truncation="longest_first", max_length=32)["input_ids"]
    assert ce.encoder.encode([query], [text])[0].input_ids == expected


@pytest.mark.parametrize("family", ["qwen2", "mamba"])
def test_a_long_query_keeps_the_template_whole_and_half_the_budget(tiny_model, family):
    ce = kdcl.CrossEncoder(tiny_model(family), verbose=False, max_length=48)
    tok, budget = ce.tokenizer, ce.encoder.budget
    template_only = len(tok("query:  document: ", add_special_tokens=True)["input_ids"]) + 1  # and EOS
    assert budget == 48 - template_only
    for text in (LONG_TEXT, "copy files"):
        ids = ce.encoder.encode([LONG_QUERY], [text])[0].input_ids
        assert len(ids) == 48 and ids[-1] == tok.eos_token_id
        head, document = tok.decode(ids[:-1]).split(" document: ")  # the marker is there, once
        assert head.startswith("query: ") and LONG_QUERY.startswith(head[len("query: "):])
        head_ids = tok(head + " document: ", add_special_tokens=True)["input_ids"]
        assert ids[: len(head_ids)] == head_ids
        kept = ids[len(head_ids):-1]
        assert kept == tok(text, add_special_tokens=False)["input_ids"][: len(kept)]  # the document's first tokens
        if text == LONG_TEXT:
            assert len(kept) >= budget - budget // 2 and len(head_ids) - template_only + 1 >= budget // 2 - 1
        else:
            assert document == text  # a short document is kept whole; the query takes the rest


def test_a_short_query_and_template_stay_as_one_string_tokenizes_them(tiny_model):
    ce = kdcl.CrossEncoder(tiny_model("qwen2"), verbose=False, max_length=48)
    tok = ce.tokenizer
    ids = ce.encoder.encode(["read a file"], [LONG_TEXT])[0].input_ids
    head = tok("query: read a file document: ", add_special_tokens=True)["input_ids"]
    d_ids = tok(LONG_TEXT, add_special_tokens=False)["input_ids"]
    assert ids == head + d_ids[: 48 - len(head) - 1] + [tok.eos_token_id]


@pytest.mark.parametrize("family", ["bert", "qwen2"])
def test_the_prefix_of_a_long_document_gives_the_ids_of_the_whole_text_for_any_query(tiny_model, family):
    ce = kdcl.CrossEncoder(tiny_model(family), verbose=False, max_length=32)
    draw = random.Random(0)
    queries, texts = [], []
    for _ in range(60):
        queries.append(" ".join(draw.choices(WORDS, k=draw.choice([1, 3, 14, 40, 80]))))
        words = draw.choices(WORDS + ["x" * 500, "yy" * 90], k=draw.choice([2, 50, 200]))
        texts.append(" ".join(words))
    assert [p.input_ids for p in ce.encoder.encode(queries, texts)] == \
        [p.input_ids for p in ce.encoder._encode(queries, texts)]


def test_max_length_too_short_for_the_template_says_so(tiny_model):
    with pytest.raises(ValueError, match=r"leaves .* tokens for query and document"):
        kdcl.CrossEncoder(tiny_model("qwen2"), verbose=False, max_length=16,
                          template="Judge whether the document answers the query. query: {query} document: {text}")


# -- quiet loading ---------------------------------------------------------------------------------------------
@pytest.fixture
def transformers_log():
    """What transformers logs, whichever stream its own handler writes to (it keeps the stderr of its first use)."""
    records = []
    handler = logging.Handler()
    handler.emit = records.append
    logger = logging.getLogger("transformers")
    logger.addHandler(handler)
    yield records
    logger.removeHandler(handler)


def printed(capfd, caplog, transformers_log):
    out, err = capfd.readouterr()
    return out + err + "".join(r.getMessage() for r in transformers_log), [r.getMessage() for r in caplog.records]


def test_loading_is_quiet_and_a_new_head_is_announced_once(tmp_path, capfd, caplog, transformers_log):
    from transformers.utils import logging as hf_logging

    bare = write_tiny_model("bert", tmp_path / "bare-bert", head="none")
    capfd.readouterr()
    verbosity, bars = hf_logging.get_verbosity(), hf_logging.is_progress_bar_enabled()
    with warnings.catch_warnings(record=True) as seen, caplog.at_level(logging.INFO, logger="pyterrier_kdcl"):
        warnings.simplefilter("always")
        student = kdcl.CrossEncoder(bare, verbose=False, lora=True)
        kdcl.CrossEncoder(bare, verbose=False)
        student.save(tmp_path / "student")
    output, notes = printed(capfd, caplog, transformers_log)
    assert output == "" and [str(w.message) for w in seen] == []
    assert len(notes) == 1 and f"{bare} has no reranking head" in notes[0] and "classifier.weight" in notes[0]
    assert (hf_logging.get_verbosity(), hf_logging.is_progress_bar_enabled()) == (verbosity, bars)  # restored

    caplog.clear()
    with warnings.catch_warnings(record=True) as seen, caplog.at_level(logging.INFO, logger="pyterrier_kdcl"):
        warnings.simplefilter("always")
        kdcl.CrossEncoder.load(tmp_path / "student", verbose=False)  # a trained student's head is not new
        kdcl.CrossEncoder.load(tmp_path / "student", verbose=False, merge_lora=True)
    assert printed(capfd, caplog, transformers_log) == ("", []) and [str(w.message) for w in seen] == []


def test_a_decoder_without_a_head_is_announced_and_a_saved_one_is_not(tmp_path, capfd, caplog, transformers_log):
    bare = write_tiny_model("qwen2", tmp_path / "bare-qwen2")
    capfd.readouterr()
    with caplog.at_level(logging.INFO, logger="pyterrier_kdcl"):
        kdcl.CrossEncoder(bare, verbose=False).save(tmp_path / "saved")
        kdcl.CrossEncoder.load(tmp_path / "saved", verbose=False)
    output, notes = printed(capfd, caplog, transformers_log)
    assert output == "" and len(notes) == 1 and "score.weight, score.bias" in notes[0]


def test_transformers_load_report_on_request(tmp_path, monkeypatch, transformers_log):
    from transformers.utils import logging as hf_logging

    bare = write_tiny_model("bert", tmp_path / "bare-bert", head="none")
    monkeypatch.setenv("KDCL_VERBOSE", "1")
    before = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()  # even where something turned transformers down
    try:
        kdcl.CrossEncoder(bare, verbose=False)
        assert hf_logging.get_verbosity() == logging.ERROR  # and back as it was
    finally:
        hf_logging.set_verbosity(before)
    report = "".join(r.getMessage() for r in transformers_log)
    assert "LOAD REPORT" in report and "classifier.weight" in report and "MISSING" in report


# -- best weights ----------------------------------------------------------------------------------------------
def misleading_validation(n_queries=8):
    """Validation where the relevant document is a how-to page among 'the answer to …' distractors: a student that
    learns the training positives ('the answer to …') ranks it lower and lower."""
    res, _ = training_frames(n_queries)
    rows = res.assign(text=[f"the answer to {WORDS[(i * 5 + 3) % len(WORDS)]}" for i in range(len(res))])
    relevant = rows["docno"].str.endswith("-0")
    rows.loc[relevant, "text"] = "a page on how to " + rows.loc[relevant, "query"].str.split().str[0]
    qrels = rows.loc[relevant, ["qid", "docno"]].assign(label=1)
    return rows, qrels


def test_best_weights_are_restored_when_the_last_validation_is_worse(tiny_model):
    from pyterrier_kdcl.training.dev_metrics import Validator

    res, qrels = training_frames(8)
    va_res, va_qrels = misleading_validation()
    ce = kdcl.CrossEncoder(tiny_model("bert"), verbose=False, max_length=32)
    trainer = kdcl.ContrastiveTrainer(ce, group_size=4, epochs=3, batch_size=4, verbose=False, validate_every=1,
                                      learning_rate=5e-3, metric="RR@10")
    log = trainer.fit(res, qrels, va_res, va_qrels)
    metrics = log["metric"].dropna()
    assert metrics.iloc[-1] < metrics.max() - 0.1, list(metrics)  # the premise: training ends worse than its best
    assert Validator(ce, va_res, va_qrels, "RR@10").evaluate() == pytest.approx(metrics.max())
