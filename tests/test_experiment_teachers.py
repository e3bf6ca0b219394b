"""Teachers beyond trained cross-encoders in the experiment: a zero-shot bi-encoder, and a fitted temperature."""

from __future__ import annotations

import copy
import json

import numpy as np
import pandas as pd
import pyterrier as pt
import pytest
import torch
from test_experiment import PREFIX, _data_dir, _fast_cpu, collection, tiny_config  # noqa: F401 — fixtures

from pyterrier_kdcl.experiment import run_experiment
from pyterrier_kdcl.experiment.config import ConfigError, load_config
from pyterrier_kdcl.experiment.teachers import fitted_temperature


def bi_encoder_config(tiny_model, collection) -> dict:  # noqa: F811 — the fixture
    cfg = tiny_config(tiny_model, collection)
    cfg["seeds"] = [1]
    cfg["teacher"] = {"kind": "bi-encoder", "model": str(tiny_model("bert", seed=3)), "train": "none",
                      "max_length": 32}
    cfg["students"] = [{"name": "bert-small", "model": str(tiny_model("bert", seed=1)), "max_length": 32,
                        "objectives": ["KD"]}]
    cfg["training"]["teacher_temperature"] = "auto"
    cfg["evaluation"]["out_of_domain"] = []
    return cfg


def test_a_bi_encoder_teacher_needs_train_none_and_refuses_cross_encoder_settings(tiny_model, collection):  # noqa: F811 — the fixture
    cfg = bi_encoder_config(tiny_model, collection)
    cfg["teacher"].pop("train")
    cfg["teacher"]["lora"] = True
    with pytest.raises(ConfigError) as err:
        load_config(cfg)
    assert "add `train: none`" in str(err.value) and "teacher.lora" in str(err.value)


def test_auto_temperature_needs_validation_data(tiny_model, collection):  # noqa: F811 — the fixture
    cfg = bi_encoder_config(tiny_model, collection)
    cfg.pop("validation")
    with pytest.raises(ConfigError, match="teacher_temperature: 'auto' is fitted on the validation"):
        load_config(cfg)
    cfg["training"]["teacher_temperature"] = "warm"
    with pytest.raises(ConfigError, match="teacher_temperature: expected a number or one of 'auto'"):
        load_config(cfg)


def test_a_zero_shot_bi_encoder_teaches_with_a_fitted_temperature(tiny_model, collection, tmp_path):  # noqa: F811 — the fixture
    cfg = bi_encoder_config(tiny_model, collection)
    result = run_experiment(copy.deepcopy(cfg), tmp_path, verbose=False)
    fitted = json.loads((tmp_path / "teacher-temperature.json").read_text())
    assert fitted["temperature"] > 0 and fitted["queries"] > 0
    assert not (tmp_path / "teacher" / "model").exists()  # nothing trained for the teacher
    assert any((tmp_path / "teacher-scores").iterdir())  # its scores were cached under its fingerprint
    table = pd.read_csv(tmp_path / "tables" / "tiny-test.csv")
    assert {"BM25", "teacher", "bert-small-KD-s1"} <= set(table["name"])
    assert result.models[0].objective == "given"
    # a second run reuses everything, the fitted temperature included
    again = run_experiment(copy.deepcopy(cfg), tmp_path, verbose=False)
    assert all(m.reused for m in again.models if m.role == "student")


class _Scores(pt.Transformer):
    def __init__(self, scale: float):
        self.scale = scale

    def transform(self, inp):
        # the relevant document (docno ending in -0) scores 1, others 0, on a scale
        return inp.assign(score=[self.scale * float(d.endswith("-0")) for d in inp["docno"]])


def test_fitted_temperature_follows_the_teachers_scale():
    res = pd.DataFrame([(f"q{q}", "query", f"d{q}-{k}", "text") for q in range(20) for k in range(5)],
                       columns=["qid", "query", "docno", "text"])
    qrels = pd.DataFrame([(f"q{q}", f"d{q}-{(0 if q < 14 else 1)}", 1) for q in range(20)],
                         columns=["qid", "docno", "label"])  # the teacher is right for 14 of 20 queries
    small, large = (fitted_temperature(_Scores(scale), res, qrels)["temperature"] for scale in (0.1, 10.0))
    assert large == pytest.approx(100 * small, rel=1e-3)
    # right 70% of the time among 5: the calibrated top probability is 0.7
    t = small
    top = np.exp(0.1 / t) / (np.exp(0.1 / t) + 4)
    assert top == pytest.approx(0.7, abs=0.01)


def test_the_verdict_names_the_control_only_when_the_teacher_saw_the_same_data(tiny_model, collection):  # noqa: F811
    from pyterrier_kdcl.experiment.report import columns, verdict

    cfg = tiny_config(tiny_model, collection)
    cfg["students"] = [{"name": "twin", "model": cfg["teacher"]["model"], "max_length": 32}]
    cols = columns(load_config(copy.deepcopy(cfg), check_environment=False))
    pooled = pd.DataFrame([{"student": "twin", "scope": "pooled", "collection": "in domain", "in_domain": True,
                            "CL": 0.5, "KD": 0.6, "KD-CL": 0.1, cols.low: 0.05, cols.high: 0.15, cols.p: 0.001,
                            cols.p_corrected: 0.001, "significant": True, "winner": "KD", "se": 0.01, "df": 99.0,
                            "MDE (80% power)": 0.02, "MDE α": 0.05, "queries": 100}])
    same_data = verdict(load_config(copy.deepcopy(cfg), check_environment=False), pd.DataFrame(), pooled)
    assert "same capacity and data as the teacher: the control" in same_data
    cfg["teacher"]["data"] = {"dataset": cfg["train"]["dataset"], "depth": 6, "queries": 12}
    more_data = verdict(load_config(copy.deepcopy(cfg), check_environment=False), pd.DataFrame(), pooled)
    assert "the control" not in more_data and "its advantage is data" in more_data


def test_a_disjoint_teacher_never_sees_the_students_queries(tiny_model, collection, tmp_path, monkeypatch):  # noqa: F811
    from pyterrier_kdcl.experiment import runner as experiment_module

    seen = {}
    original = experiment_module.ContrastiveTrainer

    class Recording(original):
        def fit(self, tr_res, tr_qrels, *args, **kwargs):
            seen.setdefault(str(self.output_dir), set(tr_res["qid"].astype(str)))
            return super().fit(tr_res, tr_qrels, *args, **kwargs)

    monkeypatch.setattr(experiment_module, "ContrastiveTrainer", Recording)
    cfg = tiny_config(tiny_model, collection)
    cfg["seeds"] = [1]
    cfg["train"]["queries"] = 8
    cfg["teacher"]["data"] = {"dataset": cfg["train"]["dataset"], "depth": 6}
    cfg["teacher"]["disjoint"] = True
    cfg["students"] = [{"name": "bert-small", "model": str(tiny_model("bert", seed=1)), "max_length": 32,
                        "objectives": ["CL"]}]
    cfg["evaluation"]["out_of_domain"] = []
    run_experiment(copy.deepcopy(cfg), tmp_path, verbose=False)
    teacher = seen[str(tmp_path / "teacher")]
    student = seen[str(tmp_path / "students" / "bert-small" / "CL" / "seed-1")]
    assert student and teacher and not teacher & student
    assert len(teacher) == 16 - 8  # every other training query


def test_disjoint_needs_the_teachers_own_data(tiny_model, collection):  # noqa: F811 — the fixture
    cfg = tiny_config(tiny_model, collection)
    cfg["teacher"]["disjoint"] = True
    with pytest.raises(ConfigError, match="teacher.disjoint: trains the teacher on teacher.data minus"):
        load_config(cfg)


def test_the_fitted_temperature_is_keyed_by_teacher_and_validation_data_and_survives_a_broken_file(
        tiny_model, collection, tmp_path, monkeypatch):  # noqa: F811 — the fixture
    """Issue 23 item 2: other validation data refits the temperature; a truncated file is refitted, not a crash."""
    from pyterrier_kdcl.experiment import runner as experiment_module

    calls = []

    def fake_fit(teacher, va_res, va_qrels):
        calls.append(va_res["qid"].nunique())
        return {"temperature": 0.5 + len(calls), "queries": int(va_res["qid"].nunique()),
                "score_sd_within_query": 1.0}

    monkeypatch.setattr(experiment_module, "fitted_temperature", fake_fit)
    cfg = bi_encoder_config(tiny_model, collection)
    teacher = experiment_module.TrainedModel("teacher", "teacher", "given", None, "teacher-fp")
    runner = experiment_module.ExperimentRunner(load_config(copy.deepcopy(cfg)), tmp_path, verbose=False)
    first = runner.teacher_temperature(teacher, None)["temperature"]
    assert runner.teacher_temperature(teacher, None)["temperature"] == first and len(calls) == 1  # kept on disk

    path = tmp_path / "teacher-temperature.json"
    path.write_text(path.read_text()[:10])  # cut short by a crash
    assert runner.teacher_temperature(teacher, None)["temperature"] != first and len(calls) == 2

    cfg["validation"]["queries"] = cfg["validation"].get("queries", 4) - 1  # other validation data
    other = experiment_module.ExperimentRunner(load_config(copy.deepcopy(cfg)), tmp_path, verbose=False)
    other.teacher_temperature(teacher, None)
    assert len(calls) == 3


def test_a_bi_encoder_teacher_in_bf16_is_another_teacher_and_scores_in_bf16(tiny_model, collection, tmp_path):  # noqa: F811 — the fixture
    from pyterrier_kdcl.experiment.runner import ExperimentRunner

    cfg = bi_encoder_config(tiny_model, collection)
    cfg["teacher"]["dtype"] = "fp32"
    as_float32 = ExperimentRunner(load_config(copy.deepcopy(cfg)), tmp_path, verbose=False).teacher()
    cfg["teacher"]["dtype"] = "float32"  # one dtype, two spellings: the same fingerprint, the cache kept
    assert ExperimentRunner(load_config(copy.deepcopy(cfg)), tmp_path, verbose=False).teacher().fingerprint \
        == as_float32.fingerprint
    cfg["teacher"]["dtype"] = "bf16"
    in_bf16 = ExperimentRunner(load_config(copy.deepcopy(cfg)), tmp_path, verbose=False).teacher()
    assert in_bf16.fingerprint != as_float32.fingerprint  # its cached scores are not float32's
    scorer = in_bf16.loader()
    rows = pd.DataFrame({"qid": ["q1"] * 2, "query": ["read a file"] * 2, "docno": ["d1", "d2"],
                         "text": ["read from a file descriptor", "write to a socket"]})
    scored = scorer(rows)
    assert next(scorer.bi_encoder_model.model.parameters()).dtype == torch.bfloat16
    np.testing.assert_allclose(scored["score"], as_float32.loader()(rows)["score"], rtol=1e-2)  # bf16 noise


def test_a_given_cross_encoder_teacher_in_bf16_is_another_teacher(tiny_model, collection, tmp_path):  # noqa: F811 — the fixture
    """Issue 23 item 1: a given cross-encoder teacher's dtype names it (its KD students, run files and fitted
    temperature are not reused across fp32 and bf16); float32, however spelled, is one teacher."""
    from pyterrier_kdcl.experiment.runner import ExperimentRunner

    cfg = bi_encoder_config(tiny_model, collection)
    cfg["teacher"] = {"model": str(tiny_model("bert", seed=3)), "train": "none", "max_length": 32}

    def teacher_fingerprint(dtype):
        given = copy.deepcopy(cfg)
        given["teacher"]["dtype"] = dtype
        return ExperimentRunner(load_config(given), tmp_path, verbose=False).teacher().fingerprint

    before = teacher_fingerprint("fp32")
    assert teacher_fingerprint("float32") == before and teacher_fingerprint("bf16") != before
    assert teacher_fingerprint(None) != teacher_fingerprint("bf16")  # default: float32 on CPU, bf16 on CUDA
