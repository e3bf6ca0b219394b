"""Unjudged training queries and target-domain adaptation in the experiment: config keys, the data each student
trains on, fingerprints that earlier runs keep, and the report's rows."""

from __future__ import annotations

import copy
import json
import os
import subprocess
import sys

import numpy as np
import pandas as pd
import pytest
from test_experiment import PREFIX, _data_dir, _fast_cpu, collection, tiny_config  # noqa: F401 — fixtures

from pyterrier_kdcl.experiment import ExperimentRunner, run_experiment, seed_aware
from pyterrier_kdcl.experiment import data as experiment_data
from pyterrier_kdcl.experiment import report as reporting
from pyterrier_kdcl.experiment import runner as experiment_module
from pyterrier_kdcl.experiment.config import ConfigError, Data, load_config


def unjudged_config(tiny_model, collection) -> dict:  # noqa: F811 — the fixture
    cfg = tiny_config(tiny_model, collection)
    cfg["seeds"] = [1]
    cfg["train"]["queries"] = 6
    bert = str(tiny_model("bert", seed=1))
    cfg["students"] = [
        {"name": "bert-small", "model": bert, "max_length": 32},
        {"name": "bert-small+u", "model": bert, "max_length": 32, "objectives": ["KD"], "base": "bert-small",
         "unjudged": [{"dataset": f"irds:{PREFIX}/train", "queries": 5, "depth": 6}]},
        {"name": "bert-small+ood", "model": bert, "max_length": 32, "objectives": ["KD"], "base": "bert-small",
         "unjudged": [{"dataset": f"irds:{PREFIX}/ood", "split": "adaptation", "depth": 5,
                       "first_stage": {"kind": "scoreddocs"}}]},
    ]
    cfg["evaluation"]["out_of_domain"] = [{"dataset": f"irds:{PREFIX}/ood", "name": "ood-test", "split": "test",
                                           "depth": 5, "first_stage": {"kind": "scoreddocs"}}]
    return cfg


def test_unjudged_students_train_on_extra_queries_without_their_qrels(tiny_model, collection, tmp_path,  # noqa: F811
                                                                     monkeypatch):
    seen = {}
    original = experiment_module.DistillationTrainer

    class Recording(original):
        def fit(self, tr_res, tr_qrels, *args, **kwargs):
            seen[self.output_dir.parent.parent.name] = (set(tr_res["qid"]), set(tr_qrels["qid"]), self.unjudged)
            return super().fit(tr_res, tr_qrels, *args, **kwargs)

    monkeypatch.setattr(experiment_module, "DistillationTrainer", Recording)
    cfg = unjudged_config(tiny_model, collection)
    result = run_experiment(copy.deepcopy(cfg), tmp_path, verbose=False)

    judged, judged_qrels, policy = seen["bert-small"]
    assert len(judged) == 6 and judged == judged_qrels and policy == "skip"
    extra, qrels, policy = seen["bert-small+u"]
    added = extra - judged
    assert policy == "distil" and qrels == judged  # the added queries' qrels never reach the trainer
    assert len(added) == 5 and all(q.startswith(f"irds:{PREFIX}/train#") for q in added)
    assert not {q.split("#")[1] for q in added} & judged  # disjoint from the judged training queries
    ood, _, _ = seen["bert-small+ood"]
    halves = {experiment_data.half_of(q.split("#")[1]) for q in ood - judged}
    assert halves == {"adaptation"}
    # evaluation sees the test half only
    test_qids = set(result.collections[-1].perquery["qid"])
    assert test_qids and {experiment_data.half_of(q) for q in test_qids} == {"test"}
    # the report compares each unjudged student with its base student's CL and KD runs
    for objective in ("cl", "kd"):
        table = (tmp_path / "tables" / f"unjudged_vs_{objective}.csv").read_text()
        assert "bert-small+u," in table and "bert-small+ood," in table
    report = (tmp_path / "report.md").read_text()
    assert "KD with unjudged queries − the base student's KD" in report
    assert (tmp_path / "plots" / "unjudged_vs_kd.png").is_file()
    # the curve counts the unjudged queries the trainer got (5 sampled from the training dataset), not the config's
    curve = pd.read_csv(tmp_path / "tables" / "unjudged_curve.csv").set_index(["system", "in_domain"])
    groups = json.loads((tmp_path / "students" / "bert-small+u" / "KD" / "seed-1" / "done.json").read_text())
    assert curve.loc[("bert-small+u KD", True), "unjudged queries"] == groups["groups"]["unjudged"] == 5
    assert curve.loc[("bert-small+ood KD", True), "kind"] == reporting.OTHER_DATA
    assert curve.loc[("bert-small KD", True), "unjudged queries"] == 0
    assert (tmp_path / "plots" / "unjudged_curve.png").is_file() and "against unjudged training queries" in report


def test_larger_unjudged_samples_hold_the_smaller_ones(collection):  # noqa: F811
    data = Data(dataset=f"irds:{PREFIX}/train", queries=3)
    small = experiment_data.unjudged_topics(data, 0, exclude=["train0"])
    large = experiment_data.unjudged_topics(Data(dataset=data.dataset, queries=8), 0, exclude=["train0"])
    assert set(small["qid"]) < set(large["qid"]) and "train0" not in set(large["qid"])


def test_splits_are_stable_halves(collection):  # noqa: F811
    halves = {s: set(experiment_data.topics(Data(dataset=f"irds:{PREFIX}/ood", split=s))["qid"])
              for s in ("adaptation", "test")}
    everything = set(experiment_data.topics(Data(dataset=f"irds:{PREFIX}/ood"))["qid"])
    assert halves["adaptation"] and halves["test"] and not halves["adaptation"] & halves["test"]
    assert halves["adaptation"] | halves["test"] == everything
    # pinned (issue 23, item 9): a query never changes halves between versions, runs or machines, or an earlier
    # run's adaptation queries would turn up among a later run's test queries
    assert halves == {"adaptation": {"ood1", "ood3"}, "test": {"ood0", "ood2", "ood4", "ood5"}}
    assert [experiment_data.half_of(q) for q in ("q1", "12345", "PLAIN-1")] == ["adaptation", "test", "test"]
    # nor between processes with other hash seeds (Python's own hash() of a str would differ)
    qids = [f"query-{i}" for i in range(200)]
    code = ("import json, sys; from pyterrier_kdcl.experiment.data import half_of; "
            "print(json.dumps([half_of(q) for q in sys.argv[1:]]))")
    other = subprocess.run([sys.executable, "-c", code, *qids], env={**os.environ, "PYTHONHASHSEED": "12345"},
                           capture_output=True, text=True, check=True)
    mine = [experiment_data.half_of(q) for q in qids]
    assert json.loads(other.stdout) == mine
    assert 80 < mine.count("test") < 120  # halves, roughly


def test_every_key_at_its_default_names_the_student_too(tiny_model, collection, tmp_path):  # noqa: F811
    """Identities are values: a student's spec holds every key, at its default too, except those declared not to
    change results (``base`` only picks what reports compare)."""
    cfg = load_config(unjudged_config(tiny_model, collection))
    runner = ExperimentRunner(cfg, tmp_path, verbose=False)
    base, variant = cfg.students[0], cfg.students[1]
    spec = runner.student_spec(base, "KD", 1, "teacher")
    settings = spec.canonical()
    assert settings["student"]["unjudged"] == [] and "base" not in settings["student"]
    assert settings["train"]["split"] is None and settings["training"]["head_learning_rate"] is None
    assert runner.student_spec(variant, "KD", 1, "teacher").canonical()["student"]["unjudged"][0]["queries"] == 5
    cfg.students[0].training.head_learning_rate = 1e-2  # given, it names another stage
    again = runner.student_spec(base, "KD", 1, "teacher")
    assert again.canonical()["training"]["head_learning_rate"] == 1e-2
    assert again.fingerprint() != spec.fingerprint()


@pytest.mark.parametrize("change, message", [
    (lambda s: s[1].update(objectives=["CL", "KD"]), "students\\[1\\].unjudged: contrastive learning needs a judged"),
    (lambda s: s[1].update(base="nobody"), "students\\[1\\].base: 'nobody' is not another student"),
    (lambda s: s[2].update(base="bert-small+u"), "students\\[2\\].base: 'bert-small\\+u' trains on unjudged"),
    (lambda s: s[1]["unjudged"][0].update(split="half"), "students\\[1\\].unjudged\\[0\\].split"),
    # the evaluation queries themselves (issue 23 item 14): the same dataset, unless in complementary halves
    (lambda s: s[2]["unjudged"][0].pop("split"), "students\\[2\\].unjudged\\[0\\]: 'irds:.*/ood' is evaluated "
     "too \\(evaluation.out_of_domain\\[0\\]\\).*give them complementary halves \\(split: adaptation in "
     "students\\[2\\].unjudged\\[0\\], split: test in evaluation.out_of_domain\\[0\\]\\)"),
    (lambda s: s[2]["unjudged"][0].update(split="test"), "students\\[2\\].unjudged\\[0\\]: .* is evaluated too"),
    (lambda s: s[1]["unjudged"][0].update(dataset=f"irds:{PREFIX}/test"),
     "students\\[1\\].unjudged\\[0\\]: .* is evaluated too \\(evaluation.in_domain\\[0\\]\\)"),
])
def test_unjudged_config_errors_say_what_to_do(tiny_model, collection, change, message):  # noqa: F811
    cfg = unjudged_config(tiny_model, collection)
    change(cfg["students"])
    with pytest.raises(ConfigError, match=message):
        load_config(cfg)


def _per_query(systems: dict[str, list[float]], label: str, qids: list[str]) -> pd.DataFrame:
    return pd.DataFrame([{"name": name, "qid": q, "measure": "nDCG@10", "value": v}
                         for name, values in systems.items() for q, v in zip(qids, values)])


def test_unjudged_curve_points_are_seed_means_with_seed_aware_intervals(tiny_model, collection, tmp_path):  # noqa: F811
    cfg = unjudged_config(tiny_model, collection)
    cfg["seeds"] = [1, 2]
    cfg = load_config(cfg)
    models = [experiment_module.TrainedModel(f"{student}-KD-s{seed}", "student", "KD", seed, "fp", student=student,
                                             groups={"unjudged": unjudged})
              for student, seen in (("bert-small", [0, 0]), ("bert-small+u", [5, 7]), ("bert-small+ood", [3, 3]))
              for seed, unjudged in zip((1, 2), seen)]
    counts = reporting.unjudged_counts(cfg, models)
    assert counts == {"bert-small+u": 6.0, "bert-small+ood": 3.0}  # the group statistics, averaged over seeds

    rng = np.random.default_rng(0)
    qids = {"in": [f"i{k}" for k in range(6)], "o1": [f"a{k}" for k in range(4)], "o2": [f"b{k}" for k in range(5)]}
    values = {label: {name: rng.uniform(0, 1, len(q)).tolist() for name in
                      ("BM25", "teacher", "bert-small-CL-s1", "bert-small-CL-s2", "bert-small-KD-s1",
                       "bert-small-KD-s2", "bert-small+u-KD-s1", "bert-small+u-KD-s2", "bert-small+ood-KD-s1",
                       "bert-small+ood-KD-s2")} for label, q in qids.items()}
    collections = [experiment_module.CollectionResult(label, label == "in", pd.DataFrame(),
                                                      _per_query(values[label], label, q), len(q), 5, 0.0)
                   for label, q in qids.items()]
    curve = reporting.unjudged_curve_table(cfg, collections, counts)
    low, high = reporting._curve_interval(cfg)

    def seed_mean(student: str, labels: list[str]) -> np.ndarray:
        return np.concatenate([(np.array(values[c][f"{student}-KD-s1"]) + np.array(values[c][f"{student}-KD-s2"])) / 2
                               for c in labels])

    for in_domain, labels in ((True, ["in"]), (False, ["o1", "o2"])):
        rows = curve[curve["in_domain"] == in_domain].set_index("system")
        assert list(rows.index) == ["bert-small KD", "bert-small+u KD", "bert-small+ood KD", "bert-small CL",
                                    "teacher", "BM25"]
        assert rows["unjudged queries"].iloc[:3].tolist() == [0.0, 6.0, 3.0]
        assert rows["kind"].iloc[:3].tolist() == ["KD (base)", reporting.UNJUDGED, reporting.OTHER_DATA]
        base, extra = seed_mean("bert-small", labels), seed_mean("bert-small+u", labels)
        assert rows.loc["bert-small KD", "nDCG@10"] == pytest.approx(base.mean())
        assert rows.loc["bert-small+u KD", "nDCG@10"] == pytest.approx(extra.mean())

        def runs(student: str, labels=labels) -> np.ndarray:  # seeds × pooled queries
            return np.vstack([np.concatenate([values[c][f"{student}-KD-s{s}"] for c in labels]) for s in (1, 2)])

        c = seed_aware.crossed(runs("bert-small"), runs("bert-small+u"), alpha=0.05)  # the seed-aware interval
        assert rows.loc["bert-small+u KD", low] == pytest.approx(base.mean() + c.ci_low)
        assert rows.loc["bert-small+u KD", high] == pytest.approx(base.mean() + c.ci_high)
        assert rows.loc["bert-small KD", low] == rows.loc["bert-small KD", high] == pytest.approx(base.mean())
        teacher = np.concatenate([values[c]["teacher"] for c in labels])
        assert rows.loc["teacher", "nDCG@10"] == pytest.approx(teacher.mean())
    assert reporting.plot_unjudged_curve(cfg, curve, tmp_path / "curve.png").is_file()
