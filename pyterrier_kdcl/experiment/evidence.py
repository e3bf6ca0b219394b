"""The per-query evidence behind a report, and its re-check (``kdcl verify DIR``).

``perquery.csv.gz`` holds one row per (collection, system, seed, query, measure): columns ``collection, system,
seed, qid, measure, value``, systems named as in the report's tables (``minilm-l6 CL``, ``BM25``, ``teacher …``),
``seed`` empty for a system run once, values to 4 decimals. The runner writes it, reads it back and builds the
report from what it read, so the committed file reproduces every table of the report exactly; ``verify``
recomputes them (:func:`pyterrier_kdcl.experiment.report.derive`) and lists every difference from the committed
``tables/*.csv`` and ``report.md``. pt.Experiment's own per-collection tables were computed before rounding: their
means are checked to within the rounding (1e-4).

Example::

    kdcl verify docs/results/cpu-seeds     # exit status 1 and the differences, if any
"""

from __future__ import annotations

import io
import json
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pandas as pd

from pyterrier_kdcl import paths

FILE = "perquery.csv.gz"
COLUMNS = ["collection", "system", "seed", "qid", "measure", "value"]
DECIMALS = 4


def _names(config) -> dict[str, tuple[str, object]]:
    """Run name (as pt.Experiment knew it) → (system as in the report, seed or None)."""
    from pyterrier_kdcl.experiment.report import system_groups

    out = {}
    for group in system_groups(config):
        seeds = config.seeds if group["student"] is not None else [None]
        out.update({name: (group["system"], seed) for name, seed in zip(group["names"], seeds)})
    return out


def write(config, collections, path: Path) -> pd.DataFrame:
    """Writes the per-query values of ``collections`` to ``path`` (gzip CSV, 4 decimals); returns what it wrote."""
    names = _names(config)
    frames = []
    for c in collections:
        pq = c.perquery[c.perquery["name"].isin(names)]
        system, seed = zip(*(names[n] for n in pq["name"])) if len(pq) else ((), ())
        frames.append(pd.DataFrame({"collection": c.label, "system": list(system), "seed": list(seed),
                                    "qid": pq["qid"].astype(str).to_numpy(), "measure": pq["measure"].to_numpy(),
                                    "value": pq["value"].round(DECIMALS).to_numpy()}))
    evidence = pd.concat(frames, ignore_index=True) if frames else pd.DataFrame(columns=COLUMNS)
    evidence["seed"] = evidence["seed"].astype("Int64")
    path = Path(path)
    paths.write_atomically(path, lambda tmp: evidence.to_csv(tmp, index=False, float_format=f"%.{DECIMALS}f",
                                                             compression={"method": "gzip", "mtime": 0}))
    return evidence


def read(path: Path) -> pd.DataFrame:
    evidence = pd.read_csv(path, dtype={"qid": str, "system": str, "collection": str, "measure": str})
    evidence["seed"] = evidence["seed"].astype("Int64")
    return evidence


def collections_from(config, evidence: pd.DataFrame, tables: dict[str, pd.DataFrame]) -> list:
    """The report's view of each evaluation collection, rebuilt from the evidence: per-query values under the run
    names the report uses; ``tables``: pt.Experiment's table per collection label (kept as it was)."""
    from pyterrier_kdcl.experiment.config import evaluation_collections

    back = {value: name for name, value in _names(config).items()}
    out = []
    for label, data, in_domain in evaluation_collections(config):
        rows = evidence[evidence["collection"] == label]
        names = [back.get((system, None if pd.isna(seed) else int(seed)))
                 for system, seed in zip(rows["system"], rows["seed"])]
        perquery = pd.DataFrame({"name": names, "qid": rows["qid"].to_numpy(), "measure": rows["measure"].to_numpy(),
                                 "value": rows["value"].to_numpy(dtype=float)}).dropna(subset=["name"])
        out.append(SimpleNamespace(label=label, in_domain=in_domain, table=tables.get(label, pd.DataFrame()),
                                   perquery=perquery, queries=perquery["qid"].nunique(), depth=data.depth,
                                   seconds=0.0))
    return out


def config_as_run(directory: str | Path):
    """The validated config a run wrote to ``directory/config.json``, loaded again (its environment unchecked)."""
    from pyterrier_kdcl.experiment.config import load_config

    as_run = json.loads((Path(directory) / "config.json").read_text())
    as_run.pop("source", None)  # where the config was read from, recorded beside it
    return load_config(as_run, check_environment=False)


# -- kdcl verify -------------------------------------------------------------------------------------------------
def verify(directory: str | Path) -> list[str]:
    """Every difference between the report in ``directory`` and what its evidence recomputes; empty when none."""
    from pyterrier_kdcl.experiment import report
    from pyterrier_kdcl.experiment.config import evaluation_collections

    directory = Path(directory)
    if not (directory / FILE).is_file():
        return [f"{directory}: no {FILE}: the report's numbers cannot be rechecked (rerun the config to write it)"]
    config = config_as_run(directory)
    evidence = read(directory / FILE)
    committed = directory / "tables"
    tables = {label: pd.read_csv(committed / f"{label}.csv") for label, _, _ in evaluation_collections(config)
              if (committed / f"{label}.csv").is_file()}
    collections = collections_from(config, evidence, tables)
    problems = [f"{directory}: {p}" for c in collections for p in _experiment_means(c)]
    derived = report.derive(config, collections, _counts(committed))
    for stem, (frame, _) in derived.tables.items():
        problems += [f"{directory}: tables/{stem}.csv: {p}" for p in _compare(frame, committed / f"{stem}.csv")]
    text = (directory / "report.md").read_text(encoding="utf-8")
    for title, body in {"Summary": derived.summary_markdown, **derived.sections, "Verdict": derived.verdict}.items():
        if f"## {title}\n\n{body}" not in text:
            problems.append(f"{directory}: report.md: the section '{title}' differs from what the evidence gives")
    return problems


def _counts(tables: Path) -> dict[str, float]:
    """The unjudged training queries per student, as the committed curve recorded them (training facts, not
    evaluation results: the evidence cannot recompute them)."""
    from pyterrier_kdcl.experiment.report import OTHER_DATA, UNJUDGED

    path = tables / "unjudged_curve.csv"
    if not path.is_file():
        return {}
    curve = pd.read_csv(path)
    rows = curve[curve["kind"].isin([UNJUDGED, OTHER_DATA])]
    return {system.removesuffix(" KD"): float(x) for system, x in zip(rows["system"], rows["unjudged queries"])}


def _compare(frame: pd.DataFrame, path: Path) -> list[str]:
    if not path.is_file():
        return ["missing"]
    mine = pd.read_csv(io.StringIO(frame.to_csv(index=False)))  # through CSV, as the committed one went
    theirs = pd.read_csv(path)
    if list(mine.columns) != list(theirs.columns) or len(mine) != len(theirs):
        return [f"shape or columns differ: {list(mine.columns)} × {len(mine)} vs {list(theirs.columns)} × "
                f"{len(theirs)}"]
    problems = []
    for column in mine.columns:
        a, b = mine[column], theirs[column]
        if pd.api.types.is_numeric_dtype(a) and pd.api.types.is_numeric_dtype(b):
            same = np.isclose(a.to_numpy(float), b.to_numpy(float), rtol=1e-6, atol=1e-9, equal_nan=True)
        else:
            same = (a.astype(str).fillna("") == b.astype(str).fillna("")).to_numpy()
        for row in np.flatnonzero(~same)[:3]:
            problems.append(f"row {row}, '{column}': recomputed {a.iloc[row]!r}, committed {b.iloc[row]!r}")
    return problems


def _experiment_means(c) -> list[str]:
    """pt.Experiment's means against the evidence's (within its rounding)."""
    if c.table.empty or "name" not in c.table:
        return []
    means = c.perquery.groupby(["name", "measure"])["value"].mean().unstack("measure")
    problems = []
    for row in c.table.to_dict("records"):
        for measure in means.columns:
            if row["name"] in means.index and measure in row and not np.isclose(
                    row[measure], means.loc[row["name"], measure], atol=1e-4, rtol=0):
                problems.append(f"tables/{c.label}.csv: {row['name']} {measure} {row[measure]:.6f} vs the "
                                f"evidence's {means.loc[row['name'], measure]:.6f}")
    return problems
