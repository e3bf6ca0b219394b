"""Claims in prose, checked against the table cells they quote.

A number in a README or a results page names the table row it comes from by being a Markdown link to the table's
CSV, with the row and column in the link's title::

    KD − CL is [+0.019](tables/kd_vs_cl.csv "student=minilm-l6-lora; collection=manpages; column=KD-CL")

The link renders as the number, and clicking it opens the table. ``check(path)`` reads every such link of a
Markdown file, finds the one CSV row whose columns equal the ``key=value`` pairs (any columns, as many as it takes
to name one row) and compares the cell in ``column`` with the number written, to the digits written: ``+0.019``
claims a cell in [0.0185, 0.0195]; ``3e-5`` one in [2.5e-5, 3.5e-5]; ``p 0.196`` is written ``[0.196](...)``.
The sign is part of the claim (``−`` and ``-`` are the same minus). A value a run writes as JSON (a fitted teacher
temperature) is claimed the same way, naming its field (a dotted path for nested ones)::

    the fitted temperature was [0.157](teacher-temperature.json "field=temperature")

``kdcl verify`` runs it over the results' READMEs and the docs (``make verify``), so a sentence whose number
drifts from its table fails CI.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path

import pandas as pd

__all__ = ["Claim", "claims_in", "check"]

# [number](path.csv "key=value; ...; column=name") or [number](path.json "field=name.inner")
_LINK = re.compile(r'\[(?P<text>[^\[\]\n]+)\]\((?P<target>[^)\s]+\.(csv|json))\s+"(?P<selector>[^"\n]+)"\)')
_CODE_SPAN = re.compile(r"`[^`]*`")  # `an example` claims nothing
_NUMBER = re.compile(r"^[+\-−]?(\d+(\.\d*)?|\.\d+)([eE][+\-−]?\d+)?$")


@dataclass(frozen=True)
class Claim:
    """One number quoted from a table: where it is written, what it says, and which cell it names."""

    source: Path
    line: int
    text: str
    table: Path
    row: dict[str, str]
    column: str

    def __str__(self) -> str:
        if self.table.suffix == ".json":
            return f"{self.source}:{self.line}: {self.text} ({self.table.name}: field {self.column})"
        where = "; ".join(f"{k}={v}" for k, v in self.row.items())
        return f"{self.source}:{self.line}: {self.text} ({self.table.name}: {where}; column {self.column})"


def claims_in(path: str | Path) -> tuple[list[Claim], list[str]]:
    """The claims of one Markdown file, and the links that look like claims but cannot be read as one."""
    path = Path(path)
    claims, problems = [], []
    fenced = False
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if line.lstrip().startswith("```"):
            fenced = not fenced
        if fenced:
            continue  # an example in a code block claims nothing
        for match in _LINK.finditer(_CODE_SPAN.sub(lambda span: " " * len(span[0]), line)):
            pairs = [part.strip() for part in match["selector"].split(";") if part.strip()]
            selector = dict(part.split("=", 1) for part in pairs if "=" in part)
            selector = {k.strip(): v.strip() for k, v in selector.items()}
            if match["target"].endswith(".json"):
                if list(selector) != ["field"] or len(pairs) != 1:
                    problems.append(f"{path}:{number}: [{match['text']}]({match['target']} ...): the title of a JSON "
                                    f"claim must be 'field=NAME' (a dotted path for a nested field)")
                    continue
                claims.append(Claim(path, number, match["text"].strip(), path.parent / match["target"], {},
                                    selector["field"]))
                continue
            column = selector.pop("column", None)
            if column is None or len(selector) != sum("=" in p for p in pairs) - 1:
                problems.append(f"{path}:{number}: [{match['text']}]({match['target']} ...): the title must be "
                                f"'key=value; ...; column=NAME' naming one row and one column")
                continue
            claims.append(Claim(path, number, match["text"].strip(), path.parent / match["target"], selector, column))
    return claims, problems


def check(path: str | Path) -> tuple[int, list[str]]:
    """How many claims ``path`` makes, and every one that its table does not bear out."""
    claims, problems = claims_in(path)
    tables: dict[Path, pd.DataFrame | dict] = {}
    for claim in claims:
        if claim.table not in tables:
            if not claim.table.is_file():
                problems.append(f"{claim}: no such table")
                continue
            if claim.table.suffix == ".json":
                tables[claim.table] = json.loads(claim.table.read_text(encoding="utf-8"))
            else:
                tables[claim.table] = pd.read_csv(claim.table, dtype=str, keep_default_na=False)
        source = tables[claim.table]
        problems += _check_field(claim, source) if isinstance(source, dict) else _check_one(claim, source)
    return len(claims), problems


def _check_field(claim: Claim, document: dict) -> list[str]:
    value = document
    for key in claim.column.split("."):
        if not isinstance(value, dict) or key not in value:
            return [f"{claim}: the file has no field {claim.column!r}"]
        value = value[key]
    return _compare(claim, value)


def _check_one(claim: Claim, table: pd.DataFrame) -> list[str]:
    unknown = [k for k in [*claim.row, claim.column] if k not in table.columns]
    if unknown:
        return [f"{claim}: the table has no column {', '.join(map(repr, unknown))}"]
    rows = table
    for key, value in claim.row.items():
        rows = rows[rows[key] == value]
    if len(rows) != 1:
        return [f"{claim}: names {len(rows)} rows, not one"]
    return _compare(claim, rows.iloc[0][claim.column])


def _compare(claim: Claim, cell) -> list[str]:
    """The number written against the value it names, to the digits written."""
    written = claim.text.replace("−", "-").replace("+", "")
    if not _NUMBER.match(written):
        return [f"{claim}: {claim.text!r} is not a number"]
    try:
        value = float(cell)
    except (TypeError, ValueError):
        return [f"{claim}: the cell holds {cell!r}, not a number"]
    if abs(value - float(written)) > _half_unit(written) * (1 + 1e-9):
        return [f"{claim}: the table says {value:.6g}"]
    return []


def _half_unit(written: str) -> float:
    """Half a unit in the last digit written: the rounding error a correctly rounded number can carry."""
    mantissa, _, exponent = written.lower().partition("e")
    decimals = len(mantissa.partition(".")[2])
    return 0.5 * 10.0 ** (int(exponent or 0) - decimals)
