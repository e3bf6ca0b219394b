"""Reliability: bad training data, validation data and teachers stop before training with a message that explains.

Already covered elsewhere (see docs/reliability.md): topics instead of result frames, qrels matching nothing,
a distillation loss without a teacher, resume without output_dir (test_training.py::
test_errors_before_training_starts); a reordering teacher (test_training.py::
test_teacher_rows_are_joined_by_qid_and_docno_not_position); a NaN loss naming step and queries
(test_training.py::test_a_nan_loss_stops_with_the_step_and_queries).
"""

import json

import numpy as np
import pandas as pd
import pyterrier as pt
import pytest
import torch
from safetensors.torch import load_file
from training_data import training_frames

import pyterrier_kdcl as kdcl
from pyterrier_kdcl.training import RerankerTrainer
from pyterrier_kdcl.training.groups import GroupSampler
from pyterrier_kdcl.training.teachers import CheckedTeacher, TeacherScores

pytestmark = pytest.mark.usefixtures("one_thread")  # conftest.py


@pytest.fixture(scope="module")
def ce(tiny_model):
    return kdcl.CrossEncoder(tiny_model("bert"), verbose=False, max_length=32)


def fit(ce, res, qrels, *args, **options):
    options = {"group_size": 4, "batch_size": 4, "verbose": False, **options}
    return kdcl.ContrastiveTrainer(ce, **options).fit(res, qrels, *args)


def weights(ce):
    return {k: v.clone() for k, v in ce.ranker.state_dict().items()}


# -- qrels ---------------------------------------------------------------------------------------------------
def test_qrels_without_positives_explain_with_counts(ce):
    res, qrels = training_frames(4)
    with pytest.raises(ValueError, match=r"4 training queries: 4 without a judged positive.*0 usable"):
        fit(ce, res, qrels.assign(label=0))
    with pytest.raises(ValueError, match="4 without a judged positive"):  # positives only below min_label
        fit(ce, res, qrels, min_label=2)


@pytest.mark.parametrize("label", ["relevant", 0.5, np.nan, None])
def test_labels_that_are_not_integers_are_refused(ce, label):
    res, qrels = training_frames(4)
    qrels = qrels.astype({"label": object})
    qrels.loc[1, "label"] = label
    with pytest.raises(ValueError, match="qrels labels must be integers"):
        fit(ce, res, qrels)


def test_integer_labels_written_as_strings_or_floats_are_accepted():
    res, qrels = training_frames(4)
    for labels in (["1"] * 4, [1.0] * 4, [True] * 4):
        assert len(GroupSampler(res, qrels.assign(label=labels), group_size=4)) == 4


def test_qrels_for_unknown_queries_are_counted_and_the_rest_trains(ce):
    res, qrels = training_frames(6)
    stray = pd.DataFrame({"qid": ["elsewhere", "q999"], "docno": ["d", "e"], "label": [1, 2]})
    trainer = kdcl.ContrastiveTrainer(ce, group_size=4, batch_size=3, verbose=False)
    trainer.fit(res, pd.concat([qrels, stray]))
    assert trainer.group_stats.qrels_for_unknown_queries == 2 and trainer.group_stats.usable == 6
    with pytest.raises(ValueError, match="6 qrels for queries not in the frame"):
        fit(ce, res, qrels.assign(qid=qrels["qid"] + "-other"))


def test_integer_qids_in_the_frame_match_string_qids_in_the_qrels():
    res, qrels = training_frames(4)
    res = res.assign(qid=res["qid"].str[1:].astype(int), docno=res["docno"])
    qrels = qrels.assign(qid=qrels["qid"].str[1:])
    assert len(GroupSampler(res, qrels, group_size=4)) == 4


# -- groups --------------------------------------------------------------------------------------------------
def test_group_size_larger_than_the_candidates(ce):
    res, qrels = training_frames(4, depth=8)
    with pytest.raises(ValueError, match=r"4 with too few negatives.*needs 19 negatives \(group_size=20\)"):
        fit(ce, res, qrels, group_size=20)
    sampler = GroupSampler(res, qrels, group_size=20, insufficient="replace")
    assert sampler.stats.sampled_with_replacement == 4
    assert all(len(g.docnos) == 20 and g.labels[0] == 1 for g in sampler.epoch(0))


def test_some_queries_too_shallow_are_skipped_and_counted():
    deep, deep_qrels = training_frames(4, depth=8)
    shallow = deep[deep["qid"].isin(["q0", "q1"]) & (deep["rank"] <= 5)]  # 5 negatives each: too few for 8
    res = pd.concat([deep[~deep["qid"].isin(["q0", "q1"])], shallow])
    sampler = GroupSampler(res, deep_qrels, group_size=8)
    assert sampler.stats.too_few_negatives == 2 and len(sampler) == 2


def test_an_empty_training_set_after_filtering_explains_every_reason():
    res, qrels = training_frames(4, depth=8)
    res = pd.concat([res[res["qid"].isin(["q0", "q1"]) & (res["rank"] < 4)],  # no positive (it sits at rank 5)
                     res[res["qid"].isin(["q2", "q3"]) & (res["rank"] >= 5)],  # positive, but only 2 negatives
                     res[res["qid"] == "q2"].tail(2)])  # two rows repeated
    with pytest.raises(ValueError) as err:
        GroupSampler(res, pd.concat([qrels, pd.DataFrame({"qid": ["q9"], "docno": ["x"], "label": [1]})]),
                     group_size=4)
    message = str(err.value)
    for part in ("4 training queries", "2 without a judged positive", "2 with too few negatives", "0 usable",
                 "2 duplicate rows dropped", "1 qrels for queries not in the frame", "needs 3 negatives"):
        assert part in message, (part, message)


@pytest.mark.parametrize("window", [(8, 2), (-1, 4), (3, 3)])
def test_an_empty_negatives_window_is_refused_up_front(window):
    res, qrels = training_frames(4)
    with pytest.raises(ValueError, match="negatives_window"):
        GroupSampler(res, qrels, group_size=4, negatives_window=window)


def test_a_window_past_the_candidates_explains_with_counts():
    res, qrels = training_frames(4, depth=8)
    with pytest.raises(ValueError, match="4 with too few negatives"):
        GroupSampler(res, qrels, group_size=4, negatives_window=(50, 100))


@pytest.mark.parametrize("size", [4.5, "8", 1])
def test_a_group_size_that_is_not_an_integer_of_at_least_two_is_refused(size):
    res, qrels = training_frames(4)
    with pytest.raises(ValueError, match="group_size must be an integer of at least 2"):
        GroupSampler(res, qrels, group_size=size)


# -- training frame values -----------------------------------------------------------------------------------
@pytest.mark.parametrize("column, value, message", [
    ("text", None, r"1 training rows have an empty or non-string 'text' \(for example docno 'd0-1'\)"),
    ("text", "  ", r"empty or non-string 'text'"),
    ("text", 12, r"empty or non-string 'text'"),
    ("query", np.nan, r"1 training rows have an empty or non-string query \(for example qid 'q0'\)"),
    ("query", "", r"empty or non-string query"),
])
def test_training_rows_with_bad_text_or_query_are_refused(ce, column, value, message):
    res, qrels = training_frames(4)
    res = res.astype({column: object})
    res.loc[1, column] = value
    with pytest.raises(ValueError, match=message):
        fit(ce, res, qrels)


def test_duplicate_training_rows_are_dropped_and_counted():
    res, qrels = training_frames(4)
    sampler = GroupSampler(pd.concat([res, res.head(5)]), qrels, group_size=4)
    assert sampler.stats.duplicate_rows_dropped == 5
    assert all(len(set(g.docnos)) == 4 for g in sampler.epoch(0))


# -- validation data -----------------------------------------------------------------------------------------
def bad_text(res):
    res = res.copy()
    res.loc[3, "text"] = None
    return res


@pytest.mark.parametrize("make, message", [
    (lambda res, qrels: (bad_text(res), qrels), r"1 rows have a 'text' that is not a string.*before validating"),
    (lambda res, qrels: (res, qrels.assign(label="yes")), "qrels labels must be integers"),
    (lambda res, qrels: (res, qrels.drop(columns=["label"])), r"qrels lack columns \['label'\]"),
    (lambda res, qrels: (res, qrels.assign(qid="other")), "none of the 4 validation queries has qrels"),
    (lambda res, qrels: (res.iloc[:0], qrels), "validation frame is empty"),
    (lambda res, qrels: (res[["qid", "query"]].drop_duplicates(), qrels), "validation frame lacks columns"),
])
def test_bad_validation_data_stops_before_the_first_step(ce, tmp_path, make, message):
    res, qrels = training_frames(4)
    va_res, va_qrels = make(res, qrels)
    before = weights(ce)
    with pytest.raises(ValueError, match=message):
        fit(ce, res, qrels, va_res, va_qrels, output_dir=tmp_path / "out")
    assert not (tmp_path / "out" / "checkpoints").exists()
    assert all(torch.equal(v, weights(ce)[k]) for k, v in before.items())


# -- teachers ------------------------------------------------------------------------------------------------
class FaultyTeacher(pt.Transformer):
    """Scores 'answer' documents high, then applies one fault."""

    def __init__(self, fault=None):
        self.fault = fault
        self.calls = 0

    def transform(self, inp):
        self.calls += 1
        out = inp.assign(score=[3.0 if "answer" in t else 1.0 / (1 + len(t)) for t in inp["text"]])
        if self.fault in ("nan", "inf", "-inf"):
            out.loc[out.index[2], "score"] = float(self.fault)
        elif self.fault == "drop":
            out = out.drop(index=out.index[1])
        elif self.fault == "extra":
            out = pd.concat([out, out.head(1).assign(docno="not-asked-for")])
        elif self.fault == "duplicate":
            out = pd.concat([out, out.head(1)])
        elif self.fault == "no score":
            out = out.drop(columns=["score"])
        elif self.fault == "reorder":
            out = out.sample(frac=1, random_state=3)
        elif self.fault == "int ids":
            out = out.assign(qid=out["qid"].astype(int))
        return out

    def __repr__(self):
        return f"FaultyTeacher({self.fault!r})"


@pytest.mark.parametrize("fault, message", [
    ("nan", r"non-finite score \(nan\) for qid"),
    ("inf", r"non-finite score \(inf\)"),
    ("-inf", r"non-finite score \(-inf\)"),
    ("drop", "dropped 1 and added 0 rows"),
    ("extra", "dropped 0 and added 1 rows"),
    ("duplicate", "duplicate"),
    ("no score", "no 'score' column"),
])
def test_a_faulty_teacher_stops_distillation_before_the_first_step(ce, tmp_path, fault, message):
    res, qrels = training_frames(4)
    before = weights(ce)
    trainer = kdcl.DistillationTrainer(ce, FaultyTeacher(fault), group_size=4, verbose=False,
                                       output_dir=tmp_path / "out", teacher_cache_key="faulty teacher")
    with pytest.raises(ValueError, match=message):
        trainer.fit(res, qrels)
    assert not (tmp_path / "out" / "checkpoints").exists()
    assert all(torch.equal(v, weights(ce)[k]) for k, v in before.items())
    cache = tmp_path / "out" / "teacher_scores"
    if cache.exists():  # nothing wrong was cached: with a fixed teacher the same cache trains to finite losses
        fixed = FaultyTeacher()
        log = kdcl.DistillationTrainer(ce, fixed, group_size=4, verbose=False, teacher_cache=cache,
                                       teacher_cache_key="faulty teacher").fit(res, qrels)
        assert fixed.calls == 1 and np.isfinite(log["loss"]).all()


@pytest.mark.parametrize("fault", ["reorder", "int ids"])
def test_teacher_scores_reach_the_right_documents_whatever_the_teachers_row_order_or_id_types(fault):
    res, qrels = training_frames(6)
    res, qrels = res.assign(qid=res["qid"].str[1:]), qrels.assign(qid=qrels["qid"].str[1:])  # "0", "1", …
    groups = list(GroupSampler(res, qrels, group_size=4, seed=1).epoch(0))
    scores = TeacherScores(FaultyTeacher(fault), None)
    scores.prepare(groups)
    looked_up = scores.lookup(groups)
    expected = [[3.0 if "answer" in t else 1.0 / (1 + len(t)) for t in g.texts] for g in groups]
    torch.testing.assert_close(looked_up, torch.tensor(expected, dtype=torch.float32))
    assert (looked_up[:, 0] == 3.0).all()  # the positive is first and the teacher's favourite


def test_checked_teacher_on_an_empty_frame_never_calls_the_teacher():
    teacher = FaultyTeacher()
    out = CheckedTeacher(teacher)(pd.DataFrame(columns=["qid", "query", "docno", "text"]))
    assert len(out) == 0 and "score" in out.columns and teacher.calls == 0


# -- numerics ------------------------------------------------------------------------------------------------
class NaNOnCall(torch.nn.Module):
    """InfoNCE, except that the loss of the n-th call is NaN."""

    needs = {"labels"}

    def __init__(self, n):
        super().__init__()
        self.n, self.calls, self.inner = n, 0, kdcl.losses.InfoNCE()

    def forward(self, scores, labels=None, teacher_scores=None):
        self.calls += 1
        loss = self.inner(scores, labels=labels)
        return loss * float("nan") if self.calls == self.n else loss


def test_a_nan_loss_keeps_the_last_good_checkpoint_and_resumes_from_it(tiny_model, tmp_path):
    res, qrels = training_frames(8)
    student = kdcl.CrossEncoder(tiny_model("bert"), verbose=False, max_length=32)
    trainer = RerankerTrainer(student, NaNOnCall(3), group_size=4, batch_size=2, verbose=False, checkpoint_every=1,
                              output_dir=tmp_path / "run")
    with pytest.raises(FloatingPointError, match=r"step 3 on queries \['q.*learning rate.*resume=True"):
        trainer.fit(res, qrels)
    kept = sorted(p.name for p in (tmp_path / "run" / "checkpoints").iterdir())
    assert kept == ["step-00000002"]
    assert json.loads((tmp_path / "run" / "checkpoints" / kept[0] / "state.json").read_text())["step"] == 2
    saved = load_file(tmp_path / "run" / "checkpoints" / kept[0] / "weights.safetensors")
    assert all(torch.isfinite(v).all() for v in saved.values())
    log = RerankerTrainer(student, NaNOnCall(0), group_size=4, batch_size=2, verbose=False,
                          output_dir=tmp_path / "run").fit(res, qrels, resume=True)
    assert list(log["step"]) == [1, 2, 3, 4] and np.isfinite(log["loss"]).all()


def test_a_negatives_window_without_rank_or_score_is_refused_not_read_from_row_order():
    res, qrels = training_frames(4, depth=8)
    with pytest.raises(ValueError, match="negatives_window=.*neither a 'rank' nor a 'score' column"):
        GroupSampler(res.drop(columns=["rank", "score"]), qrels, group_size=3, negatives_window=(0, 3))
    assert len(GroupSampler(res.drop(columns=["rank", "score"]), qrels, group_size=3)) == 4  # no window: fine
    # ranks from the score when the rank is missing: the window holds the three best-scored negatives
    sampler = GroupSampler(res.drop(columns=["rank"]), qrels, group_size=3, negatives_window=(0, 3))
    for group in sampler.epoch(0):
        assert {d.rsplit("-", 1)[1] for d in group.docnos[1:]} <= {"0", "1", "2"}
