"""Scale: groups built from ids with text fetched per block (streaming), and from the results handed over a frame at a
time, train exactly like the in-memory frame; teacher scores sharded by rank into per-rank files merge once into the
cache (issue 24, item 3)."""

import numpy as np
import pandas as pd
import pytest
import torch
from teacher_worker import WordTeacher
from training_data import training_frames

import pyterrier_kdcl as kdcl
from pyterrier_kdcl.training import groups as groups_module
from pyterrier_kdcl.training import query_records, teachers
from pyterrier_kdcl.training.groups import GroupSampler
from pyterrier_kdcl.training.teachers import (
    SCORE_FILE,
    Processes,
    ScoreStore,
    TeacherScores,
    merge_shards,
    shard_file,
    teacher_fingerprint,
)


class CountingDocstore(dict):
    """docno → text, counting how many texts were asked for."""

    fetched = 0

    def get(self, key, default=None):
        self.fetched += 1
        return super().get(key, default)


def frames(n=20):
    res, qrels = training_frames(n)
    docstore = CountingDocstore(zip(res["docno"], res["text"]))
    return res, res.drop(columns="text"), qrels, docstore


def test_a_streamed_sampler_draws_the_groups_of_the_in_memory_frame(monkeypatch):
    monkeypatch.setattr(groups_module, "TEXT_BLOCK", 3)  # several blocks per epoch
    res, ids, qrels, docstore = frames()
    memory = GroupSampler(res, qrels, group_size=4, seed=7)
    streamed = GroupSampler(ids, qrels, group_size=4, seed=7, text_source=docstore)
    assert streamed.streaming and not memory.streaming
    assert not streamed._records.keeps_texts and memory._records.keeps_texts  # no text is kept, not even on disk
    assert streamed.file_bytes < memory.file_bytes
    for epoch in (0, 1):
        assert list(streamed.epoch(epoch)) == list(memory.epoch(epoch))
    assert list(streamed.candidates()) == list(memory.candidates())
    assert 0 < docstore.fetched


def test_a_streamed_sampler_refuses_a_docno_its_docstore_lacks():
    _, ids, qrels, docstore = frames(4)
    del docstore["d0-5"]
    with pytest.raises(ValueError, match="text_source has no text for docno 'd0-5'"):
        list(GroupSampler(ids, qrels, group_size=4, text_source=docstore).epoch(0))


def test_a_frame_without_text_and_without_a_text_source_points_to_both():
    _, ids, qrels, _ = frames(4)
    with pytest.raises(ValueError, match="pt.text.get_text.*text_source="):
        GroupSampler(ids, qrels, group_size=4)


def in_frames(frame, rows):
    """The frame as a generator of frames of ``rows`` rows: a query's rows may span two of them."""
    return (frame.iloc[start : start + rows] for start in range(0, len(frame), rows))


def test_results_handed_over_a_frame_at_a_time_give_the_groups_of_one_frame(monkeypatch):
    monkeypatch.setattr(query_records, "FLUSH_BYTES", 100)  # the records written in many pieces
    res, ids, qrels, docstore = frames()
    whole = GroupSampler(res, qrels, group_size=4, seed=7, negatives_window=(0, 7))
    shuffled = res.sample(frac=1, random_state=1).sort_values("qid", kind="stable")  # rows of a query together
    for results in (in_frames(shuffled, 11), [shuffled], in_frames(shuffled.drop(columns="text"), 5)):
        sampler = GroupSampler(results, qrels, group_size=4, seed=7, negatives_window=(0, 7), text_source=docstore)
        for epoch in (0, 1):
            assert list(sampler.epoch(epoch)) == list(whole.epoch(epoch))
        assert list(sampler.candidates()) == list(whole.candidates())
        assert vars(sampler.stats) == vars(whole.stats)


def test_a_frame_larger_than_a_chunk_is_read_in_chunks_in_any_row_order(monkeypatch):
    res, _, qrels, _ = frames()
    whole = list(GroupSampler(res, qrels, group_size=4, seed=2).epoch(0))
    monkeypatch.setattr(groups_module, "CHUNK_ROWS", 7)
    for frame in (res, res.sample(frac=1, random_state=0)):  # grouped by query, or not at all
        assert list(GroupSampler(frame, qrels, group_size=4, seed=2).epoch(0)) == whole


def test_a_query_met_again_after_other_queries_is_refused():
    res, _, qrels, _ = frames(4)
    q0 = res[res["qid"] == "q0"]
    with pytest.raises(ValueError, match="query 'q0' again after other queries.*sort a run by qid"):
        GroupSampler([q0.iloc[:4], res[res["qid"] == "q1"], q0.iloc[4:]], qrels, group_size=4)
    with pytest.raises(TypeError, match="result frames"):
        GroupSampler(["not a frame"], qrels, group_size=4)


def test_the_sampler_holds_12_bytes_a_query_in_memory_and_its_candidates_in_a_file():
    res, ids, qrels, docstore = frames(40)
    sampler = GroupSampler(ids, qrels, group_size=4, text_source=docstore)
    assert sum(sampler._records.get(i).size for i in range(len(sampler))) == len(ids)
    assert sampler.nbytes == 12 * len(sampler) + 8  # a record's offset and its place in qid order
    # a record: 16 bytes of header, qid and query; a docno's bytes (5 here), its end and its float64 score
    assert sampler.file_bytes <= 21 * len(ids) + 40 * len(sampler)


@pytest.mark.parametrize("objective", ["cl", "kd"])
def test_a_streamed_fit_trains_like_the_in_memory_fit(tiny_model, objective, tmp_path):
    res, ids, qrels, docstore = frames(12)
    logs, weights = [], []
    for frame, source in ((res, None), (ids, docstore), (in_frames(ids, 10), docstore)):
        student = kdcl.CrossEncoder(str(tiny_model("bert")), verbose=False, max_length=32, device="cpu")
        options = dict(group_size=4, batch_size=4, epochs=2, seed=3, verbose=False, text_source=source)
        trainer = (kdcl.ContrastiveTrainer(student, **options) if objective == "cl" else
                   kdcl.DistillationTrainer(student, WordTeacher("answer", 2.0), **options))
        logs.append(trainer.fit(frame, qrels))
        weights.append(student.ranker.state_dict())
    for log, weight in zip(logs[1:], weights[1:]):
        pd.testing.assert_series_equal(logs[0]["loss"], log["loss"])
        for key in weights[0]:
            torch.testing.assert_close(weights[0][key], weight[key], atol=0, rtol=0)


def groups(n=10):
    res, qrels = training_frames(n)
    return list(GroupSampler(res, qrels, group_size=4, seed=1).epoch(0))


def test_teacher_scores_hold_no_pair_in_memory_and_span_chunks(monkeypatch):
    monkeypatch.setattr(teachers, "CHUNK_PAIRS", 5)  # many chunks; the second epoch's pairs repeat the first's
    res, qrels = training_frames(10)
    sampler = GroupSampler(res, qrels, group_size=4, seed=1)
    both = list(sampler.epoch(0)) + list(sampler.epoch(1))
    teacher = WordTeacher("answer", 2.0)
    scores = TeacherScores(teacher, None)
    scores.prepare(both)
    distinct = {(g.query, d, t) for g in both for d, t in zip(g.docnos, g.texts)}
    assert scores.scored == len(distinct) == len(scores._lookups)  # each pair scored once, across chunks
    assert not [v for v in vars(scores).values() if isinstance(v, (np.ndarray, dict, list))]  # nothing a pair
    expected = torch.tensor([[2.0 * t.count("answer") for t in g.texts] for g in both])
    torch.testing.assert_close(scores.lookup(both), expected)
    with pytest.raises(KeyError, match="prepare"):
        scores.lookup([groups_module.Group("q", "unseen", ("x",), ("never scored",))])


def test_teacher_scoring_sharded_by_rank_into_files_merges_once(tmp_path):
    """Two machines (simulated ranks, no shared process group) score halves into their own files; the files
    merge once into one cache, from which a fit's teacher scores nothing."""
    gs = groups()
    pairs = {(g.query, d, t) for g in gs for d, t in zip(g.docnos, g.texts)}
    counts = []
    for rank in (0, 1):  # each alone, as on its own machine: broadcast and gather reach no other process
        teacher = WordTeacher("answer", 2.0)
        TeacherScores(teacher, tmp_path / f"machine{rank}").prepare(gs, Processes(rank=rank, world=2))
        counts.append(len(teacher.scored))
    assert sum(counts) == len(pairs) and abs(counts[0] - counts[1]) <= 1
    name = teacher_fingerprint(WordTeacher("answer", 2.0))
    main, other = tmp_path / "machine0" / name, tmp_path / "machine1" / name
    assert (main / SCORE_FILE).exists() and (other / shard_file(1)).exists()  # rank 1 never opened the main file
    assert not (other / SCORE_FILE).exists()
    (other / shard_file(1)).rename(main / shard_file(1))  # copied to the first machine
    assert merge_shards(main) == counts[1]
    assert not (main / shard_file(1)).exists() and len(ScoreStore(main)) == len(pairs)
    teacher = WordTeacher("answer", 2.0)
    again = TeacherScores(teacher, tmp_path / "machine0")
    again.prepare(gs)
    assert teacher.scored == [] and again.scored == 0
    torch.testing.assert_close(again.lookup(gs), torch.tensor([[2.0 * t.count("answer") for t in g.texts]
                                                               for g in gs]))


def test_a_crashed_ranks_shard_is_merged_by_the_next_prepare(tmp_path):
    gs = groups()
    teacher = WordTeacher("answer", 2.0)
    TeacherScores(teacher, tmp_path).prepare(gs, Processes(rank=1, world=2))  # its half, left in its file
    again = WordTeacher("answer", 2.0)
    TeacherScores(again, tmp_path).prepare(gs)
    assert len(again.scored) == sum(len(g.docnos) for g in gs) - len(teacher.scored)
    assert not list(tmp_path.rglob("scores.rank-*"))


class RootTeacher(WordTeacher):
    """Scores that use every bit of a float64 (a root of the text's length), so a lookup that rounds shows."""

    def transform(self, inp):
        return inp.assign(score=[(len(t) + 0.1) ** 0.5 / 3 for t in inp["text"]])

    def fingerprint(self) -> str:
        return "root"


def test_lookups_read_from_the_cache_file_are_the_teachers_own_scores(tmp_path, monkeypatch):
    monkeypatch.setattr(teachers, "CHUNK_PAIRS", 7)
    res, qrels = training_frames(10)
    sampler = GroupSampler(res, qrels, group_size=4, seed=1, insufficient="replace")
    gs = list(sampler.epoch(0)) + list(sampler.epoch(1))
    own = RootTeacher("", 1.0)
    expected = [own(pd.DataFrame({"qid": g.qid, "query": g.query, "docno": g.docnos, "text": g.texts}))["score"]
                .to_numpy("float64") for g in gs]
    for cache in (tmp_path, tmp_path, None):  # a cold cache, the same cache warm, no cache (a temporary store)
        scores = TeacherScores(RootTeacher("", 1.0), cache)
        scores.prepare(gs)
        scores.close()
        for g, want in zip(gs, expected):
            np.testing.assert_array_equal(scores.of(g), want)  # float64, bit for bit
        torch.testing.assert_close(scores.lookup(gs), torch.tensor(np.stack(expected), dtype=torch.float32),
                                   rtol=0, atol=0)
        assert (scores._lookups is None) == (cache is not None)  # the cache file itself is read
        with pytest.raises(KeyError, match="prepare"):
            scores.lookup([groups_module.Group("q", "unseen", ("x",), ("never scored",))])
        scores.close()
    assert scores.scored == len({(g.query, d, t) for g in gs for d, t in zip(g.docnos, g.texts)})
