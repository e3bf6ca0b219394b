"""Reliability: untrusted files. Weights load from safetensors, no pickle runs code, remote code stays off unless
asked, directories that are not (this) model say so, and downloads are checked against their sha256.

Already covered elsewhere (see docs/reliability.md): an unknown model name (test_reranker.py::
test_unknown_model_names_say_what_exists); save/load and LoRA round trips (test_reranker.py).
"""

import functools
import hashlib
import http.server
import json
import shutil
import threading
from pathlib import Path

import numpy as np
import pandas as pd
import pyterrier as pt
import pytest
import torch
from safetensors.torch import load_file, save_file
from training_data import training_frames

import pyterrier_kdcl as kdcl

PICKLE_SUFFIXES = {".bin", ".pt", ".pth", ".pkl", ".pickle", ".ckpt", ".joblib"}


pytestmark = pytest.mark.usefixtures("one_thread")  # conftest.py


def scores(ce):
    return ce.score_pairs(["read a file", "copy"], ["read from a file descriptor", "copy files"], progress=False)


class Payload:
    """Unpickling this runs code: it creates the file ``marker``."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (Path.touch, (Path(self.marker),))


def copy_model(tiny_model, family, dest):
    return Path(shutil.copytree(tiny_model(family), dest))


# -- safetensors, and no pickle from a user's path -----------------------------------------------------------
def test_models_and_saved_rerankers_load_without_torch_load(tiny_model, tmp_path, monkeypatch):
    plain = kdcl.CrossEncoder(tiny_model("bert"), verbose=False)
    plain.save(tmp_path / "plain")
    lora = kdcl.CrossEncoder(tiny_model("qwen2"), verbose=False, lora={"r": 4})
    lora.save(tmp_path / "lora")

    def refuse(*args, **kwargs):
        raise AssertionError("torch.load (pickle) was called")

    monkeypatch.setattr(torch, "load", refuse)
    np.testing.assert_array_equal(scores(kdcl.CrossEncoder(tiny_model("bert"), verbose=False)), scores(plain))
    np.testing.assert_array_equal(scores(kdcl.CrossEncoder.load(tmp_path / "plain", verbose=False)), scores(plain))
    np.testing.assert_array_equal(scores(kdcl.CrossEncoder.load(tmp_path / "lora", verbose=False)), scores(lora))
    for path in (tmp_path / "plain", tmp_path / "lora"):
        assert not [f for f in path.rglob("*") if f.suffix in PICKLE_SUFFIXES]
        assert [f for f in path.rglob("*.safetensors")]


def test_a_pickled_weights_file_never_runs_code(tiny_model, tmp_path):
    model = copy_model(tiny_model, "bert", tmp_path / "bin-only")
    state = load_file(model / "model.safetensors")
    (model / "model.safetensors").unlink()
    torch.save(state, model / "pytorch_model.bin")  # tensors only: loads through torch.load(weights_only=True)
    expected = scores(kdcl.CrossEncoder(tiny_model("bert"), verbose=False))
    # other memory layout (torch.load's tensors, not safetensors' mapped ones): the same within float rounding
    np.testing.assert_allclose(scores(kdcl.CrossEncoder(model, verbose=False)), expected, rtol=1e-5, atol=1e-6)

    marker = tmp_path / "code-ran"
    torch.save({**state, "payload": Payload(marker)}, model / "pytorch_model.bin")
    with pytest.raises(Exception, match="(?i)weights.only"):
        kdcl.CrossEncoder(model, verbose=False)
    assert not marker.exists()


def test_a_pickled_optimizer_state_in_a_checkpoint_never_runs_code(tiny_model, tmp_path):
    res, qrels = training_frames(4)
    options = {"group_size": 4, "batch_size": 2, "verbose": False, "checkpoint_every": 1, "output_dir": tmp_path,
               "keep_checkpoints": True}
    kdcl.ContrastiveTrainer(kdcl.CrossEncoder(tiny_model("bert"), verbose=False, max_length=32), **options).fit(
        res, qrels)
    marker = tmp_path / "code-ran"
    torch.save({"optimizer": Payload(marker)}, tmp_path / "checkpoints" / "step-00000002" / "optimizer.pt")
    student = kdcl.CrossEncoder(tiny_model("bert"), verbose=False, max_length=32)
    with pytest.raises(Exception, match="(?i)weights.only"):
        kdcl.ContrastiveTrainer(student, **options).fit(res, qrels, resume=True)
    assert not marker.exists()


# -- remote code ---------------------------------------------------------------------------------------------
def with_remote_code(tiny_model, dest, model_type, marker):
    model = copy_model(tiny_model, "bert", dest)
    config = json.loads((model / "config.json").read_text())
    config.update(model_type=model_type, auto_map={"AutoConfig": "configuration_evil.EvilConfig",
                                                   "AutoModelForSequenceClassification": "modeling_evil.EvilModel"})
    (model / "config.json").write_text(json.dumps(config))
    code = f"from pathlib import Path\nPath({str(marker)!r}).touch()\n"
    (model / "configuration_evil.py").write_text(code + "from transformers import BertConfig as EvilConfig\n")
    (model / "modeling_evil.py").write_text(code)
    return model


def test_remote_code_is_off_by_default(tiny_model, tmp_path):
    marker = tmp_path / "code-ran"
    custom = with_remote_code(tiny_model, tmp_path / "custom", "kdcl-custom", marker)
    with pytest.raises(ValueError, match="trust_remote_code=True"):
        kdcl.CrossEncoder(custom, verbose=False)
    known = with_remote_code(tiny_model, tmp_path / "known", "bert", marker)  # a known type loads as itself
    np.testing.assert_array_equal(scores(kdcl.CrossEncoder(known, verbose=False)),
                                  scores(kdcl.CrossEncoder(tiny_model("bert"), verbose=False)))
    assert not marker.exists()


def test_a_saved_reranker_cannot_switch_remote_code_on_by_itself(tiny_model, tmp_path):
    kdcl.CrossEncoder(tiny_model("bert"), verbose=False).save(tmp_path / "saved")
    settings = json.loads((tmp_path / "saved" / "kdcl.json").read_text())
    assert settings["trust_remote_code"] is False
    (tmp_path / "saved" / "kdcl.json").write_text(json.dumps({**settings, "trust_remote_code": True}))
    with pytest.raises(ValueError, match="saved with trust_remote_code=True.*pass trust_remote_code=True"):
        kdcl.CrossEncoder.load(tmp_path / "saved", verbose=False)
    assert kdcl.CrossEncoder.load(tmp_path / "saved", verbose=False, trust_remote_code=True).trust_remote_code


# -- directories that are not this model ---------------------------------------------------------------------
def test_directories_that_are_not_models_say_what_they_are(tiny_model, tmp_path):
    (tmp_path / "empty").mkdir()
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "readme.txt").write_text("hello")
    cases = {
        tmp_path / "empty": "not a Hugging Face model directory",
        tmp_path / "notes": "not a Hugging Face model directory",
        Path(tiny_model("bert")) / "model.safetensors": "is a file",
    }
    for path, message in cases.items():
        with pytest.raises(OSError, match=message):
            kdcl.CrossEncoder(path, verbose=False)
    with pytest.raises(FileNotFoundError, match=r"not a saved pyterrier_kdcl reranker.*kdcl.CrossEncoder\(path\)"):
        kdcl.CrossEncoder.load(tiny_model("bert"))
    lora = kdcl.CrossEncoder(tiny_model("bert"), verbose=False, lora=True)
    lora.save(tmp_path / "saved-lora")
    with pytest.raises(OSError, match=r"saved by pyterrier_kdcl: load it with kdcl.CrossEncoder.load"):
        kdcl.CrossEncoder(tmp_path / "saved-lora", verbose=False)


def test_weights_of_another_architecture_are_refused_not_scored_at_random(tiny_model, tmp_path):
    mixed = copy_model(tiny_model, "bert", tmp_path / "mixed")
    shutil.copy(Path(tiny_model("electra")) / "model.safetensors", mixed / "model.safetensors")
    with pytest.raises(ValueError, match=r"weights of its bert architecture are not in the checkpoint"):
        kdcl.CrossEncoder(mixed, verbose=False)
    kdcl.CrossEncoder(tiny_model("bert"), verbose=False).save(tmp_path / "saved")
    shutil.copy(Path(tiny_model("electra")) / "model.safetensors", tmp_path / "saved" / "model.safetensors")
    with pytest.raises(ValueError, match="another architecture"):
        kdcl.CrossEncoder.load(tmp_path / "saved", verbose=False)


def test_a_fresh_head_is_still_allowed(tiny_model):
    """A base decoder has no score head and an encoder may lack its classifier: those are trained, not refused."""
    assert np.isfinite(scores(kdcl.CrossEncoder(tiny_model("qwen2"), verbose=False))).all()


def wider_bert(tiny_model, dest):
    """The tiny BERT with wider feed-forward layers: the same parameter names, other shapes."""
    from transformers import AutoConfig, AutoModelForSequenceClassification

    model = copy_model(tiny_model, "bert", dest)
    config = json.loads((model / "config.json").read_text())
    (model / "config.json").write_text(json.dumps({**config, "intermediate_size": 96}))
    (model / "model.safetensors").unlink()
    AutoModelForSequenceClassification.from_config(AutoConfig.from_pretrained(model)).save_pretrained(model)
    return model


def test_resuming_from_a_checkpoint_of_another_model_is_refused_before_training(tiny_model, tmp_path):
    res, qrels = training_frames(4)
    options = {"group_size": 4, "batch_size": 2, "verbose": False, "output_dir": tmp_path / "out",
               "keep_checkpoints": True}
    kdcl.ContrastiveTrainer(kdcl.CrossEncoder(tiny_model("bert"), verbose=False, max_length=32), **options).fit(
        res, qrels)
    wider = wider_bert(tiny_model, tmp_path / "wider")
    for other, message in [(tiny_model("electra"), "parameters differ in name or shape"),
                           (wider, r"differ in name or shape, e.g. .*intermediate")]:
        student = kdcl.CrossEncoder(other, verbose=False, max_length=32)
        with pytest.raises(ValueError, match=message):
            kdcl.ContrastiveTrainer(student, **options).fit(res, qrels, resume=True)
    lora = kdcl.CrossEncoder(tiny_model("bert"), verbose=False, max_length=32, lora={"r": 2})
    with pytest.raises(ValueError, match="another model or LoRA setting"):
        kdcl.ContrastiveTrainer(lora, **options).fit(res, qrels, resume=True)


# -- LoRA adapters and their base ----------------------------------------------------------------------------
def test_a_lora_adapter_without_its_base(tiny_model, tmp_path):
    base = copy_model(tiny_model, "qwen2", tmp_path / "base")
    kdcl.CrossEncoder(base, verbose=False, lora={"r": 4}).save(tmp_path / "saved")
    with pytest.raises(OSError, match=r"holds a LoRA adapter without its base model .*base"):
        kdcl.CrossEncoder(tmp_path / "saved" / "adapter", verbose=False)
    shutil.rmtree(base)
    with pytest.raises(OSError, match=r"LoRA adapter whose base model .* cannot be loaded.*set base_model in"):
        kdcl.CrossEncoder.load(tmp_path / "saved", verbose=False)
    settings = json.loads((tmp_path / "saved" / "kdcl.json").read_text())
    (tmp_path / "saved" / "kdcl.json").write_text(json.dumps({**settings, "base_model": str(tiny_model("mamba"))}))
    with pytest.raises(ValueError, match="does not fit its base model"):
        kdcl.CrossEncoder.load(tmp_path / "saved", verbose=False)
    (tmp_path / "saved" / "kdcl.json").write_text(json.dumps({**settings, "base_model": str(tiny_model("qwen2"))}))
    assert np.isfinite(scores(kdcl.CrossEncoder.load(tmp_path / "saved", verbose=False))).all()  # moved back


# -- corrupt files -------------------------------------------------------------------------------------------
def test_corrupt_weights_and_settings_say_so(tiny_model, tmp_path):
    kdcl.CrossEncoder(tiny_model("bert"), verbose=False).save(tmp_path / "saved")
    weights = tmp_path / "saved" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:200])
    with pytest.raises(OSError, match="truncated or corrupt"):
        kdcl.CrossEncoder.load(tmp_path / "saved", verbose=False)
    (tmp_path / "saved" / "kdcl.json").write_text('{"format": 1, "pool')
    with pytest.raises(ValueError, match=r"kdcl.json is corrupt.*save the reranker again"):
        kdcl.CrossEncoder.load(tmp_path / "saved", verbose=False)


# -- downloads checked against their sha256 (pt.io.download) ---------------------------------------------------
@pytest.fixture
def served(tmp_path):
    """``served(path)`` → the URL of ``path``, served over HTTP from its folder by a local server."""
    servers = []

    def serve(path: Path) -> str:
        handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(path.parent))
        handler.log_message = lambda *args: None
        httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
        threading.Thread(target=httpd.serve_forever, daemon=True).start()
        servers.append(httpd)
        return f"http://127.0.0.1:{httpd.server_address[1]}/{path.name}"

    yield serve
    for httpd in servers:
        httpd.shutdown()
        httpd.server_close()


def test_download_checks_the_sha256_and_keeps_nothing_on_a_mismatch(served, tmp_path):
    path = tmp_path / "served" / "weights.safetensors"
    path.parent.mkdir()
    save_file({"w": torch.arange(1000, dtype=torch.float32)}, path)
    digest, url = file_sha256(path), served(path)
    got = tmp_path / "got" / "w.safetensors"
    got.parent.mkdir()
    pt.io.download(url, str(got), expected_sha256=digest.upper(), verbose=False)
    assert got.read_bytes() == path.read_bytes()
    (tmp_path / "bad").mkdir()
    with pytest.raises(ValueError, match=f"Expected sha256 '0{{64}}' but found '{digest}'"):
        pt.io.download(url, str(tmp_path / "bad" / "w.safetensors"), expected_sha256="0" * 64, verbose=False)
    with pytest.raises(OSError, match="404"):
        pt.io.download(url.replace(path.name, "missing"), str(tmp_path / "bad" / "missing"), verbose=False)
    assert list((tmp_path / "bad").iterdir()) == []  # neither a file nor a temporary copy


def test_downloaded_weights_load_into_a_reranker_only_when_verified(tiny_model, served, tmp_path):
    """End to end: a reranker directory whose weights come from a URL, verified before anything reads them."""
    source = copy_model(tiny_model, "bert", tmp_path / "source")
    weights = source / "model.safetensors"
    target = copy_model(tiny_model, "bert", tmp_path / "target")
    (target / "model.safetensors").unlink()
    pt.io.download(served(weights), str(target / "model.safetensors"), expected_sha256=file_sha256(weights),
                   verbose=False)
    inp = pd.DataFrame({"qid": "1", "query": "read", "docno": ["a", "b"], "text": ["read a file", "copy"]})
    np.testing.assert_array_equal(kdcl.CrossEncoder(target, verbose=False)(inp)["score"],
                                  kdcl.CrossEncoder(source, verbose=False)(inp)["score"])


def file_sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()
