"""A saved reranker outside pyterrier_kdcl, and other libraries' checkpoints inside it (issue 26 item 3).

A saved encoder is an ordinary sentence-transformers ``CrossEncoder`` and transformers
``AutoModelForSequenceClassification`` directory giving the same raw scores (sentence-transformers needs
``activation_fn=torch.nn.Identity()``: its default sigmoid is why its numbers differ); a saved decoder is a transformers
``AutoModel`` trunk plus ``score_head.safetensors``; a checkpoint saved by sentence-transformers loads with its scores.
Scores come from different code paths here, so they are compared within 1e-5, never exactly.
"""

import numpy as np
import pytest
import torch

import pyterrier_kdcl as kdcl

pytestmark = pytest.mark.usefixtures("one_thread")

QUERIES = ["read file", "how do I list a directory", "copy"]
TEXTS = ["read from a file descriptor", "list directory contents and more, with options for hidden files",
         "copy files"]


def trained_looking(reranker):
    """Moves every trainable head weight, so that a head lost or re-initialised on the way changes the scores."""
    with torch.no_grad():
        for name, param in reranker.ranker.named_parameters():
            if param.requires_grad and any(part in name for part in ("classifier", "score", "pooler")):
                param.normal_(0, 0.5, generator=torch.Generator().manual_seed(len(name)))
    return reranker


@pytest.fixture(scope="module")
def saved_encoder(tiny_model, tmp_path_factory):
    ce = trained_looking(kdcl.CrossEncoder(tiny_model("bert"), verbose=False, max_length=64))
    path = tmp_path_factory.mktemp("encoder") / "saved"
    ce.save(path)
    return path, ce.score_pairs(QUERIES, TEXTS)


def test_a_saved_encoder_loads_in_sentence_transformers_with_the_same_raw_scores(saved_encoder):
    from sentence_transformers import CrossEncoder as STCrossEncoder

    path, expected = saved_encoder
    raw = STCrossEncoder(str(path), device="cpu", activation_fn=torch.nn.Identity(), max_length=64)
    np.testing.assert_allclose(raw.predict(list(zip(QUERIES, TEXTS)), batch_size=2), expected, atol=1e-5)
    default = STCrossEncoder(str(path), device="cpu", max_length=64)  # a sigmoid of the same logit
    np.testing.assert_allclose(default.predict(list(zip(QUERIES, TEXTS))), 1 / (1 + np.exp(-expected)), atol=1e-6)
    assert np.abs(expected).max() > 0.1  # otherwise a sigmoid and an identity could hardly be told apart


def test_a_saved_encoder_loads_in_transformers_with_the_same_scores(saved_encoder):
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    path, expected = saved_encoder
    tokenizer = AutoTokenizer.from_pretrained(path)
    model = AutoModelForSequenceClassification.from_pretrained(path).eval()
    batch = tokenizer(QUERIES, TEXTS, padding=True, truncation=True, max_length=64, return_tensors="pt")
    with torch.no_grad():
        logits = model(**batch).logits[:, 0].numpy()
    np.testing.assert_allclose(logits, expected, atol=1e-5)


def test_a_merged_lora_encoder_saved_again_is_a_plain_checkpoint(tiny_model, tmp_path):
    from sentence_transformers import CrossEncoder as STCrossEncoder

    lora = trained_looking(kdcl.CrossEncoder(tiny_model("bert"), verbose=False, lora={"r": 4, "lora_alpha": 8}))
    with torch.no_grad():
        for name, param in lora.ranker.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.5)
    expected = lora.score_pairs(QUERIES, TEXTS)
    lora.save(tmp_path / "lora")
    kdcl.CrossEncoder.load(tmp_path / "lora", verbose=False, merge_lora=True).save(tmp_path / "merged")
    st = STCrossEncoder(str(tmp_path / "merged"), device="cpu", activation_fn=torch.nn.Identity())
    np.testing.assert_allclose(st.predict(list(zip(QUERIES, TEXTS))), expected, atol=1e-4)  # merging rounds


@pytest.mark.parametrize("family", ["qwen2", "gemma3"])
def test_a_saved_decoder_scores_alike_in_plain_transformers(tiny_model, family, tmp_path):
    """The recipe of docs/guide.md's Interoperability section: the trunk through AutoModel, the RankLLaMA input
    (template, then EOS), the last token's hidden state through the ``Linear(hidden, 1)`` of score_head.safetensors."""
    from safetensors.torch import load_file
    from transformers import AutoModel, AutoTokenizer

    ce = trained_looking(kdcl.CrossEncoder(tiny_model(family), verbose=False))
    ce.save(tmp_path / "saved")
    expected = ce.score_pairs(QUERIES, TEXTS)
    tokenizer = AutoTokenizer.from_pretrained(tmp_path / "saved")
    model = AutoModel.from_pretrained(tmp_path / "saved").eval()
    head = load_file(tmp_path / "saved" / "score_head.safetensors")
    scores = []
    for query, text in zip(QUERIES, TEXTS):
        ids = (tokenizer(f"query: {query} document: ")["input_ids"]
               + tokenizer(text, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id])
        with torch.no_grad():
            last = model(input_ids=torch.tensor([ids])).last_hidden_state[0, -1]
        scores.append((last @ head["weight"][0] + head["bias"][0]).item())
    np.testing.assert_allclose(scores, expected, atol=1e-5)


def test_a_checkpoint_saved_by_sentence_transformers_keeps_its_scores(tiny_model, tmp_path):
    from sentence_transformers import CrossEncoder as STCrossEncoder

    st = STCrossEncoder(str(tiny_model("bert")), num_labels=1, device="cpu")
    with torch.no_grad():  # as if trained: a head that differs from any fresh one
        for name, param in st.model.named_parameters():
            if "classifier" in name:
                param.normal_(0, 0.5, generator=torch.Generator().manual_seed(7))
    st.save(str(tmp_path / "st"))
    assert (tmp_path / "st" / "modules.json").exists() or (tmp_path / "st" / "config.json").exists()
    expected = STCrossEncoder(str(tmp_path / "st"), device="cpu", activation_fn=torch.nn.Identity()).predict(
        list(zip(QUERIES, TEXTS)))
    ce = kdcl.CrossEncoder(tmp_path / "st", verbose=False)
    np.testing.assert_allclose(ce.score_pairs(QUERIES, TEXTS), expected, atol=1e-5)
    ce.save(tmp_path / "kdcl")  # and through pyterrier_kdcl's own format
    np.testing.assert_allclose(kdcl.CrossEncoder.load(tmp_path / "kdcl", verbose=False).score_pairs(QUERIES, TEXTS),
                               expected, atol=1e-5)
