"""ScoreFusion (a teacher built from existing scorers) and the fitted teacher temperature."""

import numpy as np
import pandas as pd
import pyterrier as pt
import pytest

from pyterrier_kdcl.fusion import ScoreFusion
from pyterrier_kdcl.training.temperature import fit_temperature


def _candidates(n_queries=12, depth=6, seed=0):
    rng = np.random.default_rng(seed)
    rows, qrels = [], []
    for q in range(n_queries):
        relevant = int(rng.integers(depth))
        for d in range(depth):
            rows.append({"qid": f"q{q}", "query": f"query {q}", "docno": f"d{q}-{d}", "text": f"t{d}",
                         "truth": float(d == relevant)})
        qrels.append({"qid": f"q{q}", "docno": f"d{q}-{relevant}", "label": 1})
    return pd.DataFrame(rows), pd.DataFrame(qrels)


def _scorer(fn):
    return pt.apply.score(lambda row: fn(row))


def _members():
    rng = np.random.default_rng(1)
    noise = {}

    def noisy(row):  # a useless scorer on a large scale
        return noise.setdefault(row["docno"], float(rng.normal(scale=50.0)))

    # the informative scorer: the truth plus a small tie-break that is the same in every process (no str hash)
    return {"good": _scorer(lambda row: 0.9 * row["truth"] + 0.1 * (int(row["docno"].split("-")[1]) % 7) / 7),
            "noise": _scorer(noisy)}


def test_fit_puts_the_weight_on_the_informative_scorer_whatever_its_scale():
    res, qrels = _candidates(n_queries=60)
    fusion = ScoreFusion(_members(), grid_step=0.25)
    grid = fusion.fit(res, qrels)
    best = grid.loc[grid["nDCG@10"].idxmax()]
    assert fusion.weights == {"good": best["good"], "noise": best["noise"]}  # the grid's (first) best point
    assert fusion.weights["good"] >= 0.75 and best["nDCG@10"] == pytest.approx(1.0)
    assert grid.loc[grid["good"] == 0.0, "nDCG@10"].item() < 0.6  # the noise alone ranks badly
    assert len(grid) == 5  # 0, .25, .5, .75, 1 for two members
    assert fusion.stats["noise"][1] > 10 * fusion.stats["good"][1]  # scales were measured, not assumed


def test_a_rows_fused_score_does_not_depend_on_the_rows_beside_it():
    res, qrels = _candidates()
    fusion = ScoreFusion(_members(), grid_step=0.5)
    fusion.fit(res, qrels)
    whole = fusion(res).set_index("docno")["score"]
    alone = pd.concat([fusion(res.iloc[[i]]) for i in (0, 7, 20)]).set_index("docno")["score"]
    np.testing.assert_allclose(alone.to_numpy(), whole.loc[alone.index].to_numpy(), rtol=1e-12)


def test_unfitted_fusion_says_what_to_do_and_empty_input_works_once_fitted():
    res, qrels = _candidates()
    fusion = ScoreFusion(_members())
    with pytest.raises(RuntimeError, match="call fit"):
        fusion(res)
    fusion.fit(res, qrels)
    assert "score" in fusion(res.iloc[:0]).columns


def test_a_fusion_teacher_is_identified_by_its_members_and_what_it_fitted(tiny_model):
    import pyterrier_kdcl as kdcl
    from pyterrier_kdcl.training.teachers import teacher_identity

    cross = kdcl.CrossEncoder(tiny_model("bert"), verbose=False, device="cpu", max_length=32)
    stats = {"cross": (0, 1), "other": (0, 1)}
    fused = ScoreFusion({"cross": cross, "other": 2 * cross}, weights={"cross": 1.0, "other": 0.0}, stats=stats)
    reweighted = ScoreFusion({"cross": cross, "other": 2 * cross}, weights={"cross": 0.5, "other": 0.5}, stats=stats)
    assert teacher_identity(fused) and teacher_identity(fused) != teacher_identity(reweighted)
    unnamed = ScoreFusion({"cross": cross, "fn": _members()["good"]}, weights={"cross": 1, "fn": 0},
                          stats={"cross": (0, 1), "fn": (0, 1)})
    assert teacher_identity(unnamed) is None  # a pt.apply member has no identity: its scores need a named key


def test_a_grid_step_that_does_not_divide_one_is_refused():
    """It was rounded silently: 0.3 searched the grid of 1/3 (issue 23, item 13)."""
    with pytest.raises(ValueError, match=r"grid_step must divide 1 .* got 0.3: 1/0.3 = 3.333; use 1/n, for "
                                         r"example 0.5, 0.3333, 0.25"):
        ScoreFusion(_members(), grid_step=0.3)
    with pytest.raises(ValueError, match=r"grid_step must lie in \(0, 1\], got 0"):
        ScoreFusion(_members(), grid_step=0)
    for step in (1, 0.5, 0.1, 0.05, 0.01, 1 / 3):
        assert ScoreFusion(_members(), grid_step=step).grid_step == step


def test_fitted_temperature_recovers_the_temperature_that_generated_the_labels():
    rng = np.random.default_rng(0)
    for true_t in (0.05, 3.0):
        scores = rng.normal(size=(3000, 8))
        probabilities = np.exp(scores / true_t)
        probabilities /= probabilities.sum(axis=1, keepdims=True)
        labels = np.zeros_like(scores)
        labels[np.arange(len(scores)), [rng.choice(8, p=p) for p in probabilities]] = 1
        assert fit_temperature(scores, labels) == pytest.approx(true_t, rel=0.15)


def test_fitted_temperature_is_invariant_to_the_teachers_scale():
    rng = np.random.default_rng(1)
    scores = rng.normal(size=(500, 8))
    labels = (scores == scores.max(axis=1, keepdims=True)) & (rng.random((500, 1)) < 0.7)
    labels[:, 0] |= ~labels.any(axis=1)
    base = fit_temperature(scores, labels)
    assert fit_temperature(scores * 40, labels) == pytest.approx(40 * base, rel=1e-3)


def test_the_upper_bound_is_reached_exactly_by_a_teacher_no_better_than_uniform():
    """The docstring said "positive on top half the time ⇒ upper bound", true for groups of 2 only (issue 23,
    item 13): what decides is whether the positives score above their group's mean."""
    half_right_of_8 = np.array([[3.0, 0, 0, 0, 0, 0, 0, 0], [0, 3.0, 0, 0, 0, 0, 0, 0]])
    labels = np.zeros((2, 8), dtype=int)
    labels[:, 0] = 1  # on top in the first group, last-but-tied in the second: better than 1 in 8
    assert fit_temperature(half_right_of_8, labels) < 100
    below_the_mean = np.array([[1.0, 0, 0, 0], [-2.0, 0, 0, 0]])  # positives average -0.5 against means of -0.125
    assert fit_temperature(below_the_mean, np.eye(4, dtype=int)[[0, 0]]) == pytest.approx(1000, rel=1e-3)
    at_the_mean = np.array([[3.0, -1, -1, -1], [-3.0, 1, 1, 1]])  # positives average 0, as their groups do
    assert fit_temperature(at_the_mean, np.eye(4, dtype=int)[[0, 0]]) == pytest.approx(1000, rel=1e-3)


def test_fitted_temperature_refuses_groups_without_positives():
    with pytest.raises(ValueError, match="labelled positive"):
        fit_temperature(np.zeros((3, 4)), np.zeros((3, 4)))


def test_a_first_stage_member_fuses_the_score_the_candidates_arrived_with():
    from pyterrier_kdcl.fusion import FirstStageScore

    res, qrels = _candidates(n_queries=30)
    res["score"] = 5.0 * res["truth"] + 0.01 * res.index  # a first stage that finds every positive
    fusion = ScoreFusion({"first": FirstStageScore(), "noise": _members()["noise"]}, grid_step=0.5)
    fusion.fit(res, qrels)
    assert fusion.weights == {"first": 1.0, "noise": 0.0}
    assert fusion.stats["first"][0] == pytest.approx(res["score"].mean())  # the input's score, not another column
    fused = fusion(res)
    np.testing.assert_allclose(fused["score"], (res["score"] - fusion.stats["first"][0]) / fusion.stats["first"][1])
    with pytest.raises(ValueError, match="reads the candidates' first-stage score from a 'first_stage_score'"):
        FirstStageScore()(res.drop(columns="score"))


def test_groups_hand_the_teacher_their_first_stage_scores():
    from pyterrier_kdcl.fusion import FirstStageScore
    from pyterrier_kdcl.training.groups import GroupSampler
    from pyterrier_kdcl.training.teachers import TeacherScores

    res, qrels = _candidates(n_queries=4, depth=5)
    res["score"] = [float(100 * q + d) for q in range(4) for d in range(5)]
    res = res[~((res["qid"] == "q0") & (res["docno"] == qrels["docno"][0]))]  # the first stage missed q0's positive
    sampler = GroupSampler(res, qrels, group_size=3, seed=0, text_source={qrels["docno"][0]: "missed"})
    groups = list(sampler.epoch(0))
    lookup = dict(zip(res["docno"], res["score"]))
    for g in groups:
        expected = [lookup.get(d, res[res["qid"] == g.qid]["score"].min()) for d in g.docnos]
        assert g.first_stage_scores == tuple(expected)  # a missed positive: its query's lowest candidate score
    scores = TeacherScores(FirstStageScore(), None)
    scores.prepare(groups)
    np.testing.assert_allclose(scores.lookup(groups).numpy(), np.array([g.first_stage_scores for g in groups]))
    unscored = GroupSampler(res.drop(columns="score"), qrels, group_size=3, seed=0)
    assert next(unscored.epoch(0)).first_stage_scores is None


class _ScaledTeacher(pt.Transformer):
    """Scores 'answer' documents ``scale`` above the others: a sharp teacher, or a flat one at a small scale."""

    def __init__(self, scale: float):
        self.scale = scale

    def transform(self, inp):
        return inp.assign(score=[self.scale * (1.0 if "answer" in t else len(t) % 3 / 3) for t in inp["text"]])

    def fingerprint(self) -> str:
        return f"scaled {self.scale}"


def test_distillation_fits_teacher_temperature_auto_on_the_validation_frames(tiny_model):
    """``teacher_temperature="auto"`` worked in configs, not in Python ("could not convert string to float"; issue
    23, item 18)."""
    from training_data import training_frames

    import pyterrier_kdcl as kdcl
    from pyterrier_kdcl.training.temperature import fit_teacher_temperature

    res, qrels = training_frames(8)
    va_res, va_qrels = training_frames(4)
    ce = kdcl.CrossEncoder(tiny_model("bert"), verbose=False, max_length=32)
    teacher = _ScaledTeacher(5.0)
    options = {"group_size": 4, "batch_size": 4, "verbose": False}
    kd = kdcl.DistillationTrainer(ce, teacher, teacher_temperature="auto", **options)
    with pytest.raises(ValueError, match=r"teacher_temperature='auto' is fitted on the validation candidates: pass "
                                         r"them to fit\(tr_res, tr_qrels, va_res, va_qrels\)"):
        kd.fit(res, qrels)
    kd.fit(res, qrels, va_res, va_qrels)
    expected = fit_teacher_temperature(teacher, va_res, va_qrels)["temperature"]
    assert kd.loss.teacher_temperature == pytest.approx(expected) and kd.teacher_temperature == "auto"
    assert kd.fitted_teacher_temperature_["queries"] == 4 and expected != 1.0
    with pytest.raises(ValueError, match="teacher_temperature must be a finite number > 0, got 'hot'"):
        kdcl.DistillationTrainer(ce, teacher, teacher_temperature="hot")
    with pytest.raises(ValueError, match="got 'auto': 'auto' is DistillationTrainer"):
        kdcl.losses.KLDistillation(teacher_temperature="auto")


def test_a_nearly_uniform_teacher_target_is_warned_about(tiny_model):
    import warnings

    from training_data import training_frames

    import pyterrier_kdcl as kdcl

    res, qrels = training_frames(8)
    ce = kdcl.CrossEncoder(tiny_model("bert"), verbose=False, max_length=32)
    options = {"group_size": 4, "batch_size": 4, "verbose": False, "teacher_temperature": 2.0}
    with pytest.warns(UserWarning, match=r"softened by teacher_temperature=2 are nearly uniform over each group"):
        kdcl.DistillationTrainer(ce, _ScaledTeacher(0.01), **options).fit(res, qrels)  # cosines of one topic
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        kdcl.DistillationTrainer(ce, _ScaledTeacher(5.0), **options).fit(res, qrels)
