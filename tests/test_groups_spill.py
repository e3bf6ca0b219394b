"""The sampler's candidates live in a temporary file read back per query (issue 24, item 3: memory flat in the
number of queries): the groups are exactly those of the sampler before the spill, whatever the options, and the
file is gone once the sampler is closed or a fit ends."""

from __future__ import annotations

import hashlib

import numpy as np
import pandas as pd
import pyterrier as pt
import pytest
from training_data import training_frames

from pyterrier_kdcl.training import groups as groups_module
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


if __name__ == "__main__":  # prints BEFORE for the code checked out
    groups_module.TEXT_BLOCK = 5
    print({case: digest(build(case)) for case in sorted(CASES)})
