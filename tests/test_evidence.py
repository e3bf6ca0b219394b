"""The committed evidence: perquery.csv.gz reproduces every table and the verdict of its report, and ``kdcl verify``
finds a changed value, a changed table and a missing file."""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import pandas as pd
import pytest
from test_report_statistics import make_collections, make_config

from pyterrier_kdcl.experiment import evidence, report
from pyterrier_kdcl.experiment.cli import main as kdcl


def _reported(tmp_path: Path, seeds=(1, 2)) -> Path:
    """A report built as the runner builds it: evidence written, read back, the report made from what was read."""
    config = make_config(seeds=seeds)
    collections = make_collections(config)
    (tmp_path / "config.json").write_text(json.dumps({**config.to_dict(), "source": "made-up.yaml"}))
    evidence.write(config, collections, tmp_path / evidence.FILE)
    back = evidence.collections_from(config, evidence.read(tmp_path / evidence.FILE),
                                     {c.label: c.table for c in collections})
    report.write_report(config, [], back, tmp_path)
    return tmp_path


def test_the_evidence_has_the_promised_columns_and_names(tmp_path):
    written = evidence.read(_reported(tmp_path) / evidence.FILE)
    assert list(written.columns) == evidence.COLUMNS
    assert {"BM25", "small CL", "small KD", "large KD"} <= set(written["system"])
    assert set(written.loc[written["system"] == "small KD", "seed"]) == {1, 2}
    assert written.loc[written["system"] == "BM25", "seed"].isna().all()
    assert (written["value"] == written["value"].round(4)).all()
    with gzip.open(tmp_path / evidence.FILE, "rt") as f:
        assert f.readline().strip() == ",".join(evidence.COLUMNS)


@pytest.mark.parametrize("seeds", [(1, 2), (7,)])
def test_a_report_built_from_its_evidence_verifies(tmp_path, seeds, capsys):
    out = _reported(tmp_path, seeds)
    assert evidence.verify(out) == []
    assert kdcl(["verify", str(out)]) == 0 and "reproduce" in capsys.readouterr().out


def test_a_changed_value_is_found(tmp_path):
    out = _reported(tmp_path)
    values = evidence.read(out / evidence.FILE)
    row = values.index[(values["system"] == "small KD") & (values["collection"] == "manpages")][0]
    values.loc[row, "value"] = 1.0 - values.loc[row, "value"]
    values.to_csv(out / evidence.FILE, index=False)
    problems = evidence.verify(out)
    assert any("tables/kd_vs_cl.csv" in p for p in problems)
    assert any("tables/summary.csv" in p for p in problems)
    assert kdcl(["verify", str(out)]) == 1


def test_a_changed_sentence_or_table_is_found(tmp_path):
    out = _reported(tmp_path)
    text = (out / "report.md").read_text()
    (out / "report.md").write_text(text.replace("KD better", "KD much better", 1).replace("→ no significant",
                                                                                         "→ hardly any", 1))
    assert any("Verdict" in p for p in evidence.verify(out))
    (out / "report.md").write_text(text)
    table = pd.read_csv(out / "tables" / "teacher_vs_cl.csv")
    table.loc[0, "teacher-CL"] += 0.01
    table.to_csv(out / "tables" / "teacher_vs_cl.csv", index=False)
    assert any("teacher_vs_cl.csv" in p and "teacher-CL" in p for p in evidence.verify(out))


def test_a_report_without_evidence_cannot_be_verified(tmp_path):
    assert "no perquery.csv.gz" in evidence.verify(tmp_path)[0]


def test_the_planning_spreads_are_those_cpu_seeds_measured():
    """--check's power lines borrow cpu-seeds' variance components; they must be that run's, as committed."""
    from pyterrier_kdcl.experiment.plan import PLANNING_SPREADS, power_lines
    from pyterrier_kdcl.experiment.seed_aware import crossed

    run = Path(__file__).resolve().parent.parent / "docs" / "results" / "cpu-seeds"
    config = evidence.config_as_run(run)
    collections = evidence.collections_from(config, evidence.read(run / evidence.FILE), {})
    student = config.students[0].name
    for scope, _, in_domain, a, b in report.seed_matrices(collections, "nDCG@10", report._names(config, student, "CL"),
                                                          report._names(config, student, "KD")):
        if scope == "pooled":
            c = crossed(a.to_numpy(), b.to_numpy(), alpha=0.05)
            spreads = PLANNING_SPREADS[in_domain]
            assert (c.seed_sd, c.query_sd, c.residual_sd) == pytest.approx(
                (spreads["seed_sd"], spreads["query_sd"], spreads["residual_sd"]), abs=1e-4)
    lines = "\n".join(power_lines(config))
    committed = pd.read_csv(run / "tables" / "kd_vs_cl.csv")
    in_domain_mde = committed.loc[committed["collection"] == "in domain (manpages)", "MDE (80% power)"].item()
    assert f"MDE {in_domain_mde:.3f}" in lines  # the plan of the run is what the run then measured
    one_seed = config.model_copy(update={"seeds": [42]})
    assert "one seed cannot tell" in "\n".join(power_lines(one_seed))
