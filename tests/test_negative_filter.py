"""Teacher-filtered negatives (issue 26 item 5): a negative the teacher scores at or above the positive's score minus
a margin is dropped from the candidates, or relabelled positive; counted in the group statistics; CL and KD with
the same seed and filter still see the same groups; the experiment's key changes no earlier fingerprint."""

from __future__ import annotations

from types import SimpleNamespace

import pandas as pd
import pyterrier as pt
import pytest
from test_experiment import PREFIX, _data_dir, _fast_cpu, collection, tiny_config  # noqa: F401 — fixtures
from training_data import training_frames

import pyterrier_kdcl as kdcl
from pyterrier_kdcl.training import RerankerTrainer
from pyterrier_kdcl.training.groups import GroupSampler, NegativeFilter

# training_frames(): per query q, documents d{q}-0 … d{q}-7, the positive d{q}-5
POSITIVE, ABOVE, NEAR = 3.0, 5.0, 2.8  # the made-up teacher: -1 above the positive, -2 within 0.5 of it


def made_up_score(docno: str, flagged=lambda qid: True) -> float:
    qid, rank = docno[1:].split("-")
    if rank == "5":
        return POSITIVE
    if flagged(f"q{qid}") and rank in ("1", "2"):
        return ABOVE if rank == "1" else NEAR
    return 0.0


class MadeUpTeacher(pt.Transformer):
    """Scores by docno: the positive 3.0, the negative ranked 1 at 5.0 (above it), the one ranked 2 at 2.8."""

    def __init__(self):
        self.rows = 0

    def transform(self, inp):
        self.rows += len(inp)
        return inp.assign(score=[made_up_score(d) for d in inp["docno"]])

    def __repr__(self):
        return "MadeUpTeacher()"


def judge(flagged=lambda qid: True):
    return lambda group: [made_up_score(d, flagged) for d in group.docnos]


def epochs(sampler, n=10):
    return [g for e in range(n) for g in sampler.epoch(e)]


def has(group, rank: str) -> bool:
    return any(d.endswith(f"-{rank}") for d in group.docnos[1:])


# -- the group builder -----------------------------------------------------------------------------------------
def test_drop_removes_the_negatives_the_teacher_scores_above_the_positive():
    res, qrels = training_frames(6)
    sampler = GroupSampler(res, qrels, group_size=4, seed=1)
    sampler.filter_negatives({"margin": 0.0, "action": "drop"}, judge())
    groups = epochs(sampler)
    assert not any(has(g, "1") for g in groups)  # above the positive: never drawn
    assert any(has(g, "2") for g in groups)  # 0.2 below it: kept at margin 0
    assert all(len(set(g.docnos)) == 4 and g.labels == (1, 0, 0, 0) for g in groups)  # replaced, not shorter
    stats = sampler.stats
    assert stats.negative_filter == {"margin": 0.0, "action": "drop"}
    assert (stats.negatives_dropped, stats.queries_filtered, stats.negatives_relabelled, stats.usable) == (6, 6, 0, 6)

    within = GroupSampler(res, qrels, group_size=4, seed=1)
    within.filter_negatives(NegativeFilter(margin=0.5), judge())
    assert not any(has(g, "1") or has(g, "2") for g in epochs(within))
    assert within.stats.negatives_dropped == 12


def test_dropping_leaves_a_short_query_to_the_insufficient_rule():
    res, qrels = training_frames(6)  # 7 negatives a query; group_size 8 needs all of them
    even = lambda qid: int(qid[1:]) % 2 == 0  # noqa: E731 — the teacher flags the even queries only
    sampler = GroupSampler(res, qrels, group_size=8, seed=1)
    sampler.filter_negatives({"margin": 0.0}, judge(even))
    assert {g.qid for g in sampler.epoch(0)} == {"q1", "q3", "q5"}
    assert (sampler.stats.too_few_after_filter, sampler.stats.usable, sampler.stats.negatives_dropped) == (3, 3, 3)
    assert "3 with too few negatives once the teacher's suspects were dropped" in sampler.stats.explain()

    replaced = GroupSampler(res, qrels, group_size=8, seed=1, insufficient="replace")
    replaced.filter_negatives({"margin": 0.0}, judge(even))
    groups = epochs(replaced, 3)
    assert len(groups) == 18 and all(len(g.docnos) == 8 for g in groups)
    assert not any(has(g, "1") for g in groups if even(g.qid)) and all(has(g, "1") for g in groups if not even(g.qid))
    assert replaced.stats.sampled_with_replacement == 3

    nothing_left = GroupSampler(res, qrels, group_size=8, seed=1)
    with pytest.raises(ValueError, match="no training group is left once the teacher's suspect negatives are "
                                         "dropped: 6 training queries.*insufficient='replace'"):
        nothing_left.filter_negatives({"margin": 0.0}, judge())


def test_relabel_keeps_the_groups_and_labels_the_suspects_positive():
    res, qrels = training_frames(6)
    plain = epochs(GroupSampler(res, qrels, group_size=4, seed=3))
    sampler = GroupSampler(res, qrels, group_size=4, seed=3)
    sampler.filter_negatives({"margin": 0.5, "action": "relabel"}, judge())
    relabelled = epochs(sampler)
    assert [g.docnos for g in relabelled] == [g.docnos for g in plain]  # the same draws
    for g in relabelled:
        assert g.labels == tuple(int(i == 0 or d.endswith(("-1", "-2"))) for i, d in enumerate(g.docnos))
    assert any(sum(g.labels) > 1 for g in relabelled)
    stats = sampler.stats
    assert (stats.negatives_relabelled, stats.queries_filtered, stats.negatives_dropped) == (12, 6, 0)


def test_a_filter_that_flags_nothing_changes_no_group():
    res, qrels = training_frames(6)
    plain = GroupSampler(res, qrels, group_size=4, seed=5)
    sampler = GroupSampler(res, qrels, group_size=4, seed=5)
    sampler.filter_negatives({"margin": 1.0}, judge(lambda qid: False))
    assert epochs(sampler) == epochs(plain)
    assert (sampler.stats.queries_filtered, sampler.stats.negatives_dropped) == (0, 0)
    with pytest.raises(ValueError, match="filtered already"):
        sampler.filter_negatives({"margin": 1.0}, judge())


def test_each_positive_is_compared_with_the_negatives_of_its_own_groups():
    res = pd.DataFrame({"qid": "q", "query": "find it", "docno": ["A", "B", "N1", "N2", "N3"],
                        "text": ["a", "b", "n1", "n2", "n3"], "rank": range(5)})
    qrels = pd.DataFrame({"qid": "q", "docno": ["A", "B"], "label": 1})
    teacher = {"A": 5.0, "B": 1.0, "N1": 3.0, "N2": 0.0, "N3": 0.0}  # N1: below A, above B
    sampler = GroupSampler(res, qrels, group_size=2, seed=0)
    sampler.filter_negatives({"margin": 0.0}, lambda g: [teacher[d] for d in g.docnos])
    groups = epochs(sampler, 200)
    assert not any(g.docnos == ("B", "N1") for g in groups)
    assert any(g.docnos == ("A", "N1") for g in groups)  # a fair hard negative for A
    assert sampler.stats.negatives_dropped == 1


# -- the trainers ----------------------------------------------------------------------------------------------
def student(tiny_model):
    return kdcl.CrossEncoder(tiny_model("bert"), verbose=False, max_length=32)


@pytest.mark.parametrize("action", ["drop", "relabel"])
def test_cl_and_kd_with_the_same_filter_train_on_identical_groups(tiny_model, monkeypatch, action):
    res, qrels = training_frames(8)
    seen, targets = {}, {}
    original = RerankerTrainer._step

    def recording(self, model, optimizer, scheduler, params, step_batches, teacher, *args):
        name = type(self).__name__
        seen.setdefault(name, []).append([(g.qid, g.docnos, g.labels) for b in step_batches for g in b])
        targets.setdefault(name, set()).add(teacher is None)
        return original(self, model, optimizer, scheduler, params, step_batches, teacher, *args)

    monkeypatch.setattr(RerankerTrainer, "_step", recording)
    common = {"group_size": 4, "epochs": 2, "batch_size": 3, "seed": 7, "verbose": False,
              "negative_filter": {"margin": 0.0, "action": action}}
    teacher = MadeUpTeacher()
    cl = kdcl.ContrastiveTrainer(student(tiny_model), teacher=teacher, **common)
    cl.fit(res, qrels)
    assert teacher.rows == 8 * 8  # every candidate of every query, once, before the first epoch
    kd = kdcl.DistillationTrainer(student(tiny_model), MadeUpTeacher(), **common)
    kd.fit(res, qrels)
    assert seen["ContrastiveTrainer"] == seen["DistillationTrainer"]
    groups = [g for step in seen["ContrastiveTrainer"] for g in step]
    if action == "drop":
        assert not any(d.endswith("-1") for _, docnos, _ in groups for d in docnos)
        assert cl.group_stats.negatives_dropped == kd.group_stats.negatives_dropped == 8
    else:
        assert any(labels.count(1) == 2 for _, _, labels in groups)
        assert cl.group_stats.negatives_relabelled == 8
    # the teacher only judged CL's negatives: InfoNCE got no teacher scores, KD's loss did
    assert targets == {"ContrastiveTrainer": {True}, "DistillationTrainer": {False}}
    facts = cl.reranker.training_facts
    assert facts["objective"] == "contrastive" and "8 negatives of 8 queries" in facts["negative_filter"]
    assert kd.reranker.training_facts["objective"] == "distillation"


def test_negative_filter_errors_say_what_to_do(tiny_model):
    ce = student(tiny_model)
    with pytest.raises(ValueError, match="no teacher was given: pass teacher="):
        kdcl.ContrastiveTrainer(ce, negative_filter={"margin": 0.5})
    with pytest.raises(ValueError, match="margin must be a number >= 0"):
        kdcl.DistillationTrainer(ce, MadeUpTeacher(), negative_filter={"margin": -1.0})
    with pytest.raises(ValueError, match="action must be one of \\('drop', 'relabel'\\)"):
        kdcl.DistillationTrainer(ce, MadeUpTeacher(), negative_filter={"action": "flip"})
    with pytest.raises(ValueError, match="unknown keys \\['margn'\\]"):
        kdcl.DistillationTrainer(ce, MadeUpTeacher(), negative_filter={"margn": 1.0})
    with pytest.raises(TypeError, match="negative_filter must be None, a mapping"):
        kdcl.DistillationTrainer(ce, MadeUpTeacher(), negative_filter="drop")
    with pytest.raises(ValueError, match="reads no teacher scores.*negative_filter="):  # no filter: still refused
        kdcl.ContrastiveTrainer(ce, teacher=MadeUpTeacher())
    trainer = kdcl.ContrastiveTrainer(ce, teacher=MadeUpTeacher(), negative_filter={"margin": 1})
    assert trainer.negative_filter == NegativeFilter(1.0, "drop")


# -- the experiment --------------------------------------------------------------------------------------------
def test_the_experiment_key_changes_only_the_students_fingerprints(tiny_model, collection, monkeypatch):  # noqa: F811
    from test_experiment_fusion import test_existing_configs_keep_their_fingerprints as recorded

    from pyterrier_kdcl.experiment import ExperimentRunner
    from pyterrier_kdcl.experiment.config import load_config

    def prints(training=None):
        cfg = tiny_config(tiny_model, collection)
        cfg["training"].update(training or {})
        cfg = load_config(cfg, check_environment=False)
        runner = ExperimentRunner(cfg, "unused", verbose=False)
        teacher = runner.teacher_spec(cfg.teacher).fingerprint()
        return [teacher, *(runner.student_spec(cfg.students[0], o, 1, teacher).fingerprint() for o in ("CL", "KD"))]

    recorded()  # the recorded fingerprints hold
    plain = prints()
    assert prints({"negative_filter": None}) == plain
    drop = prints({"negative_filter": {"margin": 0.5}})
    assert drop[0] == plain[0] and drop[1] != plain[1] and drop[2] != plain[2]  # the teacher trains unfiltered
    assert prints({"negative_filter": {"margin": 0.5, "action": "drop"}}) == drop  # one canonical form
    assert prints({"negative_filter": {"margin": 0.5, "action": "relabel"}})[1:] != drop[1:]

    # a filtered CL stage is named by its teacher too, and its trainer gets the teacher
    cfg = tiny_config(tiny_model, collection)
    cfg["training"]["negative_filter"] = {"margin": 0.5, "action": "relabel"}
    cfg = load_config(cfg, check_environment=False)
    runner = ExperimentRunner(cfg, "unused", verbose=False)
    monkeypatch.setattr(runner, "_run_stage", lambda model, stage, spec, data, make: (stage, make))
    teacher_model = MadeUpTeacher()
    teachers = [SimpleNamespace(fingerprint=fp, loader=lambda: teacher_model) for fp in ("t1", "t2")]
    (one, make), (two, _) = (runner.student(cfg.students[0], "CL", 1, t) for t in teachers)
    assert one.fingerprint != two.fingerprint
    from pyterrier_kdcl.experiment import data as experiment_data

    monkeypatch.setattr(experiment_data, "text_stage", lambda data: None)
    trainer = make()
    assert isinstance(trainer, kdcl.ContrastiveTrainer) and trainer.teacher is teacher_model
    assert trainer.negative_filter == NegativeFilter(0.5, "relabel")
    assert runner._trainer_kwargs(cfg.teacher, 1, one, cfg.train)["negative_filter"] is None

    from pyterrier_kdcl.experiment.plan import plan  # --check counts the teacher's scoring of every candidate

    assert "teacher scores of every training candidate for negative_filter" in plan(cfg)
    assert "teacher scores for distillation" not in plan(cfg)  # the KD groups are among those candidates


@pytest.mark.parametrize("training, message", [
    ({"negative_filter": {"margin": -0.5}}, r"training.negative_filter.margin: must be a number >= 0"),
    ({"negative_filter": {"action": "flip"}}, r"training.negative_filter.action: expected one of 'drop', 'relabel'"),
    ({"negative_filter": {"margn": 1}}, r"training.negative_filter.margn: unknown key"),
    ({"negative_filter": "drop"}, r"training.negative_filter: expected a mapping, got .drop."),
])
def test_negative_filter_config_errors(tiny_model, collection, training, message):  # noqa: F811
    from pyterrier_kdcl.experiment.config import ConfigError, load_config

    cfg = tiny_config(tiny_model, collection)
    cfg["training"].update(training)
    with pytest.raises(ConfigError, match=message):
        load_config(cfg, check_environment=False)


def test_a_teacher_cannot_filter_its_own_negatives(tiny_model, collection):  # noqa: F811
    from pyterrier_kdcl.experiment.config import ConfigError, load_config

    cfg = tiny_config(tiny_model, collection)
    cfg["teacher"]["training"]["negative_filter"] = {"margin": 0.5}
    with pytest.raises(ConfigError, match=r"teacher.training.negative_filter: the teacher's negatives are filtered"):
        load_config(cfg, check_environment=False)


def test_the_training_table_shows_what_the_filter_did():
    from pyterrier_kdcl.experiment.report import _filtered

    groups = {"negative_filter": {"margin": 0.5, "action": "drop"}, "negatives_dropped": 12,
              "negatives_relabelled": 0, "queries_filtered": 5}
    filtered = SimpleNamespace(groups=groups)
    teacher = SimpleNamespace(groups={"queries": 10})
    assert _filtered(teacher, [teacher]) == {}  # no filter anywhere: the table keeps its columns
    assert _filtered(filtered, [teacher, filtered]) == {"negative filter": "drop, margin 0.5",
                                                        "suspect negatives": 12, "queries filtered": 5}
    assert _filtered(teacher, [teacher, filtered])["negative filter"] == ""
