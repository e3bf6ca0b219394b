"""experiments/compare_runs.py: one run's system against another's, from the committed per-query evidence."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "docs" / "results"


def _script():
    spec = importlib.util.spec_from_file_location("compare_runs", ROOT / "experiments" / "compare_runs.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_a_run_against_itself_reproduces_its_own_kd_vs_cl_table():
    """The cross-run comparison is the report's seed-aware test: CL=KD pairs within one run give kd_vs_cl.csv."""
    run = RESULTS / "cpu-architectures"
    report = pd.read_csv(run / "tables" / "kd_vs_cl.csv")
    pairs = [(f"{s} CL", f"{s} KD") for s in report.student.unique()]
    table = _script().compare(run, run, pairs, "nDCG@10")
    for _, row in report.iterrows():
        mine = table[(table.A == f"{row.student} CL") & (table.scope == row.scope)
                     & (table.collection == row.collection)]
        assert len(mine) == 1, (row.student, row.collection)
        for ours, theirs in [("B-A", "KD-CL"), ("p (seed-aware t)", "p (seed-aware t)"), ("p (holm)", "p (holm)"),
                             ("MDE (80% power)", "MDE (80% power)")]:
            assert mine.iloc[0][ours] == pytest.approx(row[theirs], rel=1e-6, abs=1e-9), (ours, row.collection)


@pytest.mark.parametrize("path", sorted(RESULTS.glob("*/tables/vs_*.csv")), ids=lambda p: f"{p.parts[-3]}/{p.name}")
def test_every_committed_comparison_is_rebuilt_from_the_evidence(path):
    committed = pd.read_csv(path)
    base, variant = RESULTS / committed["A run"].iloc[0], RESULTS / committed["B run"].iloc[0]
    pairs = list(dict.fromkeys(zip(committed.A, committed.B)))
    rebuilt = _script().compare(base, variant, pairs, committed.measure.iloc[0])
    assert list(rebuilt.columns) == list(committed.columns)
    for column in committed.columns:
        if pd.api.types.is_float_dtype(committed[column]):
            np.testing.assert_allclose(rebuilt[column], committed[column], rtol=1e-9, atol=1e-12, err_msg=column)
        else:
            assert list(rebuilt[column].astype(str)) == list(committed[column].astype(str)), column


def test_runs_of_other_seeds_or_queries_are_refused(tmp_path):
    run = RESULTS / "cpu-architectures"
    values = pd.read_csv(run / "perquery.csv.gz", dtype={"seed": str, "qid": str}, keep_default_na=False)
    other = tmp_path / "other"
    other.mkdir()
    (other / "config.json").write_text((run / "config.json").read_text())
    values[values.seed != "5"].to_csv(other / "perquery.csv.gz", index=False)
    with pytest.raises(SystemExit, match="different seeds or queries"):
        _script().compare(run, other, [("minilm-l6-mean CL", "minilm-l6-mean CL")], "nDCG@10")


def test_a_system_run_once_meets_every_seed_as_in_the_report():
    """BM25 (no seed) against a student's seeds: the report's KD − BM25 rows, before its Holm family."""
    run = RESULTS / "cpu-architectures"
    report = pd.read_csv(run / "tables" / "kd_vs_bm25.csv")
    table = _script().compare(run, run, [("BM25", "minilm-l6-mean KD")], "nDCG@10")
    for _, row in report[report.student == "minilm-l6-mean"].iterrows():
        mine = table[table.collection == row.collection].iloc[0]
        assert mine["B-A"] == pytest.approx(row["KD-BM25"], rel=1e-9)
        assert mine["p (seed-aware t)"] == pytest.approx(row["p (seed-aware t)"], rel=1e-6)
