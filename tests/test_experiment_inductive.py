"""Inductive adaptation (issue 22): ``exclude_test_documents`` on a student's unjudged adaptation half keeps the
evaluated test half's documents out of the candidates it trains on; the excluded set, the training frame, the
recorded counts, the fingerprints and the config checks."""

from __future__ import annotations

import copy
import json

import pandas as pd
import pytest
from test_experiment import PREFIX, _data_dir, _fast_cpu, collection, tiny_config  # noqa: F401 — fixtures
from test_experiment_unjudged import unjudged_config

from pyterrier_kdcl.experiment import ExperimentRunner, run_experiment
from pyterrier_kdcl.experiment import data as experiment_data
from pyterrier_kdcl.experiment import runner as experiment_module
from pyterrier_kdcl.experiment.config import ConfigError, evaluated_test_halves, load_config

OOD = f"irds:{PREFIX}/ood"


@pytest.fixture(scope="module")
def shared_run(collection, tmp_path_factory):  # noqa: F811 — the fixture
    """The ood queries' first-stage run, where each adaptation query also finds three test-half answers among its
    top 8 (as the FAQs' adaptation candidates hold their test answers): ``(path, frame)``."""
    names = ["qid", "q0", "docno", "rank", "score", "tag"]
    run = pd.read_csv(collection / "ood.run", sep=" ", header=None, names=names)
    answers = _qrels(collection)
    answers = sorted(answers.loc[answers["qid"].map(experiment_data.half_of) == "test", "docno"])[:3]
    shared = [{"qid": q, "q0": "Q0", "docno": d, "rank": 0, "score": 9.5 - k, "tag": "shared"}
              for q in sorted(set(run["qid"])) if experiment_data.half_of(q) == "adaptation"
              for k, d in enumerate(answers)]
    run = pd.concat([run, pd.DataFrame(shared, columns=names)], ignore_index=True)
    run = run.sort_values(["qid", "score"], ascending=[True, False], kind="stable")
    run["rank"] = run.groupby("qid").cumcount() + 1
    path = tmp_path_factory.mktemp("inductive") / "ood-shared.run"
    run.to_csv(path, sep=" ", header=False, index=False)
    return path, run


def _qrels(root) -> pd.DataFrame:
    return pd.read_csv(root / "ood.qrels", sep=" ", header=None, names=["qid", "it", "docno", "label"])


def inductive_config(tiny_model, collection, run_path) -> dict:  # noqa: F811 — the fixture
    """unjudged_config's transductive ``+ood`` student on the shared run, and beside it the same adaptation half
    made inductive both ways."""
    cfg = unjudged_config(tiny_model, collection)
    fs = {"kind": "run", "path": str(run_path)}
    transductive = {**cfg["students"][2], "unjudged": [{"dataset": OOD, "split": "adaptation", "depth": 8,
                                                        "first_stage": fs}]}
    transductive.pop("base")
    cfg["students"] = [transductive]
    for kind in ("judged", "candidates"):
        student = copy.deepcopy(transductive)
        student["name"] = f"bert-small+ood-{kind}"
        student["unjudged"][0]["exclude_test_documents"] = kind
        cfg["students"].append(student)
    cfg["evaluation"]["out_of_domain"][0]["first_stage"] = fs
    return cfg


def _expected_test_documents(root, run: pd.DataFrame, kind: str, depth: int = 5) -> set[str]:
    """Read from the files: the test half's judged documents, or its first-stage top ``depth``."""
    frame = _qrels(root) if kind == "judged" else run.groupby("qid").head(depth)
    return set(frame.loc[frame["qid"].map(experiment_data.half_of) == "test", "docno"])


def test_the_excluded_documents_are_the_evaluated_test_halfs(tiny_model, collection, shared_run,  # noqa: F811
                                                              tmp_path):
    cfg = load_config(inductive_config(tiny_model, collection, shared_run[0]))
    runner = ExperimentRunner(cfg, tmp_path, verbose=False)
    for student, kind in zip(cfg.students[1:], ("judged", "candidates")):
        data = student.unjudged[0]
        assert [d.name for d in evaluated_test_halves(cfg, data)] == ["ood-test"]  # same dataset, the test half
        expected = _expected_test_documents(collection, shared_run[1], kind)
        assert runner.excluded_documents(data) == expected and len(expected) >= 4
    # the transductive candidates do hold test documents: the exclusion below is not vacuous
    adaptation = runner.unjudged_candidates(cfg.students[0].unjudged)
    assert len(set(adaptation["docno"]) & _expected_test_documents(collection, shared_run[1], "judged")) == 3


def test_the_inductive_student_never_trains_on_a_test_document(tiny_model, collection, shared_run,  # noqa: F811
                                                               tmp_path, monkeypatch):
    seen = {}
    original = experiment_module.DistillationTrainer

    class Recording(original):
        def fit(self, tr_res, tr_qrels, *args, **kwargs):
            seen[self.output_dir.parent.parent.name] = tr_res.copy()
            return super().fit(tr_res, tr_qrels, *args, **kwargs)

    monkeypatch.setattr(experiment_module, "DistillationTrainer", Recording)
    cfg = inductive_config(tiny_model, collection, shared_run[0])
    run_experiment(copy.deepcopy(cfg), tmp_path, verbose=False)

    def adaptation_rows(name: str) -> pd.DataFrame:
        res = seen[name]
        return res[res["qid"].astype(str).str.startswith(f"{OOD}#")]

    transductive = adaptation_rows("bert-small+ood")
    for kind in ("judged", "candidates"):
        name, test_docs = f"bert-small+ood-{kind}", _expected_test_documents(collection, shared_run[1], kind)
        rows = adaptation_rows(name)
        assert not set(rows["docno"]) & test_docs  # no training candidate is a test document
        judged = seen[name][~seen[name]["qid"].astype(str).str.startswith(f"{OOD}#")]
        assert len(judged) == len(seen["bert-small+ood"]) - len(transductive)  # the judged queries untouched
        # the counts the stage recorded, against the transductive student's candidates
        dropped = transductive[transductive["docno"].isin(test_docs)]
        groups = json.loads((tmp_path / "students" / name / "KD" / "seed-1" / "done.json").read_text())["groups"]
        assert groups["excluded_test_documents"] == {OOD: {
            "kind": kind, "test_documents": len(test_docs), "candidates": len(dropped),
            "documents": dropped["docno"].nunique(),
            "queries_emptied": transductive["qid"].nunique() - rows["qid"].nunique()}}
        assert len(rows) == len(transductive) - len(dropped) and len(dropped) > 0
    plain = json.loads((tmp_path / "students" / "bert-small+ood" / "KD" / "seed-1" / "done.json").read_text())
    assert "excluded_test_documents" not in plain["groups"]  # a transductive stage's record keeps its shape


def test_the_option_names_the_student_and_its_default_names_nothing(tiny_model, collection, shared_run,  # noqa: F811
                                                                   tmp_path):
    cfg = load_config(inductive_config(tiny_model, collection, shared_run[0]))
    runner = ExperimentRunner(cfg, tmp_path, verbose=False)
    transductive, judged, candidates = cfg.students

    def student_print(spec, config=cfg) -> str:
        r = ExperimentRunner(config, tmp_path, verbose=False)
        return r.student_spec(spec, "KD", 1, "teacher").fingerprint()

    # unset, it is part of the student's identity at its default (every field is), with no test collection
    plain = runner.student_spec(transductive, "KD", 1, "teacher").canonical()
    assert plain["student"]["unjudged"][0]["exclude_test_documents"] is None and plain["test_halves"] == []
    # set, it names the student, with the test collections whose documents it leaves out
    prints = {student_print(s) for s in cfg.students}
    assert len(prints) == 3
    spec = runner.student_spec(judged, "KD", 1, "teacher")
    assert spec.canonical()["student"]["unjudged"][0]["exclude_test_documents"] == "judged"
    assert spec.test_halves == [cfg.evaluation.out_of_domain[0]]
    # another evaluation sample of the test half leaves out other documents: the inductive students train anew
    raw = inductive_config(tiny_model, collection, shared_run[0])
    raw["evaluation"]["out_of_domain"][0]["queries"] = 2
    other = load_config(raw)
    assert student_print(other.students[0], other) == student_print(transductive)
    assert student_print(other.students[1], other) != student_print(judged)


@pytest.mark.parametrize("change, message", [
    (lambda c: c["train"].update(exclude_test_documents="judged"),
     "train.exclude_test_documents: .* it belongs under students\\[i\\].unjudged"),
    (lambda c: c["evaluation"]["out_of_domain"][0].update(exclude_test_documents="judged"),
     "evaluation.out_of_domain\\[0\\].exclude_test_documents: .* belongs under students\\[i\\].unjudged"),
    (lambda c: c["students"][1]["unjudged"][0].update(exclude_test_documents="answers"),
     "students\\[1\\].unjudged\\[0\\].exclude_test_documents: expected one of 'judged', 'candidates'"),
    (lambda c: c["students"][1]["unjudged"][0].update(dataset=f"irds:{PREFIX}/train", split=None),
     "students\\[1\\].unjudged\\[0\\].exclude_test_documents: needs `split: adaptation`"),
    (lambda c: c["evaluation"]["out_of_domain"].clear(),
     "students\\[1\\].unjudged\\[0\\].exclude_test_documents: no evaluation collection takes 'irds:.*/ood' with "
     "`split: test`"),
])
def test_inductive_config_errors_say_what_to_do(tiny_model, collection, shared_run, change, message):  # noqa: F811
    cfg = inductive_config(tiny_model, collection, shared_run[0])
    change(cfg)
    with pytest.raises(ConfigError, match=message):
        load_config(cfg)
