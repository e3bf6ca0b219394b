"""The sampler's candidates live in a temporary file read back per query (issue 24, item 3: memory flat in the
number of queries): the groups are exactly those of the sampler before the spill, whatever the options, and the
file is gone once the sampler is closed or a fit ends."""

from __future__ import annotations

import hashlib
import os
import tempfile

import pandas as pd
import pyterrier as pt
import pytest
from teacher_worker import WordTeacher
from training_data import training_frames

import pyterrier_kdcl as kdcl
from pyterrier_kdcl.training import groups as groups_module
from pyterrier_kdcl.training import query_records
from pyterrier_kdcl.training import trainer as trainer_module
from pyterrier_kdcl.training.groups import GroupSampler


def varied_frames():
    """Queries of every kind the builder files differently: graded labels, unjudged queries, positives the first
    stage missed, duplicate rows, rows out of order, docnos and qids beyond ASCII, a docno ending in NUL."""
    res, qrels = training_frames(30, depth=10)
    res = res.copy()
    res.loc[res["qid"] == "q3", "qid"] = "q3-é"
    res.loc[res["docno"] == "d4-2", "docno"] = "d4-2\0"
    res.loc[res["docno"] == "d5-3", "docno"] = "d5-3ü"
    qrels = qrels.copy()
    qrels.loc[qrels["qid"] == "q3", "qid"] = "q3-é"
    extra = pd.DataFrame({"qid": ["q1", "q2", "q2", "q7", "q8", "q99"],
                          "docno": ["d1-1", "d2-2", "d2-9x", "d7-3", "d8-0", "d99-0"], "label": [2, 1, 1, 0, 2, 1]})
    qrels = pd.concat([qrels, extra], ignore_index=True)
    qrels = qrels[~qrels["qid"].isin(["q10", "q11"])]  # unjudged
    missed = res["docno"].isin(["d12-5", "d13-5"])  # positives the first stage missed
    res = pd.concat([res[~missed], res[res["qid"] == "q14"].head(3)], ignore_index=True)  # duplicate rows
    res = res.sample(frac=1, random_state=3).sort_values("qid", kind="stable").reset_index(drop=True)
    texts = dict(zip(res["docno"], res["text"]))
    texts.update({"d12-5": "the answer to list", "d13-5": "the answer to copy", "d2-9x": "the answer, elsewhere"})
    return res, qrels, texts


class GetText(pt.Transformer):
    def __init__(self, texts):
        self.texts = texts

    def transform(self, inp):
        return inp.assign(text=[self.texts[d] for d in inp["docno"]])


def judge(group):
    return [float(len(d) % 4) + (1.5 if "answer" in t else 0.0) for d, t in zip(group.docnos, group.texts)]


CASES = {  # name -> (sampler options, frames as given, negative filter)
    "text": dict(group_size=4),
    "streamed": dict(group_size=4, source="mapping", ids=True),
    "chunks": dict(group_size=4, source="transformer", ids=True, chunk_rows=7),
    "window-replace": dict(group_size=6, negatives_window=(1, 7), insufficient="replace", source="mapping"),
    "window-skip": dict(group_size=6, negatives_window=(2, 8), source="mapping", ids=True),
    "unjudged-min_label": dict(group_size=3, unjudged="distil", min_label=2, source="transformer"),
    "no-score": dict(group_size=4, drop_score=True, source="mapping", ids=True),
    "drop": dict(group_size=4, source="mapping", filter={"margin": 0.5, "action": "drop"}),
    "relabel": dict(group_size=4, ids=True, source="mapping", filter={"margin": 0.0, "action": "relabel"}),
}


def build(case: str) -> GroupSampler:
    options = dict(CASES[case])
    res, qrels, texts = varied_frames()
    source = {"mapping": texts, "transformer": GetText(texts), None: None}[options.pop("source", None)]
    if options.pop("ids", False):
        res = res.drop(columns="text")
    if options.pop("drop_score", False):
        res = res.drop(columns=["score", "rank"])
    rows = options.pop("chunk_rows", None)
    results = res if rows is None else (res.iloc[i : i + rows] for i in range(0, len(res), rows))
    rule = options.pop("filter", None)
    sampler = GroupSampler(results, qrels, seed=5, text_source=source, **options)
    if rule is not None:
        sampler.filter_negatives(rule, judge)
    return sampler


def digest(sampler: GroupSampler) -> str:
    drawn = [list(sampler.epoch(0)), list(sampler.epoch(1)), list(sampler.candidates()), vars(sampler.stats)]
    return hashlib.sha256(repr(drawn).encode()).hexdigest()[:16]


# the groups of the sampler before the spill (commit 9c8adb5, candidates in numpy arrays in memory)
BEFORE = {"chunks": "8ea7d05d09dac776", "drop": "4afad4be19cd71dc", "no-score": "2cb7add2bc2ed6a6",
          "relabel": "fcbaf2a9ee6f019d", "streamed": "8ea7d05d09dac776", "text": "cbe300c3ce31f754",
          "unjudged-min_label": "d67c8eef98bf2493", "window-replace": "1911b99ff0aa3d9f",
          "window-skip": "e9de8e9b71a33408"}


@pytest.mark.parametrize("case", sorted(CASES))
def test_the_groups_are_those_of_the_sampler_before_the_spill(case, monkeypatch):
    monkeypatch.setattr(groups_module, "TEXT_BLOCK", 5)
    assert digest(build(case)) == BEFORE[case]


@pytest.mark.parametrize("case", ["text", "streamed", "relabel"])
def test_records_written_in_many_pieces_read_back_the_same(case, monkeypatch):
    monkeypatch.setattr(groups_module, "TEXT_BLOCK", 5)
    monkeypatch.setattr(query_records, "FLUSH_BYTES", 50)  # a write every record or two
    monkeypatch.setattr(groups_module, "KEY_CHUNK", 3)
    assert digest(build(case)) == BEFORE[case]


def open_files_in(directory) -> list[str]:
    """This process's open files right in ``directory`` (an unnamed temporary file shows as ``… (deleted)``)."""
    found = []
    for fd in os.listdir("/proc/self/fd"):
        try:
            target = os.readlink(f"/proc/self/fd/{fd}")
        except OSError:
            continue
        if os.path.dirname(target.removesuffix(" (deleted)")) == str(directory):
            found.append(target)
    return found


@pytest.mark.skipif(not os.path.isdir("/proc/self/fd"), reason="reads /proc")
def test_the_file_is_unnamed_and_gone_once_the_sampler_is_closed(tmp_path):
    res, qrels = training_frames(6)
    sampler = GroupSampler(res, qrels, group_size=4, spill_dir=tmp_path)
    assert list(tmp_path.iterdir()) == [] and len(open_files_in(tmp_path)) == 1  # open, with no name
    assert sampler.file_bytes > 0 and sampler.nbytes == 12 * len(sampler) + 8
    sampler.close()
    assert open_files_in(tmp_path) == []
    with pytest.raises(ValueError, match="closed"):
        next(sampler.epoch(0))


class FailingTeacher(WordTeacher):
    def transform(self, inp):
        raise RuntimeError("the teacher failed")


@pytest.mark.skipif(not os.path.isdir("/proc/self/fd"), reason="reads /proc")
@pytest.mark.parametrize("teacher", [WordTeacher("answer", 2.0), FailingTeacher("answer", 2.0)])
def test_a_fit_removes_its_sampler_file_when_it_ends_or_fails(tiny_model, teacher, tmp_path, monkeypatch):
    spill = tmp_path / "spill"
    spill.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(spill))  # where the fit's sampler puts its file
    made = []

    class Recorded(GroupSampler):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            made.append((self, open_files_in(spill)))

    monkeypatch.setattr(trainer_module, "GroupSampler", Recorded)
    res, qrels = training_frames(8)
    student = kdcl.CrossEncoder(str(tiny_model("bert")), verbose=False, max_length=32, device="cpu")
    trainer = kdcl.DistillationTrainer(student, teacher, group_size=4, batch_size=4, verbose=False)
    if isinstance(teacher, FailingTeacher):
        with pytest.raises(RuntimeError, match="the teacher failed"):
            trainer.fit(res, qrels)
    else:
        trainer.fit(res, qrels)
    (sampler, during), = made
    assert len(during) == 1 and sampler._records.closed
    assert open_files_in(spill) == [] and [p for p in spill.iterdir() if p.is_file()] == []


if __name__ == "__main__":  # prints BEFORE for the code checked out
    groups_module.TEXT_BLOCK = 5
    print({case: digest(build(case)) for case in sorted(CASES)})


def test_a_record_reads_back_what_was_written(tmp_path):
    records = query_records.QueryRecords(scored=True, texts=True, directory=tmp_path)
    docnos, texts = ["d\0", "é", "", "\ud800x"], ["a", "", "long " * 50, "\0"]
    scores = [1.5, -0.1, float("nan"), 1e300]
    first = records.add("q\0", "qüery", 2, docnos, scores, texts)
    second = records.add("", "", 0, [], [], [])
    records.finish()
    record = records.get(first)
    assert (record.qid, record.query, record.positives, record.size) == ("q\0", "qüery", 2, 4)
    assert list(record.docnos) == docnos and list(record.texts) == texts and record.docnos[-1] == "\ud800x"
    assert record.docnos[1:3] == ["é", ""]
    with pytest.raises(IndexError):
        record.docnos[-5]
    assert record.scores.tolist()[:2] == scores[:2] and record.scores[3] == 1e300
    assert records.get(second).size == 0 and records.file_bytes == os.fstat(records.file.fileno()).st_size
    records.close()


def test_records_read_back_without_pread(monkeypatch):
    monkeypatch.delattr(query_records.os, "pread")  # as on Windows: seek and read
    monkeypatch.setattr(query_records, "FLUSH_BYTES", 50)
    monkeypatch.setattr(groups_module, "TEXT_BLOCK", 5)
    assert digest(build("text")) == BEFORE["text"]
