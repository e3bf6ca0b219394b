"""Teacher scores and their cache: named by what the teacher is, keyed by the text scored, shared by processes."""

import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path

import pyterrier as pt
import pytest
import torch
from teacher_worker import WordTeacher, composed_teacher, expected_score
from training_data import training_frames

import pyterrier_kdcl as kdcl
from pyterrier_kdcl.training.groups import Group, GroupSampler
from pyterrier_kdcl.training.teachers import SCORE_FILE, ScoreStore, TeacherScores, teacher_fingerprint

WORKER = Path(__file__).with_name("teacher_worker.py")


def groups(n=6):
    res, qrels = training_frames(n)
    return list(GroupSampler(res, qrels, group_size=4, seed=1).epoch(0))


def expected(gs):
    return torch.tensor([[expected_score(t) for t in g.texts] for g in gs], dtype=torch.float32)


# -- naming a teacher ----------------------------------------------------------------------------------------
def test_a_composed_teacher_is_fingerprinted_from_its_parts():
    a, b = WordTeacher("answer", 2.0), WordTeacher("page", 1.0)
    compositions = {"sum": lambda: a + b, "scaled": lambda: a + 0.5 * b, "then": lambda: a >> b,
                    "features": lambda: a ** b, "cutoff": lambda: (a + b) % 5}
    for name, make in compositions.items():
        before = teacher_fingerprint(make())
        assert before is not None, name
        assert teacher_fingerprint(make()) == before, name  # a new object, same parts: the same name (no address)
        a.weight = 3.0
        assert teacher_fingerprint(make()) != before, name  # a part changed: a new name
        a.weight = 2.0
    assert teacher_fingerprint(a + 0.5 * b) != teacher_fingerprint(a + 0.25 * b)
    assert teacher_fingerprint(a + pt.apply.score(lambda row: 1.0)) is None  # a lambda has no name
    assert teacher_fingerprint(pt.apply.score(lambda row: 1.0), key="mine") is not None


def test_a_fusion_of_fingerprinted_members_is_fingerprinted_and_cached(tiny_model, tmp_path):
    """A ScoreFusion is named by its members' fingerprints, weights and statistics when every member has one, so
    ``teacher_cache=`` takes it without a key (issue 23 item 7: can_fingerprint said no, though teacher_identity
    named it); with a member that has none, a key is still needed."""
    from pyterrier_kdcl.training.teachers import can_fingerprint

    def fusion(weight=0.5, stats=(0.0, 1.0), word="answer", **members):
        scorers = {"a": WordTeacher(word, 2.0), "b": WordTeacher("page", 1.0), **members}
        return kdcl.ScoreFusion(scorers, weights={name: weight for name in scorers},
                                stats={name: stats for name in scorers})

    assert can_fingerprint(fusion())
    before = teacher_fingerprint(fusion())
    assert before is not None and teacher_fingerprint(fusion()) == before  # no address in it
    for changed in (fusion(weight=0.25), fusion(stats=(1.0, 2.0)), fusion(word="page")):
        assert teacher_fingerprint(changed) != before
    ce = kdcl.CrossEncoder(tiny_model("bert"), verbose=False, max_length=32)
    res, qrels = training_frames(6)
    trainer = kdcl.DistillationTrainer(ce, fusion(), teacher_cache=tmp_path / "cache", group_size=4, batch_size=2,
                                       verbose=False)
    trainer.fit(res, qrels)
    assert [d.name for d in (tmp_path / "cache").iterdir()] == [before]
    for member in (Anonymous(), kdcl.FirstStageScore()):
        assert not can_fingerprint(fusion(c=member))
        with pytest.raises(ValueError, match="teacher_cache_key="):
            kdcl.DistillationTrainer(ce, fusion(c=member), teacher_cache=tmp_path / "cache")


def test_a_cross_encoder_teacher_changed_in_place_gives_new_scores(tiny_model, tmp_path):
    a = kdcl.CrossEncoder(tiny_model("bert"), verbose=False, max_length=32)
    b = kdcl.CrossEncoder(tiny_model("bert", seed=1), verbose=False, max_length=32)
    teacher, gs = a + b, groups()
    first = TeacherScores(teacher, tmp_path)
    first.prepare(gs)
    with torch.no_grad():
        a.ranker.model.classifier.bias += 1.0  # in the same process, the same objects: only the weights move
    second = TeacherScores(teacher, tmp_path)
    second.prepare(gs)
    assert second.scored == first.scored > 0  # not served from the first teacher's cache
    torch.testing.assert_close(second.lookup(gs), first.lookup(gs) + 1.0)


def test_a_changed_text_is_scored_afresh(tmp_path):
    gs = groups()
    teacher, counted = composed_teacher()
    first = TeacherScores(teacher, tmp_path)
    first.prepare(gs)
    edited = [type(g)(g.qid, g.query, g.docnos, (g.texts[0] + " answer",) + g.texts[1:]) for g in gs]
    again = TeacherScores(teacher, tmp_path)
    again.prepare(edited)  # same qids and docnos; the positives' text changed
    assert again.scored == len(gs)  # just the edited pairs
    torch.testing.assert_close(again.lookup(edited), expected(edited))
    assert (again.lookup(edited)[:, 0] == first.lookup(gs)[:, 0] + 2.0).all()


def test_a_first_stage_change_rescores_a_teacher_that_reads_it_and_only_such_a_teacher(tmp_path):
    """The cache key covers every column a teacher reads (issue 23 item 4): a fused teacher with a FirstStageScore
    member got the old first stage's scores back after the first stage changed. A teacher that does not read the
    first-stage score is never given it, and keeps its cached scores (and its keys) when only the first stage moves."""
    from pyterrier_kdcl.training.teachers import pair_key

    gs = groups()
    bm25 = [dataclasses.replace(g, first_stage_scores=tuple(float(i) for i in range(len(g.docnos)))) for g in gs]
    other = [dataclasses.replace(g, first_stage_scores=tuple(10.0 - i for i in range(len(g.docnos)))) for g in gs]
    fused = kdcl.ScoreFusion({"bm25": kdcl.FirstStageScore()}, weights={"bm25": 1.0}, stats={"bm25": (0.0, 1.0)})
    first = TeacherScores(fused, tmp_path, key="fused v1")
    first.prepare(bm25)
    torch.testing.assert_close(first.lookup(bm25)[0], torch.arange(4, dtype=torch.float32))
    again = TeacherScores(fused, tmp_path, key="fused v1")
    again.prepare(other)  # the same (query, docno, text), another first stage
    assert again.scored == first.scored > 0
    torch.testing.assert_close(again.lookup(other)[0], 10.0 - torch.arange(4, dtype=torch.float32))

    teacher, counted = composed_teacher()
    TeacherScores(teacher, tmp_path).prepare(bm25)
    seen = []
    counted.transform = lambda inp, _transform=counted.transform: seen.append(list(inp.columns)) or _transform(inp)
    kept = TeacherScores(teacher, tmp_path)
    kept.prepare(other)
    assert kept.scored == 0  # text scorers: the first stage is no part of their scores
    torch.testing.assert_close(kept.lookup(other), expected(other))
    g = gs[0]
    assert len(kept.store.get([pair_key(g.query, d, t) for d, t in zip(g.docnos, g.texts)])) == 4  # keys as before
    kept.close()
    TeacherScores(teacher, None).prepare(other)  # scored afresh, in memory: what the teacher is given
    assert seen and all("first_stage_score" not in columns for columns in seen)


# -- teachers without a fingerprint --------------------------------------------------------------------------
class Anonymous(pt.Transformer):
    """A teacher with no fingerprint: its repr would hold only its address."""

    def __init__(self):
        self.rows = 0

    def transform(self, inp):
        self.rows += len(inp)
        return inp.assign(score=[float(len(t)) for t in inp["text"]])


def test_a_teacher_without_a_fingerprint_is_persisted_only_under_a_named_key(tiny_model, tmp_path):
    res, qrels = training_frames(6)
    ce = kdcl.CrossEncoder(tiny_model("bert"), verbose=False, max_length=32)
    with pytest.raises(ValueError, match=r"cannot be fingerprinted.*teacher_cache_key="):
        kdcl.DistillationTrainer(ce, Anonymous(), teacher_cache=tmp_path / "cache")
    with pytest.raises(ValueError, match="cannot be fingerprinted"):
        TeacherScores(Anonymous() + WordTeacher("a", 1.0), tmp_path / "cache")
    options = {"group_size": 4, "batch_size": 2, "verbose": False}
    # with an output_dir but no key, the scores stay in memory, and the trainer says so
    with pytest.warns(UserWarning, match="stay in memory"):
        kdcl.DistillationTrainer(ce, Anonymous(), output_dir=tmp_path / "out", **options).fit(res, qrels)
    assert not (tmp_path / "out" / "teacher_scores").exists()
    # a key names them: a second fit reads them back
    named = {**options, "teacher_cache": tmp_path / "cache", "teacher_cache_key": "length v1"}
    teacher = Anonymous()
    kdcl.DistillationTrainer(ce, teacher, **named).fit(res, qrels)
    assert teacher.rows == 6 * 4
    kdcl.DistillationTrainer(ce, teacher, **named).fit(res, qrels)
    assert teacher.rows == 6 * 4


def test_a_retriever_as_teacher_is_refused_pointing_to_first_stage_score(tiny_model, tmp_path):
    """``teacher=bm25`` failed with PyTerrier's bare InputValidationError (issue 23, item 19)."""
    from pyterrier_pisa import PisaIndex

    res, qrels = training_frames(6)
    docs = res.drop_duplicates("docno")[["docno", "text"]].to_dict("records")
    bm25 = PisaIndex(str(tmp_path / "index"), text_field="text").index(docs).bm25(num_results=10)
    ce = kdcl.CrossEncoder(tiny_model("bert"), verbose=False, max_length=32)
    trainer = kdcl.DistillationTrainer(ce, bm25, group_size=4, batch_size=2, verbose=False)
    with pytest.raises(ValueError, match=r"refused the \(query, document\) rows.*a retriever such as BM25.*"
                                         r"kdcl\.FirstStageScore\(\)") as err:
        trainer.fit(res, qrels)
    assert "extra_columns=['docno']" in str(err.value)  # PyTerrier's own reason, in one line
    first_stage = kdcl.DistillationTrainer(ce, kdcl.FirstStageScore(), group_size=4, batch_size=2, verbose=False)
    assert len(first_stage.fit(res, qrels))  # what the message points to trains


def test_teacher_scores_in_memory_need_no_directory():
    gs = groups()
    scores = TeacherScores(composed_teacher()[0], None)
    scores.prepare(gs)
    torch.testing.assert_close(scores.lookup(gs), expected(gs))


# -- processes sharing one cache -----------------------------------------------------------------------------
def run_workers(model_dir, cache, ranges, sleep):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    procs = [subprocess.Popen([sys.executable, str(WORKER), str(model_dir), str(cache), str(first), str(last),
                               str(sleep)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
             for first, last in ranges]
    outs = [p.communicate(timeout=300) for p in procs]
    for p, (_, err) in zip(procs, outs):
        assert p.returncode == 0, err[-3000:]
        assert "database is locked" not in err
    return [json.loads(out.strip().splitlines()[-1]) for out, _ in outs]


def stored_pairs(*runs):
    return sorted({tuple(p) for run in runs for p in run["scored"]})


def stored_scores(cache):
    (directory,) = [d for d in cache.iterdir() if (d / SCORE_FILE).exists()]
    store = ScoreStore(directory)
    try:
        return dict(store.db.execute("SELECT key, score FROM scores").fetchall())
    finally:
        store.close()


def test_two_processes_share_one_teacher_cache(tiny_model, tmp_path):
    """Two trainers start together on overlapping queries (4–11 in both) with one cache: both finish, every pair
    each one needed is scored at most once by it, the cache ends up holding every pair with the right score, and
    another process later finds everything there."""
    from pyterrier_kdcl.training.teachers import pair_key

    cache = tmp_path / "cache"
    first, second = run_workers(tiny_model("bert"), cache, [(0, 12), (4, 16)], sleep=0.02)
    for run in (first, second):
        scored = [tuple(p) for p in run["scored"]]
        assert len(scored) == len(set(scored)) > 0  # at most once per process
        assert run["steps"] > 0
    stored = stored_scores(cache)
    for pair in stored_pairs(first, second):
        assert stored[pair_key(*pair)] == pytest.approx(expected_score(pair[2]))
    # this process (a third one) finds them all: a composed teacher is named by its parts, not its address
    needed = [(q, d, t) for q, d, t in stored_pairs(first, second)]
    teacher, counted = composed_teacher()
    again = TeacherScores(teacher, cache)
    again.prepare([Group("q", q, (d,), (t,)) for q, d, t in needed])
    assert again.scored == 0 and counted.scored == []


def test_score_store_waits_for_another_writer_instead_of_failing(tmp_path):
    """A write transaction held by another connection (another process) makes a writer wait, not fail."""
    import threading

    holder = ScoreStore(tmp_path)
    holder.db.execute("BEGIN IMMEDIATE")
    holder.db.execute("INSERT INTO scores VALUES (?, ?)", (b"k" * 16, 1.0))
    done = threading.Event()

    def write():
        writer = ScoreStore(tmp_path)  # its own connection, as another process would have
        writer.put([b"j" * 16], [2.0])
        done.set()

    thread = threading.Thread(target=write)
    thread.start()
    assert not done.wait(6.0)  # still waiting after 6 s; sqlite3's default (5 s) failed: "database is locked"
    holder.db.execute("COMMIT")
    thread.join(10)
    assert done.is_set()
    assert ScoreStore(tmp_path).get([b"k" * 16, b"j" * 16]) == {b"k" * 16: 1.0, b"j" * 16: 2.0}


def test_a_store_never_overwrites_a_score(tmp_path):
    store = ScoreStore(tmp_path)
    store.put([b"a" * 16], [1.0])
    store.put([b"a" * 16, b"b" * 16], [5.0, 2.0])
    assert store.get([b"a" * 16, b"b" * 16, b"c" * 16]) == {b"a" * 16: 1.0, b"b" * 16: 2.0}
    assert len(store) == 2
