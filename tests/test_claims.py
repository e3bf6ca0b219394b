"""Numbers in prose checked against the table rows they name (experiment/claims.py, `kdcl verify`)."""

from __future__ import annotations

import pandas as pd
import pytest

from pyterrier_kdcl.experiment import claims
from pyterrier_kdcl.experiment.cli import main


@pytest.fixture
def results(tmp_path):
    (tmp_path / "tables").mkdir()
    pd.DataFrame({"student": ["a", "a", "b"],
                  "collection": ["in domain (x)", "out of domain (pooled)", "in domain (x)"],
                  "KD-CL": [0.0191292, -0.0412, 0.002], "p (holm)": [0.19619, 3.2e-5, 0.7],
                  "winner": ["-", "KD", "-"]}).to_csv(tmp_path / "tables" / "kd_vs_cl.csv", index=False)
    return tmp_path


def link(text: str, row: str, column: str = "KD-CL") -> str:
    return f'[{text}](tables/kd_vs_cl.csv "{row}; column={column}")'


def write(directory, *lines: str):
    path = directory / "README.md"
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def test_numbers_that_match_their_rows_to_the_digits_written_pass(results):
    path = write(results,
                 f"KD - CL is {link('+0.019', 'student=a; collection=in domain (x)')} in domain,",
                 f"{link('−0.041', 'student=a; collection=out of domain (pooled)')} out of domain "
                 f"(p {link('3e-5', 'student=a; collection=out of domain (pooled)', 'p (holm)')}),",
                 f"and {link('0.196', 'student=a; collection=in domain (x)', 'p (holm)')}; "
                 f"a link to [the table](tables/kd_vs_cl.csv) claims nothing;",
                 f"an interval in brackets [{link('0.019', 'student=a; collection=in domain (x)')}, 1].")
    assert claims.check(path) == (5, [])


@pytest.mark.parametrize("text, row, column, says", [
    ("+0.021", "student=a; collection=in domain (x)", "KD-CL", "the table says 0.0191292"),  # drifted
    ("+0.041", "student=a; collection=out of domain (pooled)", "KD-CL", "the table says -0.0412"),  # sign lost
    ("0.0191", "collection=in domain (x)", "KD-CL", "names 2 rows, not one"),  # ambiguous
    ("0.0191", "student=c", "KD-CL", "names 0 rows, not one"),
    ("0.0191", "student=a; collection=in domain (x)", "KD − CL", "no column 'KD − CL'"),
    ("KD", "student=a; collection=out of domain (pooled)", "winner", "is not a number"),
    ("4e-5", "student=a; collection=out of domain (pooled)", "p (holm)", "the table says 3.2e-05"),
])
def test_a_claim_its_row_does_not_bear_out_is_named(results, text, row, column, says):
    path = write(results, f"text {link(text, row, column)} text")
    count, problems = claims.check(path)
    assert count == 1 and len(problems) == 1
    assert says in problems[0] and "README.md:1" in problems[0]


def test_a_title_without_a_column_or_a_missing_table_is_a_problem(results):
    path = write(results, '[0.019](tables/kd_vs_cl.csv "student=a")',
                 '[0.019](tables/other.csv "student=a; column=KD-CL")')
    count, problems = claims.check(path)
    assert count == 1
    assert "the title must be 'key=value; ...; column=NAME'" in problems[0] and "no such table" in problems[1]


def test_kdcl_verify_checks_a_markdown_file_and_fails_on_a_wrong_claim(results, capsys):
    good = write(results, link("+0.019", "student=a; collection=in domain (x)"))
    assert main(["verify", str(good)]) == 0
    assert "1 claim(s) of README.md match their tables" in capsys.readouterr().out
    bad = write(results, link("+0.029", "student=a; collection=in domain (x)"))
    assert main(["verify", str(bad)]) == 1
    assert "the table says 0.0191292" in capsys.readouterr().out
    assert main(["verify", str(results / "nothing.md")]) == 1


def test_a_value_a_run_wrote_as_json_is_claimed_by_its_field(results):
    (results / "teacher-temperature.json").write_text('{"temperature": 0.15684, "fit": {"queries": 29}}')
    good = write(results, '[0.157](teacher-temperature.json "field=temperature") from '
                          '[29](teacher-temperature.json "field=fit.queries") queries')
    assert claims.check(good) == (2, [])
    bad = write(results, '[0.158](teacher-temperature.json "field=temperature"), '
                         '[29](teacher-temperature.json "field=queries"), '
                         '[29](teacher-temperature.json "column=queries")')
    count, problems = claims.check(bad)
    assert count == 2 and len(problems) == 3
    assert "the table says 0.15684" in problems[1]
    assert "no field 'queries'" in problems[2]
    assert "must be 'field=NAME'" in problems[0]
