"""experiments/dose_response.py: each point once, however many runs hold the same training runs."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pandas as pd

ROOT = Path(__file__).resolve().parent.parent


def _script():
    spec = importlib.util.spec_from_file_location("dose_response", ROOT / "experiments" / "dose_response.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _row(run, student, kd, teacher=0.04):
    return {"run": run, "student": student, "collection": "in domain (manpages)", "in_domain": True, "seeds": 5,
            "diff teacher-CL": teacher, "low teacher-CL": teacher - 0.02, "high teacher-CL": teacher + 0.02,
            "diff KD-CL": kd, "low KD-CL": kd - 0.01, "high KD-CL": kd + 0.01}


def test_a_run_that_reused_another_runs_students_adds_no_point():
    table = pd.DataFrame([_row("first", "minilm", -0.0018), _row("second", "minilm", -0.0018),
                          _row("second", "e5", 0.0156), _row("third", "minilm", -0.0017)])
    kept = _script().once(table)
    assert list(zip(kept.run, kept.student)) == [("first", "minilm"), ("second", "e5"), ("third", "minilm")]
    assert list(kept["same in"]) == ["second", "", ""]


def test_the_committed_points_are_each_training_run_once():
    table = _script().collect()
    values = ["student", "collection", "diff teacher-CL", "diff KD-CL"]
    assert not table.duplicated(values).any()
    committed = pd.read_csv(ROOT / "docs" / "results" / "dose-response" / "dose_response.csv", keep_default_na=False)
    assert list(zip(committed.run, committed.student, committed.collection)) == \
        list(zip(table.run, table.student, table.collection))
