"""The training loop: learning, identical groups for CL and KD, teacher caching, determinism, resume, LoRA."""

import numpy as np
import pandas as pd
import pyterrier as pt
import pytest
import torch
from training_data import CountingTeacher, training_frames

import pyterrier_kdcl as kdcl
from pyterrier_kdcl.training import RerankerTrainer
from pyterrier_kdcl.training.dev_metrics import Validator


def student(tiny_model, family="bert", **kw):
    return kdcl.CrossEncoder(tiny_model(family), verbose=False, max_length=32, **kw)


def crash_at_step(monkeypatch, step: int):
    """Makes the trainer's ``step``-th optimizer step raise KeyboardInterrupt (a simulated crash); returns the real
    ``_step`` to put back."""
    original = RerankerTrainer._step
    calls = {"n": 0}

    def crashing(self, *args):
        calls["n"] += 1
        if calls["n"] == step:
            raise KeyboardInterrupt(f"simulated crash in the middle of step {step}")
        return original(self, *args)

    monkeypatch.setattr(RerankerTrainer, "_step", crashing)
    return original

def weights(reranker):
    return {k: v.detach().clone() for k, v in reranker.ranker.state_dict().items()}


def assert_same_weights(a, b):
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key


def test_contrastive_fit_learns_and_the_trainer_then_reranks(tiny_model):
    res, qrels = training_frames()
    ce = student(tiny_model)
    before = Validator(ce, res, qrels, "RR@10").evaluate()
    trainer = kdcl.ContrastiveTrainer(ce, group_size=4, epochs=4, batch_size=4, learning_rate=5e-3, verbose=False,
                                      metric="RR@10")
    log = trainer.fit(res, qrels, res, qrels)
    assert list(log.columns) == ["step", "epoch", "loss", "lr", "metric", "seconds", "pairs"]
    assert len(log) == 24 and log["metric"].notna().sum() == 4
    assert log["loss"].iloc[-6:].mean() < log["loss"].iloc[:6].mean()
    after = Validator(ce, res, qrels, "RR@10").evaluate()
    assert after > before + 0.2, (before, after)
    reranked = trainer(res)  # the fitted trainer is a reranker
    top = reranked[reranked["rank"] == 0]
    assert (top["docno"].str.endswith("-5")).mean() > 0.9


def test_fit_inside_a_pipeline_gets_result_frames(tiny_model):
    res, qrels = training_frames(8)
    topics = res[["qid", "query"]].drop_duplicates()
    first_stage = pt.Transformer.from_df(res, uniform=True)
    trainer = kdcl.ContrastiveTrainer(student(tiny_model), group_size=4, batch_size=4, verbose=False)
    (first_stage >> trainer).fit(topics, qrels)
    assert len(trainer.log_) == 2
    out = (first_stage >> trainer)(topics)
    assert {"score", "rank"} <= set(out.columns) and len(out) == len(res)


def test_cl_and_kd_train_on_identical_groups_in_identical_order(tiny_model, monkeypatch):
    res, qrels = training_frames(10)
    seen = {}
    original = RerankerTrainer._step

    def recording(self, model, optimizer, scheduler, params, step_batches, *args):
        seen.setdefault(type(self).__name__, []).append([(g.qid, g.docnos) for b in step_batches for g in b])
        return original(self, model, optimizer, scheduler, params, step_batches, *args)

    monkeypatch.setattr(RerankerTrainer, "_step", recording)
    common = {"group_size": 4, "epochs": 2, "batch_size": 3, "seed": 7, "verbose": False}
    kdcl.ContrastiveTrainer(student(tiny_model), **common).fit(res, qrels)
    kdcl.DistillationTrainer(student(tiny_model), CountingTeacher(), **common).fit(res, qrels)
    assert seen["ContrastiveTrainer"] == seen["DistillationTrainer"]
    assert len(seen["ContrastiveTrainer"]) == 8  # ceil(10 / 3) batches, two epochs
    epoch0, epoch1 = seen["ContrastiveTrainer"][:4], seen["ContrastiveTrainer"][4:]
    assert epoch0 != epoch1  # negatives and order are drawn afresh each epoch


def test_teacher_scores_are_computed_once_and_cached_on_disk(tiny_model, tmp_path):
    res, qrels = training_frames(6)
    teacher = CountingTeacher()
    options = {"group_size": 4, "batch_size": 2, "verbose": False, "teacher_cache": tmp_path / "cache",
               "teacher_cache_key": "counting teacher"}
    kdcl.DistillationTrainer(student(tiny_model), teacher, **options).fit(res, qrels)
    assert teacher.rows == 6 * 4  # each (query, doc) of each group, once, in one batched call
    kdcl.DistillationTrainer(student(tiny_model), teacher, **options).fit(res, qrels)
    assert teacher.rows == 6 * 4


def test_a_fitted_trainer_as_teacher_is_cached_by_its_weights(tiny_model):
    from pyterrier_kdcl.training.teachers import teacher_fingerprint

    res, qrels = training_frames(6)
    trainer = kdcl.ContrastiveTrainer(student(tiny_model), group_size=4, batch_size=2, learning_rate=1e-2,
                                      verbose=False)
    before = teacher_fingerprint(trainer)
    trainer.fit(res, qrels)
    assert teacher_fingerprint(trainer) != before  # same repr, new weights: a new cache
    assert trainer.fingerprint() == trainer.reranker.fingerprint()


def test_distillation_moves_the_student_towards_the_teacher(tiny_model):
    res, qrels = training_frames()
    ce = student(tiny_model)
    trainer = kdcl.DistillationTrainer(ce, CountingTeacher(), group_size=4, epochs=4, batch_size=4,
                                       learning_rate=5e-3, verbose=False)
    log = trainer.fit(res, qrels)
    assert log["loss"].iloc[-6:].mean() < log["loss"].iloc[:6].mean()
    assert Validator(ce, res, qrels, "RR@10").evaluate() > 0.8


def test_validation_averages_over_the_validation_queries_only(tiny_model):
    res, qrels = training_frames(n_queries=24)
    ce = student(tiny_model)
    few = res[res["qid"].isin(["q0", "q1", "q2"])]
    on_all_qrels = Validator(ce, few, qrels, "RR@10").evaluate()
    assert on_all_qrels > 0
    assert on_all_qrels == Validator(ce, few, qrels[qrels["qid"].isin(["q0", "q1", "q2"])], "RR@10").evaluate()


def test_same_seed_same_data_gives_identical_weights(tiny_model):
    res, qrels = training_frames(8)
    runs = []
    for _ in range(2):
        ce = student(tiny_model)
        kdcl.ContrastiveTrainer(ce, group_size=4, epochs=2, batch_size=4, verbose=False, seed=3).fit(res, qrels)
        runs.append(weights(ce))
    assert_same_weights(*runs)


def test_resume_after_a_crash_ends_with_the_weights_of_an_uninterrupted_run(tiny_model, tmp_path, monkeypatch):
    res, qrels = training_frames(12)
    options = {"group_size": 4, "epochs": 2, "batch_size": 2, "verbose": False, "checkpoint_every": 1,
               "validate_every": 2, "metric": "RR@10"}

    reference = student(tiny_model)
    kdcl.ContrastiveTrainer(reference, output_dir=tmp_path / "ref", **options).fit(res, qrels, res, qrels)

    original = crash_at_step(monkeypatch, 8)
    with pytest.raises(KeyboardInterrupt):
        kdcl.ContrastiveTrainer(student(tiny_model), output_dir=tmp_path / "run", **options).fit(res, qrels, res, qrels)
    monkeypatch.setattr(RerankerTrainer, "_step", original)
    checkpoints = sorted(p.name for p in (tmp_path / "run" / "checkpoints").iterdir())
    assert checkpoints == ["step-00000007"]  # only complete checkpoints, the newest kept

    resumed = student(tiny_model)
    log = kdcl.ContrastiveTrainer(resumed, output_dir=tmp_path / "run", **options).fit(res, qrels, res, qrels,
                                                                                      resume=True)
    assert list(log["step"]) == list(range(1, 13))
    assert_same_weights(weights(resumed), weights(reference))
    assert (tmp_path / "run" / "model" / "kdcl.json").exists()


def test_best_validation_weights_are_restored(tiny_model):
    res, qrels = training_frames(8)
    ce = student(tiny_model)
    trainer = kdcl.ContrastiveTrainer(ce, group_size=4, epochs=3, batch_size=4, verbose=False, validate_every=1,
                                      learning_rate=5e-2, metric="RR@10")
    log = trainer.fit(res, qrels, res, qrels)
    assert Validator(ce, res, qrels, "RR@10").evaluate() == pytest.approx(log["metric"].max())


def test_patience_stops_early(tiny_model):
    res, qrels = training_frames(8)
    trainer = kdcl.ContrastiveTrainer(student(tiny_model), group_size=4, epochs=20, batch_size=4, verbose=False,
                                      validate_every=1, learning_rate=1e-9, patience=2)
    log = trainer.fit(res, qrels, res, qrels)
    assert len(log) < 10


def test_lora_student_trains_only_adapter_and_head(tiny_model):
    res, qrels = training_frames(8)
    ce = student(tiny_model, "qwen2", lora={"r": 4, "lora_alpha": 8})
    frozen_before = {k: v.clone() for k, v in ce.ranker.state_dict().items() if "lora_" not in k and "score" not in k}
    head_before = ce.ranker.score.weight.detach().clone()
    kdcl.ContrastiveTrainer(ce, group_size=4, batch_size=4, learning_rate=1e-2, verbose=False).fit(res, qrels)
    after = ce.ranker.state_dict()
    for key, value in frozen_before.items():
        assert torch.equal(after[key], value), key
    assert not torch.equal(ce.ranker.score.weight, head_before)


def without_dropout(reranker):
    for module in reranker.ranker.modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0
    return reranker


def test_gradient_accumulation_matches_a_larger_batch(tiny_model):
    res, qrels = training_frames(8)
    config = {"group_size": 4, "verbose": False, "max_grad_norm": None, "precision": "fp32"}  # exact sums
    big = without_dropout(student(tiny_model))
    kdcl.ContrastiveTrainer(big, batch_size=4, **config).fit(res, qrels)
    small = without_dropout(student(tiny_model))
    kdcl.ContrastiveTrainer(small, batch_size=2, gradient_accumulation_steps=2, **config).fit(res, qrels)
    untouched = without_dropout(student(tiny_model))
    for (name, a), b in zip(big.ranker.named_parameters(), small.ranker.parameters()):
        if name.endswith("classifier.bias"):
            # InfoNCE is shift-invariant, so this bias's gradient is zero in exact arithmetic: Adam turns the
            # rounding noise of either run (which differs between CPUs) into steps of a full learning rate
            continue
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4, msg=name)
    assert any(not torch.equal(a, c) for a, c in zip(big.ranker.parameters(), untouched.ranker.parameters()))


def test_errors_before_training_starts(tiny_model, tmp_path):
    res, qrels = training_frames(4)
    ce = student(tiny_model)
    with pytest.raises(ValueError, match="first stage"):
        kdcl.ContrastiveTrainer(ce, verbose=False).fit(res[["qid", "query"]].drop_duplicates(), qrels)
    with pytest.raises(ValueError, match="teacher"):
        RerankerTrainer(ce, kdcl.losses.KLDistillation())
    with pytest.raises(ValueError, match="resume"):
        kdcl.ContrastiveTrainer(ce, verbose=False).fit(res, qrels, resume=True)
    with pytest.raises(ValueError, match="no training group.*4 training queries"):
        kdcl.ContrastiveTrainer(ce, verbose=False).fit(res, qrels.assign(docno="elsewhere"))
    with pytest.raises(ValueError, match="va_qrels"):
        kdcl.ContrastiveTrainer(ce, verbose=False, group_size=4).fit(res, qrels, res)


def test_a_nan_loss_stops_with_the_step_and_queries(tiny_model, tmp_path):
    res, qrels = training_frames(8)

    class NaNTeacherLoss(torch.nn.Module):
        needs = {"labels"}

        def forward(self, scores, labels=None, teacher_scores=None):
            return scores.sum() * float("nan")

    trainer = RerankerTrainer(student(tiny_model), NaNTeacherLoss(), group_size=4, verbose=False,
                              output_dir=tmp_path / "nan")
    with pytest.raises(FloatingPointError, match=r"step 1 on queries \['q"):
        trainer.fit(res, qrels)


def test_groups_respect_their_seed_whatever_the_frame_order(tiny_model):
    from pyterrier_kdcl.training.groups import GroupSampler

    res, qrels = training_frames(6)
    a = list(GroupSampler(res, qrels, group_size=4, seed=1).epoch(0))
    b = list(GroupSampler(res.sample(frac=1, random_state=0), qrels, group_size=4, seed=1).epoch(0))
    assert a == b
    assert all(g.docnos[0].endswith("-5") and g.labels == (1, 0, 0, 0) for g in a)
    assert np.all([len(set(g.docnos)) == 4 for g in a])


def test_teacher_rows_are_joined_by_qid_and_docno_not_position(tiny_model):
    from pyterrier_kdcl.training.teachers import CheckedTeacher

    class Reordering(pt.Transformer):
        def transform(self, inp):
            return inp.assign(score=np.arange(len(inp), dtype=float)).iloc[::-1]

    inp = pd.DataFrame({"qid": ["1", "1", "2"], "query": ["a", "a", "b"], "docno": ["x", "y", "z"],
                        "text": ["t1", "t2", "t3"]})
    out = CheckedTeacher(Reordering())(inp)
    assert list(out["docno"]) == ["x", "y", "z"] and list(out["score"]) == [0.0, 1.0, 2.0]


def newest_checkpoint(output_dir):
    return sorted((output_dir / "checkpoints").iterdir())[-1]


def test_bf16_weights_train_through_float32_master_weights(tiny_model, tmp_path):
    from safetensors.torch import load_file

    res, qrels = training_frames(32)
    ce = student(tiny_model, dtype="bfloat16", device="cpu")
    before = {k: v.detach().clone() for k, v in ce.ranker.named_parameters()}
    kdcl.ContrastiveTrainer(ce, group_size=4, batch_size=4, learning_rate=1e-5, verbose=False,
                            output_dir=tmp_path / "bf16", keep_checkpoints=True).fit(res, qrels)
    masters = load_file(newest_checkpoint(tmp_path / "bf16") / "weights.safetensors")  # the 8th and last step
    encoder = [k for k in before if ".encoder." in k and k.endswith("weight")]
    changed = sum(int((masters[k] != before[k].float()).sum()) for k in encoder)
    total = sum(before[k].numel() for k in encoder)
    # stepping the bf16 weights themselves changed 11% of them: most updates at lr 1e-5 fall below half an ulp
    assert changed / total > 0.99, changed / total
    # the reranker serves in its own dtype, the master weights rounded once, with a forward free of autocast
    after = dict(ce.ranker.named_parameters())
    assert ce.dtype == torch.bfloat16 and all(p.dtype == torch.bfloat16 for p in after.values())
    for key, master in masters.items():
        assert torch.equal(after[key], master.to(torch.bfloat16)), key
    assert "_original_forward" not in ce.ranker.__dict__
    assert np.isfinite(ce(res.head(8))["score"]).all()
    # the process may fit in another precision afterwards (Accelerate's precision is process-wide)
    kdcl.ContrastiveTrainer(student(tiny_model), group_size=4, batch_size=4, verbose=False).fit(res.head(32), qrels)


def test_a_bf16_lora_student_trains_validates_and_keeps_its_dtypes(tiny_model):
    res, qrels = training_frames(8)
    ce = student(tiny_model, dtype="bfloat16", device="cpu", lora={"r": 4, "lora_alpha": 8})
    before = {k: v.detach().clone() for k, v in ce.ranker.named_parameters()}
    assert before["model.base_model.model.classifier.modules_to_save.default.weight"].dtype == torch.bfloat16
    log = kdcl.ContrastiveTrainer(ce, group_size=4, batch_size=4, learning_rate=1e-3, verbose=False,
                                  metric="RR@10", validate_every=1).fit(res, qrels, res, qrels)
    assert log["metric"].notna().all()  # a bf16 base, float32 adapters and float32 master head, under autocast
    after = dict(ce.ranker.named_parameters())
    assert {k: v.dtype for k, v in after.items()} == {k: v.dtype for k, v in before.items()}
    assert any(not torch.equal(after[k], v) for k, v in before.items() if "lora_" in k)


def test_a_half_reranker_is_not_computed_in_the_other_half_precision(tiny_model):
    with pytest.raises(ValueError, match="precision='bf16'"):
        kdcl.ContrastiveTrainer(student(tiny_model, dtype="bfloat16", device="cpu"), precision="fp16")


@pytest.mark.parametrize("loss", [kdcl.losses.RankNet, kdcl.losses.ListNet])
def test_a_teacher_given_with_a_ranking_loss_is_used(tiny_model, loss):
    res, qrels = training_frames(6)
    seen = []

    class Spy(loss):
        def forward(self, scores, labels=None, teacher_scores=None):
            seen.append(teacher_scores)
            return super().forward(scores, labels=labels, teacher_scores=teacher_scores)

    teacher = CountingTeacher()
    trainer = RerankerTrainer(student(tiny_model), Spy(), teacher=teacher, group_size=4, batch_size=2, verbose=False)
    assert trainer.teacher is teacher
    trainer.fit(res, qrels)
    assert teacher.rows == 6 * 4 and len(seen) == 3
    for scores in seen:  # the teacher's scores: 3.0 for the positive ('the answer to …'), below for the rest
        assert scores is not None and (scores[:, 0] == 3.0).all() and (scores[:, 1:] < 3.0).all()


def test_a_teacher_that_the_loss_never_reads_is_refused(tiny_model):
    with pytest.raises(ValueError, match=r"reads no teacher scores, so teacher=CountingTeacher\(\) would be ignored"):
        RerankerTrainer(student(tiny_model), kdcl.losses.InfoNCE(), teacher=CountingTeacher())
    with pytest.raises(ValueError, match="reads no teacher scores"):
        RerankerTrainer(student(tiny_model), kdcl.losses.RankNet(target="labels"), teacher=CountingTeacher())


def test_resume_is_a_constructor_option_that_a_pipeline_fit_reaches(tiny_model, tmp_path, monkeypatch):
    res, qrels = training_frames(12)
    topics = res[["qid", "query"]].drop_duplicates()
    first_stage = pt.Transformer.from_df(res, uniform=True)
    options = {"group_size": 4, "epochs": 2, "batch_size": 2, "verbose": False, "checkpoint_every": 1,
               "validate_every": 3, "metric": "RR@10"}
    reference = kdcl.ContrastiveTrainer(student(tiny_model), **options)
    (first_stage >> reference).fit(topics, qrels, topics, qrels)
    assert list(reference.log_["step"]) == list(range(1, 13)) and reference.log_["metric"].notna().sum() == 4

    original = crash_at_step(monkeypatch, 8)
    crashed = kdcl.ContrastiveTrainer(student(tiny_model), output_dir=tmp_path, resume=True, **options)
    with pytest.raises(KeyboardInterrupt):  # resume=True with no checkpoint yet starts afresh
        (first_stage >> crashed).fit(topics, qrels, topics, qrels)
    monkeypatch.setattr(RerankerTrainer, "_step", original)

    resumed = kdcl.ContrastiveTrainer(student(tiny_model), output_dir=tmp_path, resume=True, **options)
    (first_stage >> resumed).fit(topics, qrels, topics, qrels)
    assert list(resumed.log_["step"]) == list(range(1, 13))
    pd.testing.assert_frame_equal(resumed.log_.drop(columns="seconds"), reference.log_.drop(columns="seconds"))
    assert_same_weights(weights(resumed.reranker), weights(reference.reranker))
    with pytest.raises(ValueError, match="resume=True needs output_dir"):
        kdcl.ContrastiveTrainer(student(tiny_model), resume=True)


def test_a_mean_pooled_student_learns(tiny_model):
    res, qrels = training_frames()
    ce = student(tiny_model, pooling="mean")
    before = Validator(ce, res, qrels, "RR@10").evaluate()
    kdcl.ContrastiveTrainer(ce, group_size=4, epochs=4, batch_size=4, learning_rate=5e-3, verbose=False).fit(res, qrels)
    after = Validator(ce, res, qrels, "RR@10").evaluate()
    assert before < 0.9 and after > 0.95, (before, after)  # the mean of a random model already leans right


def test_head_learning_rate_moves_the_head_and_leaves_the_backbone(tiny_model):
    res, qrels = training_frames()

    def moved(**kw):
        ce = student(tiny_model)
        before = weights(ce)
        kdcl.ContrastiveTrainer(ce, group_size=4, epochs=1, batch_size=4, verbose=False, learning_rate=1e-7,
                                weight_decay=0.0, **kw).fit(res, qrels)
        after = weights(ce)
        change = {k: (after[k] - before[k]).abs().max().item() for k in before}
        head = max(v for k, v in change.items() if "classifier" in k)
        return head, max(v for k, v in change.items() if "classifier" not in k and "pooler" not in k)

    head, backbone = moved(head_learning_rate=1e-2)
    assert head > 1e-3 and backbone < 1e-5, (head, backbone)
    head, backbone = moved()  # without it, the head steps at the backbone's rate
    assert head < 1e-5 and backbone < 1e-5, (head, backbone)
