"""``evaluation.fast``: refused for models on which the fast path was not shown to rank as float32, applied to
cross-encoders (not to a bi-encoder teacher) where it was."""

from __future__ import annotations

import copy
import json

import pytest
from test_experiment import _data_dir, collection, tiny_config  # noqa: F401 — fixtures

import pyterrier_kdcl as kdcl
import pyterrier_kdcl.fast as fast
from pyterrier_kdcl.experiment.config import ConfigError, load_config
from pyterrier_kdcl.experiment.runner import _fast


def fast_config(tiny_model, collection) -> dict:  # noqa: F811
    cfg = tiny_config(tiny_model, collection)
    cfg["students"] = cfg["students"][:1]  # full fine-tuning only
    cfg["evaluation"]["fast"] = True
    return cfg


def test_fast_evaluation_is_refused_where_equivalence_was_not_shown(tiny_model, collection, monkeypatch):  # noqa: F811
    monkeypatch.setattr(fast, "EQUIVALENCE_FILE", fast.EQUIVALENCE_FILE.with_name("no-such-file.json"))
    with pytest.raises(ConfigError) as err:
        load_config(fast_config(tiny_model, collection))
    problems = [p for p in err.value.problems if "evaluation.fast" in p]
    assert [p.split(":")[0] for p in problems] == ["teacher.model", "students[0].model"]
    assert "run benchmarks/fast_inference.py --record" in problems[0]
    cfg = fast_config(tiny_model, collection)
    cfg["evaluation"]["fast"] = False
    assert load_config(cfg).evaluation.fast is False


def test_fast_evaluation_is_accepted_where_it_was_shown(tiny_model, collection, monkeypatch, tmp_path):  # noqa: F811
    cfg = fast_config(tiny_model, collection)
    shown = tmp_path / "fast_equivalence.json"
    shown.write_text(json.dumps({cfg["teacher"]["model"]: {"ndcg_delta": 0.0},
                                 cfg["students"][0]["model"]: {"ndcg_delta": 0.0}}))
    monkeypatch.setattr(fast, "EQUIVALENCE_FILE", shown)
    assert load_config(copy.deepcopy(cfg)).evaluation.fast is True
    lora = copy.deepcopy(cfg)
    lora["students"][0]["lora"] = {"r": 4}
    with pytest.raises(ConfigError, match=r"students\[0\]: evaluation.fast was shown for full float32"):
        load_config(lora)
    cuda = copy.deepcopy(cfg)
    cuda["device"] = "cuda"
    with pytest.raises(ConfigError, match="the fast path is for CPU"):
        load_config(cuda)


def test_fast_loader_optimises_cross_encoders_only(tiny_model):
    reranker = _fast(lambda: kdcl.CrossEncoder(tiny_model("bert"), device="cpu", verbose=False))()
    assert reranker.optimized == "bf16"
    other = object()
    assert _fast(lambda: other)() is other
