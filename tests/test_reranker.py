"""CrossEncoder on tiny random models of every family: scoring, invariances, input checks, save/load, LoRA."""

import numpy as np
import pandas as pd
import pyterrier as pt
import pytest
import torch
from tiny_models import DECODERS, ENCODERS, RECURRENT

import pyterrier_kdcl as kdcl

FAMILIES = ENCODERS + DECODERS + RECURRENT


def frame(n_queries=3, docs_per_query=4):
    texts = ["read from a file descriptor", "list directory contents and more", "copy files",
             "print a line of text to the standard output, then a newline", "change file mode bits"]
    rows = [
        {"qid": f"q{q}", "query": ["read file", "how do I list a directory", "copy"][q % 3],
         "docno": f"d{q}-{d}", "text": texts[(q + d) % len(texts)] * (1 + d % 3)}
        for q in range(n_queries) for d in range(docs_per_query)
    ]
    return pd.DataFrame(rows)


@pytest.fixture(scope="module", params=FAMILIES)
def family(request):
    return request.param


def test_transform_scores_and_ranks_every_family(tiny_model, family):
    ce = kdcl.CrossEncoder(tiny_model(family), verbose=False)
    inp = frame()
    out = ce(inp)
    assert len(out) == len(inp) and {"score", "rank"} <= set(out.columns)
    assert out["score"].notna().all() and out["score"].nunique() > 1
    for _, group in out.groupby("qid"):
        assert list(group["rank"]) == list(range(len(group)))
        assert group["score"].is_monotonic_decreasing
    expected_pooling = "classifier" if family in ENCODERS else "last"
    assert ce.ranker.pooling == expected_pooling


def test_score_does_not_depend_on_batch_or_order(tiny_model, family):
    ce = kdcl.CrossEncoder(tiny_model(family), verbose=False, batch_size=5)
    inp = frame()
    together = ce.score_pairs(inp["query"], inp["text"])
    alone = np.array([ce.score_pairs([q], [t])[0] for q, t in zip(inp["query"], inp["text"])])
    reversed_ = ce.score_pairs(inp["query"][::-1], inp["text"][::-1])[::-1]
    np.testing.assert_allclose(together, alone, atol=1e-5)
    np.testing.assert_allclose(together, reversed_, atol=1e-5)


def test_differentiable_scores_equal_inference_scores(tiny_model, family):
    """Training and inference share one scoring path (Tevatron's train/serve mismatch bug)."""
    ce = kdcl.CrossEncoder(tiny_model(family), verbose=False)
    inp = frame(1)
    ce.ranker.eval()
    with_grad = ce.scores(list(inp["query"]), list(inp["text"]))
    assert with_grad.requires_grad
    np.testing.assert_allclose(with_grad.detach().numpy(), ce.score_pairs(inp["query"], inp["text"]), atol=1e-5)


def test_empty_frame_gives_output_columns_without_scoring(tiny_model):
    ce = kdcl.CrossEncoder(tiny_model("bert"), verbose=False)
    out = ce(frame().iloc[:0])
    assert len(out) == 0 and {"qid", "docno", "score", "rank"} <= set(out.columns)


def test_missing_text_column_says_how_to_add_it(tiny_model):
    ce = kdcl.CrossEncoder(tiny_model("bert"), verbose=False)
    with pytest.raises(pt.validate.InputValidationError, match=r'pt\.text\.get_text\(dataset, "text"\)'):
        ce(frame().drop(columns=["text"]))
    with pytest.raises(pt.validate.InputValidationError, match="first stage"):
        ce(frame().drop(columns=["docno"]))


def test_non_string_text_is_rejected_with_a_fix(tiny_model):
    ce = kdcl.CrossEncoder(tiny_model("bert"), verbose=False)
    bad = frame()
    bad.loc[2, "text"] = None
    with pytest.raises(ValueError, match="dropna"):
        ce(bad)


@pytest.mark.parametrize("fam", ["bert", "qwen2"])
def test_truncation_cuts_the_document_not_a_query_within_half_the_budget(tiny_model, fam):
    """Longer queries: test_review_fixes_core.py (tokenizers' longest_first; the template stays whole)."""
    ce = kdcl.CrossEncoder(tiny_model(fam), verbose=False, max_length=64)
    query = "how do i list a directory"
    assert len(ce.tokenizer(query, add_special_tokens=False)["input_ids"]) <= ce.encoder.budget // 2
    pair = ce.encoder.encode([query], ["copy files and directories " * 100])[0]
    assert len(pair.input_ids) == 64
    decoded = ce.tokenizer.decode(pair.input_ids)
    assert query in decoded.lower()
    if fam == "qwen2":
        assert pair.input_ids[-1] == ce.tokenizer.eos_token_id  # EOS survives truncation


@pytest.mark.parametrize("fam", ["bert", "qwen2"])
def test_long_documents_are_tokenized_from_a_prefix_with_the_same_ids(tiny_model, fam, monkeypatch):
    ce = kdcl.CrossEncoder(tiny_model(fam), verbose=False, max_length=32)
    texts = ["copy files, and directories! " * 400,  # cut to a prefix: ~11 KB → 384 characters
             "x" * 1000 + " tail",                   # no space inside the prefix: encoded again whole
             "y" * 300]                              # shorter than 12 × max_length: untouched
    queries = ["copy", "x", "y"]
    whole = ce.encoder._encode(queries, texts)
    seen = []
    tokenize = ce.encoder._encode
    monkeypatch.setattr(ce.encoder, "_encode", lambda q, t: seen.append([len(x) for x in t]) or tokenize(q, t))
    assert [p.input_ids for p in ce.encoder.encode(queries, texts)] == [p.input_ids for p in whole]
    assert seen[0][0] < 12 * 32 < len(texts[0])
    assert seen[1] == [len(texts[1])]


def test_a_prefix_too_short_to_decide_grows_instead_of_tokenizing_the_whole_document(tiny_model, monkeypatch):
    """Like systemd.directives(7): one word a line, the first space after 4 characters, 100 KB of text."""
    ce = kdcl.CrossEncoder(tiny_model("bert"), verbose=False, max_length=32)
    text = "UNIT DIRECTIVES\n" + ("directive\n" * 100 + "see also\n") * 100
    whole = ce.encoder._encode(["copy"], [text])
    seen = []
    tokenize = ce.encoder._encode
    monkeypatch.setattr(ce.encoder, "_encode", lambda q, t: seen.append(len(t[0])) or tokenize(q, t))
    assert ce.encoder.encode(["copy"], [text])[0].input_ids == whole[0].input_ids
    assert seen[0] == len("UNIT") and len(seen) == 2 and seen[1] <= 16 * 12 * 32 < len(text)


def test_other_pairs_in_a_batch_do_not_change_a_long_pairs_score(tiny_model):
    ce = kdcl.CrossEncoder(tiny_model("llama"), verbose=False, max_length=24)
    long_text = "copy files and directories " * 50
    alone = ce.score_pairs(["copy"], [long_text])[0]
    mixed = ce.score_pairs(["copy", "x"], [long_text, "y"])[0]
    assert alone == pytest.approx(mixed, abs=1e-5)


def test_save_and_load_give_identical_scores(tiny_model, family, tmp_path):
    ce = kdcl.CrossEncoder(tiny_model(family), verbose=False, max_length=64)
    inp = frame()
    ce.save(tmp_path / "saved")
    loaded = kdcl.CrossEncoder.load(tmp_path / "saved", verbose=False)
    assert loaded.max_length == 64 and loaded.template == ce.template
    expected = ce.score_pairs(inp["query"], inp["text"])
    np.testing.assert_array_equal(loaded.score_pairs(inp["query"], inp["text"]), expected)


@pytest.mark.parametrize("fam", ["bert", "qwen2", "mamba"])
def test_lora_adapter_and_head_round_trip_and_merge(tiny_model, fam, tmp_path):
    ce = kdcl.CrossEncoder(tiny_model(fam), verbose=False, lora={"r": 4, "lora_alpha": 8})
    trainable = [n for n, p in ce.ranker.named_parameters() if p.requires_grad]
    assert any("lora_" in n for n in trainable)
    assert any(("score" in n or "classifier" in n) for n in trainable), trainable
    assert not any("embed" in n and "lora" not in n for n in trainable)
    inp = frame()
    with torch.no_grad():  # LoRA's B starts at zero: move it so the adapter changes scores
        for name, param in ce.ranker.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.5)
    adapter_only = ce.score_pairs(inp["query"], inp["text"])
    with torch.no_grad():  # and move the trained head, so that a head lost on the way fails the test
        head = [p for n, p in ce.ranker.named_parameters() if p.requires_grad and "lora_" not in n]
        assert head, "no trainable head"
        for param in head:
            param.normal_(0, 0.5)
    before = ce.score_pairs(inp["query"], inp["text"])
    assert not np.allclose(before, adapter_only, atol=1e-3)  # the head alone changes every comparison below
    ce.save(tmp_path / "lora")
    assert (tmp_path / "lora" / "adapter" / "adapter_model.safetensors").exists()
    loaded = kdcl.CrossEncoder.load(tmp_path / "lora", verbose=False)
    np.testing.assert_array_equal(loaded.score_pairs(inp["query"], inp["text"]), before)
    merged = kdcl.CrossEncoder.load(tmp_path / "lora", verbose=False, merge_lora=True)
    np.testing.assert_allclose(merged.score_pairs(inp["query"], inp["text"]), before, atol=1e-4)
    base = kdcl.CrossEncoder(tiny_model(fam), verbose=False)
    assert not np.allclose(base.score_pairs(inp["query"], inp["text"]), before, atol=1e-4)


def test_the_fingerprint_ignores_batch_size_and_verbosity_and_tells_a_merged_adapter_apart(tiny_model, tmp_path):
    """fingerprint() names what a reranker scores: batch size and verbosity are no part of it (issue 23 item 12:
    a new batch size rescored every teacher pair), weights and scoring settings are. A merged adapter is its own
    identity (other weights; scores within float tolerance only), shared by every merged copy."""
    model = tiny_model("bert")
    plain = kdcl.CrossEncoder(model, verbose=False, max_length=32)
    assert kdcl.CrossEncoder(model, verbose=True, batch_size=3, max_length=32).fingerprint() == plain.fingerprint()
    assert kdcl.CrossEncoder(model, verbose=False, max_length=24).fingerprint() != plain.fingerprint()
    from pyterrier_kdcl.reranker import SCORE_NEUTRAL_SETTINGS

    assert SCORE_NEUTRAL_SETTINGS == {"batch_size", "verbose"}  # a new exception is a decision: name it here

    lora = kdcl.CrossEncoder(model, verbose=False, max_length=32, lora={"r": 4, "lora_alpha": 8})
    with torch.no_grad():
        for name, param in lora.ranker.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.5)
    lora.save(tmp_path / "lora")
    loaded = kdcl.CrossEncoder.load(tmp_path / "lora", verbose=False, batch_size=5)
    assert loaded.fingerprint() == lora.fingerprint()
    merged = kdcl.CrossEncoder.load(tmp_path / "lora", verbose=False, merge_lora=True)
    assert merged.fingerprint() != lora.fingerprint()
    assert loaded.merge_lora().fingerprint() == merged.fingerprint()
    merged.save(tmp_path / "merged")
    assert kdcl.CrossEncoder.load(tmp_path / "merged", verbose=False).fingerprint() == merged.fingerprint()


def test_existing_decoder_reranker_checkpoint_keeps_its_head(tiny_model):
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    path = tiny_model("qwen2", head="seqcls")
    reference = AutoModelForSequenceClassification.from_pretrained(path).eval()
    tokenizer = AutoTokenizer.from_pretrained(path)
    ce = kdcl.CrossEncoder(path, verbose=False, template="{query} {text}")
    ids = ce.encoder.encode(["read file"], ["read from a file descriptor"])[0].input_ids
    with torch.no_grad():
        expected = reference(input_ids=torch.tensor([ids])).logits[0, 0].item()
    assert tokenizer.pad_token_id is None or ids[-1] != tokenizer.pad_token_id
    assert ce.score_pairs(["read file"], ["read from a file descriptor"])[0] == pytest.approx(expected, abs=1e-5)


def test_a_decoder_reranker_checkpoint_saved_and_loaded_keeps_its_bias_free_head(tiny_model, tmp_path):
    """Qwen2ForSequenceClassification's score layer has no bias; the saved head must load back as it is (found by
    benchmarks/gpu_fsdp.py: every decoder started from such a checkpoint failed to load after saving)."""
    ce = kdcl.CrossEncoder(tiny_model("qwen2", head="seqcls"), verbose=False)
    assert ce.ranker.score.bias is None
    ce.save(tmp_path / "saved")
    loaded = kdcl.CrossEncoder.load(tmp_path / "saved", verbose=False)
    inp = frame()
    pairs = inp["query"], inp["text"]
    np.testing.assert_array_equal(loaded.score_pairs(*pairs), ce.score_pairs(*pairs))


def test_sentence_transformers_cross_encoder_checkpoint_gives_its_logits(tiny_model):
    from sentence_transformers import CrossEncoder as STCrossEncoder

    st = STCrossEncoder(str(tiny_model("bert")), num_labels=1, device="cpu")
    inp = frame()
    pairs = list(zip(inp["query"], inp["text"]))
    expected = st.predict(pairs, activation_fn=torch.nn.Identity(), batch_size=3)
    ce = kdcl.CrossEncoder(tiny_model("bert"), verbose=False)
    np.testing.assert_allclose(ce.score_pairs(inp["query"], inp["text"]), expected, atol=1e-5)


def test_unknown_model_names_say_what_exists():
    with pytest.raises(OSError, match="minilm-l6"):
        kdcl.CrossEncoder("no-such-model-anywhere", verbose=False)


def test_repr_names_the_model(tiny_model):
    ce = kdcl.CrossEncoder(tiny_model("bert"), verbose=False)
    assert repr(ce).startswith("CrossEncoder(") and str(tiny_model("bert")) in repr(ce)


def test_repr_says_what_the_reranker_is(tiny_model, tmp_path):
    """Every reranker printed as ``CrossEncoder('minilm-l6')``: untrained, trained, loaded, LoRA, merged or
    optimised, and that is all progress bars and pt.Experiment show (issue 23, item 20)."""
    from training_data import training_frames

    source = str(tiny_model("bert"))
    plain = kdcl.CrossEncoder(source, verbose=False)
    assert repr(plain) == f"CrossEncoder({source!r})"
    lora = kdcl.CrossEncoder(source, lora=True, verbose=False, max_length=32)
    assert repr(lora) == f"CrossEncoder({source!r}, lora=r8)"
    kdcl.ContrastiveTrainer(lora, group_size=4, batch_size=4, verbose=False).fit(*training_frames(4))
    assert repr(lora) == f"CrossEncoder({source!r}, lora=r8, trained)"
    lora.save(tmp_path / "lora")
    assert repr(kdcl.CrossEncoder.load(tmp_path / "lora", verbose=False)) == \
        f"CrossEncoder.load({str(tmp_path / 'lora')!r}, lora=r8, trained)"
    assert repr(kdcl.CrossEncoder.load(tmp_path / "lora", merge_lora=True, verbose=False)) == \
        f"CrossEncoder.load({str(tmp_path / 'lora')!r}, merged, trained)"
    assert repr(lora.merge_lora()) == f"CrossEncoder({source!r}, merged, trained)"
    plain.save(tmp_path / "plain")
    fast = kdcl.optimize_for_cpu(kdcl.CrossEncoder.load(tmp_path / "plain", verbose=False), "bf16")
    assert repr(fast) == f"CrossEncoder.load({str(tmp_path / 'plain')!r}, optimized=bf16)"
    assert repr(kdcl.CrossEncoder(source, lora={"r": 4}, verbose=False)) == f"CrossEncoder({source!r}, lora=r4)"


def test_fresh_heads_start_identical_whatever_the_global_seed(tiny_model):
    torch.manual_seed(1)
    a = kdcl.CrossEncoder(tiny_model("qwen2"), verbose=False)
    torch.manual_seed(2)
    state = torch.get_rng_state()
    b = kdcl.CrossEncoder(tiny_model("qwen2"), verbose=False)
    assert torch.equal(a.ranker.score.weight, b.ranker.score.weight)
    assert torch.equal(torch.get_rng_state(), state)  # the caller's random stream is left alone


def test_mean_pooling_scores_the_mean_of_the_real_tokens_with_their_token_types(tiny_model):
    from transformers import AutoModel

    ce = kdcl.CrossEncoder(tiny_model("bert"), verbose=False, pooling="mean")
    assert ce.pooling == "mean" and ce.template is None
    pair = ce.encoder.encode(["read file"], ["read from a file descriptor"])[0]
    assert 1 in pair.token_type_ids  # the document's segment: its type must reach the model
    backbone = AutoModel.from_pretrained(tiny_model("bert")).eval()
    with torch.no_grad():
        hidden = backbone(input_ids=torch.tensor([pair.input_ids]),
                          token_type_ids=torch.tensor([pair.token_type_ids])).last_hidden_state[0]
        expected = ce.ranker.score(hidden.mean(dim=0)).item()
    padded = ce.score_pairs(["read file", "x"], ["read from a file descriptor", "y " * 40])[0]  # longer batch mate
    assert padded == pytest.approx(expected, abs=1e-5)
    classifier = kdcl.CrossEncoder(tiny_model("bert"), verbose=False)
    assert padded != pytest.approx(classifier.score_pairs(["read file"], ["read from a file descriptor"])[0], abs=1e-3)


def test_mean_pooling_round_trips_with_and_without_lora(tiny_model, tmp_path):
    inp = frame()
    for lora in (None, {"r": 4, "lora_alpha": 8}):
        ce = kdcl.CrossEncoder(tiny_model("bert"), verbose=False, pooling="mean", lora=lora)
        with torch.no_grad():  # a trained head and adapter: moved from their starting values
            for name, param in ce.ranker.named_parameters():
                if "score" in name or "lora_B" in name:
                    param.normal_(0, 0.5)
        before = ce.score_pairs(inp["query"], inp["text"])
        path = tmp_path / f"mean-{bool(lora)}"
        ce.save(path)
        loaded = kdcl.CrossEncoder.load(path, verbose=False)
        assert loaded.pooling == "mean" and type(loaded.ranker) is type(ce.ranker)
        np.testing.assert_array_equal(loaded.score_pairs(inp["query"], inp["text"]), before)
        if lora:
            merged = kdcl.CrossEncoder.load(path, verbose=False, merge_lora=True)
            assert merged.pooling == "mean"
            np.testing.assert_allclose(merged.score_pairs(inp["query"], inp["text"]), before, atol=1e-4)


def test_mean_pooling_keeps_the_encoders_position_limit(tiny_model):
    with pytest.raises(ValueError, match="max_length=600 is longer than the 512 positions"):
        kdcl.CrossEncoder(tiny_model("bert"), verbose=False, pooling="mean", max_length=600)


def test_unknown_pooling_names_the_choices(tiny_model):
    with pytest.raises(ValueError, match="'classifier', 'last', 'mean'"):
        kdcl.CrossEncoder(tiny_model("bert"), verbose=False, pooling="max")
