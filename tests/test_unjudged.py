"""Distillation beyond labels: queries without qrels become groups of first-stage candidates that the teacher
alone scores; contrastive learning refuses them."""

import pandas as pd
import pytest
from training_data import CountingTeacher, training_frames

import pyterrier_kdcl as kdcl
from pyterrier_kdcl.training.dev_metrics import Validator
from pyterrier_kdcl.training.groups import GroupSampler

pytestmark = pytest.mark.usefixtures("one_thread")


def student(tiny_model):
    return kdcl.CrossEncoder(tiny_model("bert"), verbose=False, max_length=32)


def no_qrels():
    return pd.DataFrame({"qid": [], "docno": [], "label": []})


def test_a_tiny_model_learns_from_teacher_scores_alone(tiny_model):
    res, qrels = training_frames()
    ce = student(tiny_model)
    before = Validator(ce, res, qrels, "RR@10").evaluate()
    trainer = kdcl.DistillationTrainer(ce, CountingTeacher(), group_size=4, epochs=4, batch_size=4,
                                       learning_rate=5e-3, unjudged="distil", verbose=False)
    log = trainer.fit(res, no_qrels())  # not one judgment: every group comes from the candidates alone
    assert trainer.group_stats.unjudged == trainer.group_stats.usable == 24
    assert log["loss"].iloc[-6:].mean() < log["loss"].iloc[:6].mean()
    # the qrels, never seen in training, say the student now finds the teacher's favourite
    assert Validator(ce, res, qrels, "RR@10").evaluate() > max(0.8, before + 0.2)


def test_unjudged_groups_are_candidates_only_and_identical_across_runs():
    res, qrels = training_frames(8)
    judged = qrels[qrels["qid"].isin(["q0", "q1", "q2"])]  # q3..q7 have no qrels
    runs = [list(GroupSampler(frame, judged, group_size=4, seed=3, unjudged="distil").epoch(1))
            for frame in (res, res.sample(frac=1, random_state=1))]  # row order must not matter
    assert runs[0] == runs[1]
    by_qid = {g.qid: g for g in runs[0]}
    assert sorted(by_qid) == [f"q{i}" for i in range(8)]
    for qid, group in by_qid.items():
        assert group.judged == (qid in {"q0", "q1", "q2"})
        assert group.labels == ((1, 0, 0, 0) if group.judged else (0, 0, 0, 0))
        assert len(set(group.docnos)) == 4 and all(d.startswith(f"d{qid[1:]}-") for d in group.docnos)
    # another seed draws other groups
    other = {g.qid: g for g in GroupSampler(res, judged, group_size=4, seed=4, unjudged="distil").epoch(1)}
    assert any(other[q].docnos != by_qid[q].docnos for q in by_qid if not by_qid[q].judged)


def test_judged_groups_are_unchanged_by_the_unjudged_option():
    res, qrels = training_frames(8)
    skip = list(GroupSampler(res, qrels, group_size=4, seed=3).epoch(0))
    distil = list(GroupSampler(res, qrels, group_size=4, seed=3, unjudged="distil").epoch(0))
    assert skip == distil  # every query judged: the option changes nothing


def test_unjudged_queries_are_skipped_unless_asked_for_and_the_window_applies():
    res, qrels = training_frames(8)
    judged = qrels[qrels["qid"].isin(["q0", "q1"])]
    skipped = GroupSampler(res, judged, group_size=4, seed=0)
    assert len(skipped) == 2 and skipped.stats.unjudged == 6 and skipped.stats.no_positive == 6
    windowed = GroupSampler(res, judged, group_size=3, seed=0, negatives_window=(2, 5), unjudged="distil")
    ranks = dict(zip(res["docno"], res["rank"]))
    for group in windowed.epoch(0):
        if not group.judged:
            assert all(2 <= ranks[d] < 5 for d in group.docnos)
    # a query with qrels but no positive among its candidates stays skipped: it is judged, not unjudged
    missed = pd.DataFrame({"qid": ["q0"], "docno": ["elsewhere"], "label": [1]})
    sampler = GroupSampler(res, missed, group_size=4, seed=0, unjudged="distil")
    assert "q0" not in {g.qid for g in sampler.epoch(0)} and len(sampler) == 7


def test_labelled_and_unjudged_groups_mix_in_one_fit_and_are_scored_once(tiny_model, tmp_path):
    res, qrels = training_frames(8)
    judged = qrels[qrels["qid"].isin(["q0", "q1", "q2", "q3"])]
    teacher = CountingTeacher()
    options = {"group_size": 4, "batch_size": 4, "verbose": False, "unjudged": "distil",
               "teacher_cache": tmp_path / "cache", "teacher_cache_key": "counting teacher"}
    trainer = kdcl.DistillationTrainer(student(tiny_model), teacher, **options)
    trainer.fit(res, judged)
    assert trainer.group_stats.usable == 8 and trainer.group_stats.unjudged == 4
    assert teacher.rows == 8 * 4
    kdcl.DistillationTrainer(student(tiny_model), teacher, **options).fit(res, judged)
    assert teacher.rows == 8 * 4  # the second fit reads every score from the cache


@pytest.mark.parametrize("make", [
    lambda ce: kdcl.ContrastiveTrainer(ce, unjudged="distil"),
    lambda ce: kdcl.RerankerTrainer(ce, kdcl.losses.MarginMSE(), teacher=CountingTeacher(), unjudged="distil"),
], ids=["contrastive", "margin-mse"])
def test_losses_that_read_labels_refuse_unjudged_groups(tiny_model, make):
    with pytest.raises(ValueError, match="unjudged='distil'.*reads relevance labels"):
        make(student(tiny_model))


def test_a_ranking_loss_on_teacher_scores_accepts_unjudged_groups(tiny_model):
    res, _ = training_frames(4)
    trainer = kdcl.RerankerTrainer(student(tiny_model), kdcl.losses.ListNet(target="teacher_scores"),
                                   teacher=CountingTeacher(), group_size=4, unjudged="distil", verbose=False)
    log = trainer.fit(res, no_qrels())
    assert len(log) == 1 and trainer.group_stats.unjudged == 4


def test_an_unknown_unjudged_policy_is_refused():
    res, qrels = training_frames(2)
    with pytest.raises(ValueError, match="unjudged must be one of"):
        GroupSampler(res, qrels, unjudged="label")
