"""experiments/interpolation.py: a trained reranker interpolated with its first stage, replayed from saved runs."""

from __future__ import annotations

import runpy
from pathlib import Path

import numpy as np
import pandas as pd
import pyterrier as pt
import pytest

from pyterrier_kdcl.fusion import ScoreFusion

SCRIPT = Path(__file__).resolve().parent.parent / "experiments" / "interpolation.py"


@pytest.fixture(scope="module")
def script():
    return runpy.run_path(str(SCRIPT))


def _frames():
    rng = np.random.default_rng(0)
    rows = [{"qid": f"q{q}", "query": f"query {q}", "docno": f"d{q}-{d}", "score": float(20 - d + rng.normal())}
            for q in range(3) for d in range(6)]
    first = pt.model.add_ranks(pd.DataFrame(rows))
    reranked = first.assign(score=rng.normal(size=len(first)))
    return first, pt.model.add_ranks(reranked)


@pytest.mark.parametrize("weights, follows", [({"BM25": 0.0, "reranker": 1.0}, "reranker"),
                                              ({"BM25": 1.0, "reranker": 0.0}, "BM25")])
def test_the_replayed_interpolation_ranks_as_the_member_it_weights(script, tmp_path, weights, follows):
    first, reranked = _frames()
    saved = tmp_path / "reranker.res.gz"
    pt.io.write_results(reranked, str(saved))
    fusion = ScoreFusion({"BM25": script["FirstStageScore"](), "reranker": None}, weights,
                         {"BM25": (10.0, 2.0), "reranker": (0.0, 1.0)})
    out = script["replayed"](fusion, saved, first)
    expected = reranked if follows == "reranker" else first
    for qid, group in out.groupby("qid"):
        order = list(group.sort_values("rank").docno)
        assert order == list(expected[expected.qid == qid].sort_values("rank").docno)


def test_a_saved_run_of_other_candidates_is_refused(script, tmp_path):
    first, reranked = _frames()
    saved = tmp_path / "reranker.res.gz"
    pt.io.write_results(reranked[reranked.qid != "q2"], str(saved))
    fusion = ScoreFusion({"BM25": script["FirstStageScore"](), "reranker": None}, {"BM25": 0.5, "reranker": 0.5},
                         {"BM25": (10.0, 2.0), "reranker": (0.0, 1.0)})
    with pytest.raises(SystemExit, match="not the run of these candidates"):
        script["replayed"](fusion, saved, first)


def test_per_query_values_count_unjudged_candidates_as_misses(script):
    run = pd.DataFrame({"qid": ["q1", "q1"], "docno": ["a", "b"], "score": [2.0, 1.0]})
    qrels = pd.DataFrame({"qid": ["q1"], "docno": ["b"], "label": [1]})
    values = script["per_query"](run, qrels, ["RR@10"]).set_index("measure")["value"]
    assert values["RR@10"] == pytest.approx(0.5)
