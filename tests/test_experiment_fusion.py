"""A fused teacher as a config kind (``teacher: {kind: fusion, members: [...]}``): its config checks, the runner's
fit kept on disk, its first-stage member, and fingerprints that follow the members."""

from __future__ import annotations

import copy
import json
import sqlite3

import numpy as np
import pandas as pd
import pytest
from test_experiment import PREFIX, _data_dir, _fast_cpu, collection, tiny_config  # noqa: F401 — fixtures

from pyterrier_kdcl.experiment import ExperimentRunner, run_experiment
from pyterrier_kdcl.experiment import runner as experiment_module
from pyterrier_kdcl.experiment.config import ConfigError, FusionMember, load_config
from pyterrier_kdcl.experiment.plan import plan
from pyterrier_kdcl.fusion import ScoreFusion
from pyterrier_kdcl.training.teachers import pair_key


def fusion_config(tiny_model, collection) -> dict:  # noqa: F811 — the fixture
    """The first stage, a zero-shot bi-encoder and tiny_config's trained cross-encoder teacher, fused; one KD
    student with the temperature fitted on the fused scores."""
    cfg = tiny_config(tiny_model, collection)
    cfg["seeds"] = [1]
    cfg["teacher"] = {"kind": "fusion", "grid_step": 0.5, "members": [
        {"name": "bm25", "kind": "first-stage"},
        {"name": "bi", "kind": "bi-encoder", "model": str(tiny_model("bert", seed=3)), "train": "none",
         "max_length": 32},
        {"name": "cross", **cfg["teacher"]}]}
    cfg["students"] = [{"name": "bert-small", "model": str(tiny_model("bert", seed=1)), "max_length": 32,
                        "objectives": ["KD"]}]
    cfg["training"]["teacher_temperature"] = "auto"
    cfg["evaluation"]["out_of_domain"] = []
    return cfg


def test_a_fused_teacher_validates_and_plans_the_cost_of_its_members(tiny_model, collection):  # noqa: F811
    cfg = load_config(fusion_config(tiny_model, collection))
    members = cfg.teacher.members
    assert [m.name for m in members] == ["bm25", "bi", "cross"] and all(isinstance(m, FusionMember) for m in members)
    assert members[2].training.given() == {"epochs": 2}
    assert cfg.teacher.model == "" and members[0].model == ""  # no model: never resolved to a directory
    text = plan(cfg)
    assert "train teacher member cross" in text and "train teacher (" not in text
    assert "fit the fused teacher on validation candidates (3 members, 2 scoring)" in text
    assert "2 fused members score each pair" in text


@pytest.mark.parametrize("change, message", [
    (lambda c: c["teacher"]["members"][0].pop("name"),
     r"teacher.members\[0\].name: required key is missing: each member needs a name"),
    (lambda c: c["teacher"]["members"][1].update(name="bm25"), "teacher.members: two members are named 'bm25'"),
    (lambda c: c["teacher"].update(kind="cross-encoder", model="minilm-l6"),
     "teacher.members: only a fused teacher has members; add `kind: fusion`"),
    (lambda c: c["teacher"].update(weights={"bm25": 0.5, "cross": 0.5, "nobody": 0.0}),
     r"teacher.weights: 'nobody' not a member; the members are \['bm25', 'bi', 'cross'\]"),
    (lambda c: c["teacher"].update(weights={"bm25": 1.0}), "teacher.weights: give a weight to every member"),
    (lambda c: (c.pop("validation"), c["training"].update(teacher_temperature=1.0)),
     "teacher.weights: a fused teacher's weights are fitted on the validation candidates; add a `validation:`"),
    (lambda c: c["teacher"]["members"][0].update(kind="fusion"), r"teacher.members\[0\].kind: expected one of"),
    (lambda c: c["teacher"]["members"][0].update(model="minilm-l6"),
     r"teacher.members\[0\].model: a first-stage member .* drop it"),
    (lambda c: c["teacher"].update(model="minilm-l6"), "teacher.model: a fused teacher's models are its members'"),
    (lambda c: c["teacher"].update(members=[]), "teacher.members: a fused teacher needs at least one member"),
    (lambda c: c["teacher"]["members"][1].pop("train"), r"teacher.members\[1\].train: .* add `train: none`"),
    # issue 23 item 13: a step that does not divide 1 was searched as another one (0.3 as 1/3)
    (lambda c: c["teacher"].update(grid_step=0.3),
     r"teacher.grid_step: must divide 1 \(the weights are multiples of it that sum to 1\), got 0.3: .*use 1/n"),
    (lambda c: c["teacher"].update(grid_step=1.5),
     r"teacher.grid_step: must be at most 1, got 1.5 \(the spacing of the weight grid: in \(0, 1\] and dividing 1"),
])
def test_bad_fusion_configs_say_what_to_do(tiny_model, collection, change, message):  # noqa: F811
    cfg = fusion_config(tiny_model, collection)
    change(cfg)
    with pytest.raises(ConfigError, match=message):
        load_config(cfg)


def test_given_weights_need_no_validation_data(tiny_model, collection):  # noqa: F811
    cfg = fusion_config(tiny_model, collection)
    cfg.pop("validation")
    cfg["training"]["teacher_temperature"] = 1.0
    cfg["teacher"]["weights"] = {"bm25": 0.2, "bi": 0.0, "cross": 0.8}
    assert load_config(cfg).teacher.weights["cross"] == 0.8


def test_existing_configs_keep_their_fingerprints():
    """Recorded under SCHEMA_VERSION 2, with ``precision: auto`` resolved as on a CPU without native bfloat16 (fp32;
    recorded again when stages began to name the resolved precision, 2026-12-04). A change here renames the stages
    of every earlier run (they are computed again): make it on purpose, with a field added to the schema or
    SCHEMA_VERSION bumped, and say so in the changelog. (A field declared not to affect results, or a new field of a
    fused teacher, changes nothing here.)"""
    import pyterrier_kdcl.fast

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(pyterrier_kdcl.fast, "native_bfloat16", lambda: False)
        teacher, student = _recorded_fingerprints()
    assert teacher == "192884f91b143e3d"
    assert student == "1ed1a934476a336d"


def _recorded_fingerprints() -> tuple[str, str]:
    cfg = load_config({
        "name": "fp", "train": {"dataset": "irds:kdcl/manpages/train", "depth": 20, "queries": 300},
        "validation": {"dataset": "irds:kdcl/manpages/dev", "depth": 20, "queries": 50},
        "teacher": {"model": "minilm-l6", "max_length": 128,
                    "data": {"dataset": "irds:kdcl/manpages/train", "depth": 20}},
        "students": [{"name": "s", "model": "minilm-l3", "max_length": 128}],
        "evaluation": {"in_domain": [{"dataset": "irds:kdcl/manpages/test", "depth": 20}]},
    }, check_environment=False)
    runner = ExperimentRunner(cfg, "unused", verbose=False)
    teacher = runner.teacher_spec(cfg.teacher).fingerprint()
    return teacher, runner.student_spec(cfg.students[0], "KD", 42, teacher).fingerprint()


def test_the_fused_teacher_is_fitted_once_and_follows_its_members(tiny_model, collection, tmp_path,  # noqa: F811
                                                                   monkeypatch):
    cfg = fusion_config(tiny_model, collection)
    result = run_experiment(copy.deepcopy(cfg), tmp_path, verbose=False)
    fitted = json.loads((tmp_path / "teacher-fusion.json").read_text())
    assert set(fitted["weights"]) == {"bm25", "bi", "cross"} and sum(fitted["weights"].values()) == pytest.approx(1)
    assert set(fitted["stats"]) == {"bm25", "bi", "cross"} and fitted["queries"] > 0
    assert len(fitted["grid"]) == 6 and set(fitted["alone"]) == {"bm25", "bi", "cross"}  # step 0.5, 3 members
    assert json.loads((tmp_path / "teacher-temperature.json").read_text())["temperature"] > 0  # on z-scores
    teacher = result.models[0]
    assert teacher.objective == "fused" and (tmp_path / "teacher" / "model").is_dir()  # the cross member's stage
    summary = pd.read_csv(tmp_path / "tables" / "summary.csv")
    assert "teacher (fusion of bm25, bi, cross)" in set(summary["system"])

    # the trained member has the stage fingerprint it would have as the sole teacher: earlier runs' teachers serve
    sole = load_config(tiny_config(tiny_model, collection))
    runner = ExperimentRunner(sole, tmp_path, verbose=False)
    expected = runner.teacher_spec(sole.teacher).fingerprint()
    assert json.loads((tmp_path / "teacher" / "done.json").read_text())["fingerprint"] == expected

    # a rerun reads the fit back from disk and reuses every student
    def refit(*args, **kwargs):
        raise AssertionError("the fusion was fitted again")

    monkeypatch.setattr(experiment_module, "fitted_fusion", refit)
    again = run_experiment(copy.deepcopy(cfg), tmp_path, verbose=False)
    assert again.models[0].fingerprint == teacher.fingerprint
    assert all(m.reused for m in again.models)
    monkeypatch.undo()

    # a changed member is a new teacher: fitted again, a new fingerprint, so the KD students are distilled again
    changed = copy.deepcopy(cfg)
    changed["teacher"]["members"][1]["max_length"] = 24
    runner = ExperimentRunner(load_config(changed), tmp_path, verbose=False)
    assert runner.teacher().fingerprint != teacher.fingerprint
    given = copy.deepcopy(cfg)
    given["teacher"]["weights"] = {"bm25": 1.0, "bi": 0.0, "cross": 0.0}
    assert ExperimentRunner(load_config(given), tmp_path, verbose=False).teacher().fingerprint != teacher.fingerprint


def test_the_first_stage_member_scores_with_the_candidates_first_stage_scores(tiny_model, collection,  # noqa: F811
                                                                            tmp_path):
    cfg = fusion_config(tiny_model, collection)
    cfg["teacher"] = {"kind": "fusion", "members": [{"name": "bm25", "kind": "first-stage"}],
                      "weights": {"bm25": 1.0}}
    cfg["training"]["teacher_temperature"] = 1.0
    run_experiment(copy.deepcopy(cfg), tmp_path, verbose=False)
    config = load_config(cfg)
    runner = ExperimentRunner(config, tmp_path, verbose=False)
    mean, sd = json.loads((tmp_path / "teacher-fusion.json").read_text())["stats"]["bm25"]
    _, _, dev = runner.frames(config.validation)
    assert mean == pytest.approx(dev["score"].mean()) and sd == pytest.approx(dev["score"].std())

    # the scores the student was distilled from: the training candidates' first-stage scores, standardised
    _, _, train = runner.frames(config.train)
    expected = {pair_key(q, d, t, s): (s - mean) / sd for q, d, t, s in train[["query", "docno", "text", "score"]]
                .itertuples(index=False)}  # keyed by the first-stage score too: the teacher reads it
    [cache] = (tmp_path / "teacher-scores").glob("*/scores.sqlite3")
    with sqlite3.connect(cache) as db:
        cached = dict(db.execute("SELECT key, score FROM scores").fetchall())
    found = [k for k in cached if k in expected]  # the others: positives the first stage missed
    assert len(found) > len(cached) / 2
    np.testing.assert_allclose([cached[k] for k in found], [expected[k] for k in found], rtol=1e-9)
    assert len({round(cached[k], 6) for k in found}) > 2  # real scores, not a constant

    # in evaluation the teacher scores with the first stage's scores too
    runs = tmp_path / "runs" / "tiny-test"
    import pyterrier as pt

    bm25, teacher = (pt.io.read_results(str(runs / f"{name}.res.gz")) for name in ("BM25", "teacher"))
    merged = bm25.merge(teacher, on=["qid", "docno"], suffixes=("_bm25", "_teacher"))
    assert len(merged) == len(bm25)
    np.testing.assert_allclose(merged["score_teacher"], (merged["score_bm25"] - mean) / sd, rtol=1e-5)  # run files
    model = runner.teacher().loader()
    assert isinstance(model, ScoreFusion) and model.weights == {"bm25": 1.0}


def test_a_fused_teacher_without_trained_members_is_reported_as_fitted_then_reused(tiny_model, collection,  # noqa: F811
                                                                                   tmp_path):
    """Issue 23 item 8: on a fresh run the fit is new work (its seconds, not reused); on a rerun it is reused."""
    cfg = fusion_config(tiny_model, collection)
    cfg["teacher"]["members"] = cfg["teacher"]["members"][:2]  # the first stage and the zero-shot bi-encoder
    cfg["evaluation"]["in_domain"][0]["queries"] = 4
    fresh = run_experiment(copy.deepcopy(cfg), tmp_path, verbose=False)
    teacher = next(m for m in fresh.models if m.role == "teacher")
    assert not teacher.reused and teacher.seconds > 0
    again = run_experiment(copy.deepcopy(cfg), tmp_path, verbose=False)
    assert next(m for m in again.models if m.role == "teacher").reused
