"""The experiment's tables, plots and verdict, from its evaluation results and training logs.

Written under the output directory:

- ``tables/<collection>.csv|md``: pt.Experiment's table per collection (every system and seed, with the paired
  test against the baseline, its multiple-testing correction and the counts of queries improved/degraded);
- ``tables/<collection>.mean.csv|md``: mean ± standard deviation over seeds per system;
- ``tables/summary.csv|md``: the paper's shape (rows: student × objective; columns: in-domain collections, each
  out-of-domain collection, and per scope of several collections the mean over all its queries) for the main
  measure;
- ``tables/kd_vs_cl.csv|md``: KD − CL per student and collection, and pooled in/out of domain: with several seeds
  the seed-aware test (:mod:`pyterrier_kdcl.experiment.seed_aware`: queries and training runs both random, each
  seed's difference listed), with one the paired test over queries (:mod:`pyterrier_kdcl.experiment.statistics`);
  an interval that agrees with the test, the corrected p-value and the test's minimum detectable effect;
- ``tables/teacher_vs_cl.csv|md``: the teacher's margin over each student's CL run, the same way;
- ``tables/unjudged_vs_cl.csv|md`` and ``unjudged_vs_kd``: each student trained with unjudged queries against its
  base student's CL and KD runs, the same way (with ``plots/unjudged_vs_cl.png``, ``unjudged_vs_kd.png``);
- ``tables/unjudged_curve.csv|md`` and ``plots/unjudged_curve.png``: the main measure against the number of
  unjudged training queries, pooled in and out of domain, with the comparisons' intervals and the references;
- ``plots/kd_minus_cl.png`` and ``plots/training_curves.png``; ``report.md`` with all of it and the verdict.

Every number has one definition, named in its column: a pooled number is the mean over the scope's queries
(:func:`pooled_label`), the same in the summary, the comparison tables and the verdict, which quotes the tables.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from pyterrier_kdcl import paths
from pyterrier_kdcl.experiment import seed_aware, statistics
from pyterrier_kdcl.experiment.config import OBJECTIVES
from pyterrier_kdcl.experiment.statistics import POWER

IN_DOMAIN, OUT_OF_DOMAIN = "in domain", "out of domain"


@dataclass
class Report:
    summary: pd.DataFrame
    summary_markdown: str
    kd_vs_cl: pd.DataFrame
    verdict: str
    files: list[Path] = field(default_factory=list)
    teacher_vs_cl: pd.DataFrame | None = None

    def __str__(self) -> str:
        return f"{self.summary_markdown}\n\n{self.verdict}"


# -- systems ---------------------------------------------------------------------------------------------------
def system_groups(config) -> list[dict]:
    """Every row of the summary: its label, student, objective, and its system names (one per seed)."""
    spec = config.teacher
    teacher = "teacher" if spec.name == "teacher" else f"teacher {spec.name}"
    objective = "CL" if spec.train != "none" else "given"
    if spec.kind == "fusion":  # the row says what was fused
        teacher += f" (fusion of {', '.join(m.name for m in spec.members)})"
        objective = "fused"
    rows = [{"system": "BM25", "student": None, "objective": None, "names": ["BM25"]},
            {"system": teacher, "student": None, "objective": objective, "names": ["teacher"]}]
    for s in config.students:
        for o in s.objectives:
            rows.append({"system": f"{s.name} {o}", "student": s.name, "objective": o,
                         "names": [f"{s.name}-{o}-s{seed}" for seed in config.seeds]})
    return rows


def _measure(name: str) -> str:
    import ir_measures

    return str(ir_measures.parse_measure(name))


# -- tables ----------------------------------------------------------------------------------------------------
def mean_table(config, result) -> pd.DataFrame:
    """Mean and standard deviation over seeds of every measure, per system, on one collection (from the per-query
    values: each run's mean over the collection's queries)."""
    measures = [_measure(m) for m in config.evaluation.measures]
    means = _run_means(result.perquery)
    rows = []
    for group in system_groups(config):
        row = {"system": group["system"], "seeds": sum(n in means.index for n in group["names"])}
        for m in measures:
            values = [means.loc[n, m] for n in group["names"] if n in means.index and m in means.columns]
            row[m], row[f"{m} std"] = _mean_std(values)
        rows.append(row)
    return pd.DataFrame(rows)


def _run_means(perquery: pd.DataFrame) -> pd.DataFrame:
    """Each run's mean over its queries, per measure (rows: run names; columns: measures)."""
    return perquery.groupby(["name", "measure"])["value"].mean().unstack("measure")


def pooled_label(scope: str, members: list[str]) -> str:
    """The one name of a pooled number, used by the summary's column, the comparison tables' rows and the
    verdict alike: ``out of domain (pooled queries)`` is the mean over every query of the scope's collections
    (each query weighs the same, so a collection weighs by its number of queries)."""
    return f"{scope} (pooled queries)" if len(members) > 1 else f"{scope} ({members[0]})"


def _scopes(collections) -> list[tuple[str, bool, list[str]]]:
    """(scope, in_domain, member labels) for the scopes that have collections."""
    out = []
    for scope, in_domain in ((IN_DOMAIN, True), (OUT_OF_DOMAIN, False)):
        members = [c.label for c in collections if c.in_domain == in_domain]
        if members:
            out.append((scope, in_domain, members))
    return out


def summary_table(config, collections) -> pd.DataFrame:
    """Main measure per system × collection (mean and std over seeds), and, for a scope of several collections,
    the pooled mean over all its queries (per seed, then mean and std over seeds) named by :func:`pooled_label`."""
    main = _measure(config.evaluation.main_measure)
    values = {c.label: c.perquery[c.perquery["measure"] == main] for c in collections}
    means = {label: pq.groupby("name")["value"].mean() for label, pq in values.items()}
    pooled = [(pooled_label(scope, members), members) for scope, _, members in _scopes(collections)
              if len(members) > 1]
    rows = []
    for group in system_groups(config):
        row = {"system": group["system"], "student": group["student"], "objective": group["objective"]}
        for c in collections:
            seeds = [means[c.label][n] for n in group["names"] if n in means[c.label].index]
            row[c.label], row[f"{c.label} std"] = _mean_std(seeds)
        for label, members in pooled:
            per_seed = []
            for name in group["names"]:
                runs = [values[m][values[m]["name"] == name]["value"] for m in members]
                if all(len(r) for r in runs):
                    per_seed.append(float(pd.concat(runs).mean()))
            row[label], row[f"{label} std"] = _mean_std(per_seed)
        rows.append(row)
    return pd.DataFrame(rows)


def _mean_std(values) -> tuple[float, float]:
    values = [v for v in values if v is not None and not pd.isna(v)]
    if not values:
        return float("nan"), float("nan")
    return float(np.mean(values)), float(np.std(values, ddof=1)) if len(values) > 1 else float("nan")


# -- paired comparisons ----------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Columns:
    """A comparison table's column names; each names what it holds (test, interval, correction, power)."""

    a: str
    b: str
    difference: str
    estimate: str | None    # the Hodges–Lehmann shift under the Wilcoxon test; None under t (the mean difference)
    low: str
    high: str
    p: str
    p_corrected: str
    mde: str
    mde_alpha: str

    @property
    def interval(self) -> str:
        return self.low.replace(" low", "")


def is_seed_aware(config) -> bool:
    """Whether comparisons of trained systems use the seed-aware test (:mod:`.seed_aware`): with several seeds."""
    return len(config.seeds) > 1


def columns(config, a: str = "CL", b: str = "KD") -> Columns:
    ev = config.evaluation
    level = f"{100 * (1 - ev.alpha):g}% CI"
    if is_seed_aware(config):
        kind, test = "seed-aware t, uncorrected", "seed-aware t"
    else:
        kind = "one seed, t, uncorrected" if ev.test == "t" else "one seed, HL, Wilcoxon, uncorrected"
        test = f"{ev.test}, one seed"
    wilcoxon = ev.test == "wilcoxon" and not is_seed_aware(config)
    return Columns(a=a, b=b, difference=f"{b}-{a}", estimate="HL" if wilcoxon else None,
                   low=f"{level} low ({kind})", high=f"{level} high ({kind})", p=f"p ({test})",
                   p_corrected=f"p ({ev.correction})" if ev.correction else "p (no correction)",
                   mde=f"MDE ({POWER:.0%} power)", mde_alpha="MDE α")


TABLE_ORDER = ["student", "scope", "collection", "in_domain", "queries", "seeds", "a", "b", "diff", "per seed",
               "estimate", "low", "high", "p", "p corrected", "significant", "winner", "seed sd", "se", "df", "mde",
               "mde alpha"]


def comparison_table(config, collections, pairs, cols: Columns) -> pd.DataFrame:
    """``cols.b`` − ``cols.a`` of the main measure for each ``(student, names_a, names_b)`` of ``pairs`` (run names
    in seed order; one name for a system run once): a row per collection, and a pooled row per scope
    (:func:`pooled_label`).

    With several seeds the test is :func:`.seed_aware.crossed` (query and training run both random; runs of the same
    seed paired); ``per seed`` lists each seed's mean difference and ``seed sd`` the spread of training runs it
    estimates. With one seed it is :func:`statistics.paired` with ``evaluation.test``, over queries only: it cannot
    tell the objective from the seed. Intervals at level ``1 - alpha``, uncorrected. The correction
    (``evaluation.correction``, statsmodels' ``multipletests``) runs within two families: the per-collection rows,
    and the pooled rows. ``significant`` and ``winner`` use the corrected p-value. The MDE is the test's own (its
    standard error and degrees of freedom) at the family's ``alpha / m`` (:func:`statistics.family_alpha`).
    """
    ev = config.evaluation
    main = _measure(ev.main_measure)
    rows = []
    for student, names_a, names_b in pairs:
        for scope, label, in_domain, a, b in seed_matrices(collections, main, names_a, names_b):
            rows.append({"student": student, "scope": scope, "collection": label, "in_domain": in_domain,
                         **_compare(a, b, test=ev.test, alpha=ev.alpha)})
    table = pd.DataFrame(rows, columns=[c for c in TABLE_ORDER if c not in ("p corrected", "significant", "winner",
                                                                              "mde", "mde alpha")])
    table["p corrected"], table["significant"], table["winner"] = np.nan, False, "-"
    table["mde"], table["mde alpha"] = np.nan, np.nan
    for scope in ("collection", "pooled"):
        mask = table["scope"] == scope
        family = table.loc[mask, "p"].to_numpy(dtype=float)
        table.loc[mask, "p corrected"] = statistics.correct(family, ev.correction, ev.alpha)
        level = statistics.family_alpha(ev.alpha, ev.correction, int((~np.isnan(family)).sum()))
        table.loc[mask, "mde alpha"] = level
        table.loc[mask, "mde"] = [statistics.mde_from_se(se, df, level)
                                  for se, df in zip(table.loc[mask, "se"], table.loc[mask, "df"])]
    table["significant"] = table["p corrected"].astype(float) < ev.alpha
    table["winner"] = [(_direction(row, cols) if row["significant"] else "-") for row in table.to_dict("records")]
    names = {"a": cols.a, "b": cols.b, "diff": cols.difference, "per seed": f"per seed {cols.difference}",
             "estimate": cols.estimate, "low": cols.low, "high": cols.high, "p": cols.p,
             "p corrected": cols.p_corrected, "mde": cols.mde, "mde alpha": cols.mde_alpha}
    drop = [] if cols.estimate else ["estimate"]
    if not is_seed_aware(config):
        drop += ["seed sd"]
    table = table.drop(columns=drop)
    return table[[c for c in TABLE_ORDER if c in table.columns]].rename(columns=names)


def seed_matrices(collections, measure: str, names_a: list[str], names_b: list[str]):
    """``(scope, label, in_domain, a, b)`` per collection (scope ``collection``) and per pooled scope (``pooled``,
    :func:`pooled_label`): ``a`` and ``b`` are frames of ``measure`` with a row per run (in the order of
    ``names_a`` / ``names_b``) and a column per query that every one of these runs has (a pooled frame's columns:
    ``collection/qid``)."""
    both = {}
    for c in collections:
        pq = c.perquery[c.perquery["measure"] == measure]
        a, b = _runs_by_query(pq, names_a), _runs_by_query(pq, names_b)
        shared = a.columns.intersection(b.columns)
        both[c.label] = (a[shared], b[shared])
        yield "collection", c.label, c.in_domain, a[shared], b[shared]
    for scope, in_domain, members in _scopes(collections):
        a, b = ([both[m][side].set_axis([f"{m}/{q}" for q in both[m][side].columns], axis=1) for m in members]
                for side in (0, 1))
        yield "pooled", pooled_label(scope, members), in_domain, pd.concat(a, axis=1), pd.concat(b, axis=1)


def _runs_by_query(pq: pd.DataFrame, names: list[str]) -> pd.DataFrame:
    """Runs × queries of the runs in ``names`` that have values, in that order; queries that every one has."""
    values = pq[pq["name"].isin(names)]
    if values.empty:
        return pd.DataFrame()
    wide = values.pivot_table(index="name", columns="qid", values="value", aggfunc="first")
    return wide.reindex([n for n in names if n in wide.index]).dropna(axis=1)


def kd_vs_cl_table(config, collections) -> pd.DataFrame:
    """KD − CL per student trained both ways (:func:`comparison_table`)."""
    pairs = [(s.name, _names(config, s.name, "CL"), _names(config, s.name, "KD")) for s in config.students
             if {"CL", "KD"} <= set(s.objectives)]
    return comparison_table(config, collections, pairs, columns(config, "CL", "KD"))


def teacher_vs_cl_table(config, collections) -> pd.DataFrame:
    """The teacher's margin over each student's CL run (:func:`comparison_table`): what KD could pass on."""
    pairs = [(s.name, _names(config, s.name, "CL"), ["teacher"]) for s in config.students if "CL" in s.objectives]
    return comparison_table(config, collections, pairs, columns(config, "CL", "teacher"))


UNJUDGED = "KD+unjudged"


def unjudged_tables(config, collections) -> dict[str, pd.DataFrame]:
    """Each student trained with unjudged queries (``unjudged:``) against its ``base`` student's CL run and KD run
    (:func:`comparison_table`): what the queries without qrels added. Keyed by the base run's objective."""
    variants = [s for s in config.students if s.unjudged and s.base]
    objectives = {s.name: s.objectives for s in config.students}
    tables = {}
    for objective in OBJECTIVES:
        pairs = [(s.name, _names(config, s.base, objective), _names(config, s.name, "KD")) for s in variants
                 if objective in objectives[s.base]]
        if pairs:
            tables[objective] = comparison_table(config, collections, pairs, columns(config, objective, UNJUDGED))
    return tables


OTHER_DATA = "KD+unjudged (other data)"
REFERENCES = ("CL", "teacher", "BM25")


def unjudged_counts(config, models) -> dict[str, float]:
    """The unjudged training queries each ``unjudged:`` student trained on, as the runner counted them: the group
    statistics its KD stages recorded (queries with no qrels at all that reached the trainer), averaged over
    seeds. A student whose stages recorded none is left out."""
    counts = {}
    for s in config.students:
        if not (s.unjudged and s.base):
            continue
        seen = [m.groups["unjudged"] for m in models
                if m.student == s.name and m.objective == "KD" and (m.groups or {}).get("unjudged") is not None]
        if seen:
            counts[s.name] = float(np.mean(seen))
    return counts


def unjudged_curve_table(config, collections, counts: dict[str, float]) -> pd.DataFrame:
    """The main measure against the number of unjudged training queries (``counts``, :func:`unjudged_counts`),
    per base student and pooled scope: the base's KD run at 0, each ``unjudged:`` student at its count — on the
    curve when its unjudged queries come from the training dataset, ``KD+unjudged (other data)`` otherwise — and
    the base's CL run, the teacher and BM25 as references.

    ``mean`` is the mean over the scope's queries of each query's value averaged over seeds (the summary's pooled
    number); the interval is that of :func:`comparison_table`'s test (seed-aware with several seeds, the paired t
    with one; level ``1 - alpha``) of the difference from the base's KD run, added to the base's KD mean, so it
    surrounds ``mean``; 0 wide for the base itself.
    """
    ev = config.evaluation
    main = _measure(ev.main_measure)
    low, high = _curve_interval(config)
    students = {s.name: s for s in config.students}
    rows = []
    for base in dict.fromkeys(s.base for s in config.students if s.unjudged and s.base):
        if "KD" not in students[base].objectives:
            continue
        variants = [(UNJUDGED if all(d.dataset == config.train.dataset for d in s.unjudged) else OTHER_DATA, s.name)
                    for s in config.students if s.base == base and s.unjudged and s.name in counts]
        systems = [(f"{base} KD", "KD (base)", 0.0, _names(config, base, "KD"))]
        for kind, name in sorted(variants, key=lambda v: (v[0] != UNJUDGED, counts[v[1]])):  # the curve, then apart
            systems.append((f"{name} KD", kind, counts[name], _names(config, name, "KD")))
        if "CL" in students[base].objectives:
            systems.append((f"{base} CL", "CL", float("nan"), _names(config, base, "CL")))
        systems += [("teacher", "teacher", float("nan"), ["teacher"]), ("BM25", "BM25", float("nan"), ["BM25"])]
        for student, kind, x, names in systems:
            for scope, label, in_domain, a, b in seed_matrices(collections, main, _names(config, base, "KD"), names):
                if scope != "pooled":
                    continue
                c = _compare(a, b, test="t", alpha=ev.alpha)
                rows.append({"base": base, "system": student, "kind": kind, "unjudged queries": x, "scope": label,
                             "in_domain": in_domain, "queries": c["queries"], main: c["b"],
                             low: c["a"] + c["low"], high: c["a"] + c["high"]})
    table = pd.DataFrame(rows, columns=["base", "system", "kind", "unjudged queries", "scope", "in_domain", "queries",
                                        main, low, high])
    # counts print as counts (299, not 299.0000); a mean over seeds that is not whole stays as it is
    table["unjudged queries"] = pd.Series([int(x) if not pd.isna(x) and float(x).is_integer() else x
                                           for x in table["unjudged queries"]], index=table.index, dtype=object)
    return table


def _curve_interval(config) -> tuple[str, str]:
    level = f"{100 * (1 - config.evaluation.alpha):g}% CI"
    test = "seed-aware t" if is_seed_aware(config) else "paired t"
    return f"{level} low ({test} vs base KD)", f"{level} high ({test} vs base KD)"


def unjudged_curve_caption(config) -> str:
    main = _measure(config.evaluation.main_measure)
    seeds = f"the mean over {len(config.seeds)} seeds and " if is_seed_aware(config) else ""
    level = f"{100 * (1 - config.evaluation.alpha):g}%"
    test = ("seed-aware t interval (queries and seeds random; runs of the same seed paired)" if is_seed_aware(config)
            else "paired t interval over queries (one seed)")
    return (f"{main} against the unjudged training queries each student trained on (its KD stages' group "
            f"statistics; 0: the base student's KD run on judged queries alone). `{main}`: {seeds}the mean over the "
            f"pooled queries of the scope. Interval: the {level} {test} of the difference "
            "from the base's KD run, added to that run's mean (uncorrected; none for the base itself). "
            f"`{UNJUDGED}`: unjudged queries from the training dataset (the curve); `{OTHER_DATA}`: from another "
            "dataset (e.g. FAQ adaptation halves), drawn apart; CL (the base's), teacher and BM25: references.")


def _names(config, student: str, objective: str) -> list[str]:
    return [f"{student}-{objective}-s{seed}" for seed in config.seeds]


def _compare(a: pd.DataFrame, b: pd.DataFrame, *, test: str, alpha: float) -> dict:
    """One comparison row: the seed-aware test where either side has several runs, else the paired test."""
    nan = float("nan")
    if a.empty or b.empty or a.shape[1] == 0:
        return {"queries": 0, "seeds": 0, "a": nan, "b": nan, "diff": nan, "per seed": "", "estimate": nan,
                "low": nan, "high": nan, "p": nan, "seed sd": nan, "se": nan, "df": nan}
    if len(a) > 1 or len(b) > 1:
        c = seed_aware.crossed(a.to_numpy(), b.to_numpy(), alpha=alpha)
        return {"queries": c.queries, "seeds": c.seeds, "a": c.mean_a, "b": c.mean_b, "diff": c.mean_difference,
                "per seed": _per_seed(c.per_seed), "estimate": c.mean_difference, "low": c.ci_low,
                "high": c.ci_high, "p": c.p, "seed sd": c.seed_sd, "se": c.se, "df": c.df}
    c = statistics.paired(a.iloc[0], b.iloc[0], test=test, alpha=alpha)
    return {"queries": c.queries, "seeds": 1, "a": c.mean_a, "b": c.mean_b, "diff": c.mean_difference,
            "per seed": _per_seed([c.mean_difference]), "estimate": c.estimate, "low": c.ci_low, "high": c.ci_high,
            "p": c.p, "seed sd": nan, "se": c.sd / math.sqrt(c.queries) if c.queries > 1 else nan,
            "df": c.queries - 1.0}


def _per_seed(differences) -> str:
    return " ".join(f"{d:+.4f}" for d in differences)


def _direction(row: dict, cols: Columns) -> str:
    """Which system a significant row favours: the side of the interval (it excludes 0 whenever the corrected p
    is below alpha), else the sign of the estimate, else of the mean difference."""
    if row["low"] > 0 or row["high"] < 0:
        return cols.b if row["low"] > 0 else cols.a
    for value in (row["estimate"], row["diff"]):
        if not pd.isna(value) and value != 0:
            return cols.b if value > 0 else cols.a
    return "-"


def legend(config, cols: Columns) -> str:
    """What every column of a comparison table holds, printed under it."""
    ev = config.evaluation
    correction = (f"`{cols.p_corrected}`: statsmodels' multipletests ({ev.correction}) within each family (the "
                  "per-collection rows; the pooled rows)" if ev.correction else f"`{cols.p_corrected}`: as `{cols.p}`")
    mde = (f"`{cols.mde}`: the smallest true `{cols.difference}` this test detects with {POWER:.0%} power at "
           f"`{cols.mde_alpha}` (α/m for a family of m corrected rows): λ·se with λ the noncentrality of a t on `df` "
           "degrees of freedom reaching that power (≈ 2.8·se for many degrees of freedom at α = 0.05)")
    common = (f"{_measure(ev.main_measure)} on the same queries. `{cols.difference}`: the mean difference (of the "
              "two means); a pooled row pools the queries of its scope's collections, each query weighing the same")
    if is_seed_aware(config):
        return (f"{common}; `seeds`: training runs per system, runs of the same seed paired (identical groups); "
                f"`per seed {cols.difference}`: each seed's mean difference. The test treats the training run as the "
                "unit of replication: a linear model with crossed random effects for query and seed (ANOVA "
                "variance components, Satterthwaite degrees of freedom guarded for few seeds; docs/experiment.md, "
                "\"Seeds and queries\"), so the variation between training runs enters the error. `seed sd`: the "
                "estimated spread of a training run's difference; `se`, `df`: the standard error and degrees of "
                f"freedom of `{cols.difference}`. `{cols.interval}`: the t interval of `{cols.difference}`; it "
                f"excludes 0 exactly when the uncorrected p is below α; not corrected for multiple comparisons. "
                f"`{cols.p}`: the test, uncorrected. {correction}; `significant` and `winner` use it. {mde}.")
    if cols.estimate:
        interval = (f"`{cols.interval}`: the shifts the Wilcoxon signed-rank test does not reject at α = {ev.alpha} "
                    f"(test inversion around `{cols.estimate}`, the Hodges–Lehmann shift: the median of the Walsh "
                    "averages); it excludes 0 exactly when the uncorrected p is below α")
    else:
        interval = (f"`{cols.interval}`: the paired t interval of `{cols.difference}`; it excludes 0 exactly when "
                    "the uncorrected p is below α")
    return (f"One seed: {common}. A test over queries of one training run per system cannot tell the objective "
            f"from the seed (docs/experiment.md, \"Seeds and queries\"). {interval}; not corrected for multiple "
            f"comparisons. `{cols.p}`: the paired test, uncorrected. {correction}; `significant` and `winner` use "
            f"it. `se`, `df`: the paired t's standard error (sd/√n) and n − 1. {mde}; under the Wilcoxon test the "
            "t-test's figure stands in.")


# -- markdown --------------------------------------------------------------------------------------------------
def markdown(frame: pd.DataFrame, digits: int = 4) -> str:
    """A GitHub table of ``frame`` (no extra dependency)."""
    def cell(v) -> str:
        if isinstance(v, (float, np.floating)):
            if math.isnan(v):
                return ""
            return f"{v:.{digits}g}" if abs(v) < 1e-3 and v != 0 else f"{v:.{digits}f}"
        return "" if v is None else str(v).replace("|", "\\|")

    header = "| " + " | ".join(map(str, frame.columns)) + " |"
    rule = "|" + "|".join("---" for _ in frame.columns) + "|"
    body = ["| " + " | ".join(cell(v) for v in row) + " |" for row in frame.itertuples(index=False)]
    return "\n".join([header, rule, *body])


def summary_markdown(config, summary: pd.DataFrame, kd: pd.DataFrame, collections) -> str:
    """The summary as text: ``mean ± std`` cells; ▲/▼ where KD is significantly above/below CL (corrected)."""
    cols = columns(config)
    labels = [c for c in summary.columns if c not in ("system", "student", "objective") and not c.endswith(" std")]
    marks = {}
    for row in kd.to_dict("records"):
        if row["significant"]:
            marks[(row["student"], row["collection"])] = " ▲" if row["winner"] == "KD" else " ▼"
    in_domain = {c.label for c in collections if c.in_domain}
    shown = []
    for row in summary.to_dict("records"):
        out = {"system": row["system"]}
        for label in labels:
            mean, std = row[label], row[f"{label} std"]
            text = "" if pd.isna(mean) else f"{mean:.3f}" + ("" if pd.isna(std) else f" ± {std:.3f}")
            if row["objective"] == "KD":
                text += marks.get((row["student"], label), "")
            out[f"{label} (in domain)" if label in in_domain else label] = text
        shown.append(out)
    main = _measure(config.evaluation.main_measure)
    seeds = len(config.seeds)
    note = (f"{main}; mean ± std over {seeds} seeds" if seeds > 1 else f"{main}; one seed") + \
        "; a pooled column is the mean over all queries of its scope (each query weighing the same)" + \
        f"; ▲/▼: KD significantly above/below CL for that student ({cols.p_corrected} of the KD − CL table)."
    return markdown(pd.DataFrame(shown)) + f"\n\n{note}"


# -- the verdict -----------------------------------------------------------------------------------------------
def verdict(config, summary: pd.DataFrame, kd: pd.DataFrame, teacher: pd.DataFrame | None = None,
            bm25: pd.DataFrame | None = None) -> str:
    """A few sentences quoting the pooled rows of the KD − CL table (and of the teacher − CL and KD − BM25 tables):
    where KD beat CL significantly, where it did not and how small a difference the test could have seen (the MDE),
    whether the teacher was better than the students' CL runs, and whether the KD students beat the first stage."""
    ev = config.evaluation
    main = _measure(ev.main_measure)
    cols = columns(config)
    pooled = kd[kd["scope"] == "pooled"]
    if pooled.empty:
        return "No student was trained both ways, so there is no KD-vs-CL comparison."
    corrected = f"{ev.correction}-corrected" if ev.correction else "uncorrected"
    shown = f"HL: Hodges–Lehmann shift; [ ]: {cols.interval}" if cols.estimate else f"[ ]: {cols.interval}"
    if is_seed_aware(config):
        test = (f"mean over {len(config.seeds)} seeds and the queries; {shown}; seed-aware t-test (queries and "
                "training runs both random)")
    else:
        test = (f"one seed: a difference of objectives cannot be told from a difference of training runs; mean over "
                f"queries; {shown}; {'paired t-test' if ev.test == 't' else 'Wilcoxon signed-rank test'} over queries")
    lines = [f"Verdict ({main}; KD − CL: {test}, p {corrected}, α = {ev.alpha}; MDE: {POWER:.0%} power at "
             f"{cols.mde_alpha} of the table):"]
    margins = teacher[teacher["scope"] == "pooled"] if teacher is not None else pd.DataFrame()
    tcols = columns(config, "CL", "teacher")
    spec = config.teacher
    # the paper's control: a teacher of the student's own model trained on the student's own data
    same = {s.name for s in config.students if s.model == spec.model and spec.kind == "cross-encoder"}
    more_data = spec.data is not None and spec.data != config.train
    for student, rows in pooled.groupby("student", sort=False):
        parts = [_verdict_part(row, cols, _margin(margins, student, row["collection"], tcols))
                 for row in rows.to_dict("records")]
        control = ""
        if student in same:
            control = (" (the teacher's own model, which saw more training data: its advantage is data)" if more_data
                       else " (same capacity and data as the teacher: the control)")
        lines.append(f"- {student}{control}: " + "; ".join(parts) + ".")
    for in_domain, scope in ((True, IN_DOMAIN), (False, OUT_OF_DOMAIN)):
        rows = pooled[pooled["in_domain"] == in_domain]
        if rows.empty:
            continue
        wins = rows[(rows["winner"] == "KD")]["student"].tolist()
        losses = rows[(rows["winner"] == "CL")]["student"].tolist()
        text = f"{scope.capitalize()}, KD beat CL significantly for {len(wins)} of {len(rows)} students"
        text += f" ({', '.join(wins)})" if wins else ""
        text += f"; CL beat KD significantly for {', '.join(losses)}" if losses else "; CL never beat KD significantly"
        lines.append(text + ".")
    lines.append(_teacher_sentence(margins, tcols, main))
    if bm25 is not None:
        lines.append(_first_stage_sentence(bm25[bm25["scope"] == "pooled"], columns(config, "BM25", "KD"), main))
    return "\n".join(line for line in lines if line)


def _first_stage_sentence(rows: pd.DataFrame, cols: Columns, main: str) -> str:
    """Whether each KD student beats the first stage it reranks: a student below BM25 is no reranker to deploy,
    however it compares with CL."""
    if rows.empty:
        return ""
    parts, below = [], []
    for row in rows.to_dict("records"):
        words = {"KD": "KD better", "BM25": "BM25 better"}.get(row["winner"], "no significant difference")
        parts.append(f"{row['student']} {row['collection']}: {_signed(row[cols.difference])}, "
                     f"p = {_p(row[cols.p_corrected])} → {words}")
        if row["winner"] != "KD":
            below.append(f"{row['student']} ({row['collection']})")
    text = f"KD − BM25 ({main}, the same tests): " + "; ".join(parts) + "."
    if below:
        text += (" Not significantly above the first stage it reranks: " + ", ".join(below) +
                 ": there it is no reranker worth deploying, whatever its comparison with CL.")
    return text


def _verdict_part(row: dict, cols: Columns, margin: dict | None) -> str:
    if pd.isna(row[cols.difference]):
        return f"{row['collection']}: no queries"
    estimate = f"{row[cols.difference]:+.3f}"
    interval = f"[{_signed(row[cols.low])}, {_signed(row[cols.high])}]"
    if cols.estimate:
        estimate += f" (HL {row[cols.estimate]:+.3f} {interval})"
    else:
        estimate += f" {interval}"
    seeds = str(row.get(f"per seed {cols.difference}") or "")
    per_seed = f" (per seed {seeds})" if " " in seeds else ""
    text = f"{row['collection']}: {estimate}, p = {_p(row[cols.p_corrected])}{per_seed} → "
    if row["significant"]:
        return text + ("KD better" if row["winner"] == "KD" else "CL better")
    mde = row[cols.mde]
    if pd.isna(mde):
        return text + "no significant difference (too few queries to say how small a difference was ruled out)"
    text += (f"no significant difference, underpowered below the MDE {mde:.3f}: a |KD − CL| smaller than that is "
             "not ruled out")
    if margin is not None and not pd.isna(margin["diff"]) and margin["diff"] < mde:
        text += (f"; the teacher's whole margin over CL ({margin['diff']:+.3f}) is below it, so even KD that "
                 "passed all of it on would likely go unseen")
    return text


def _margin(margins: pd.DataFrame, student: str, collection: str, cols: Columns) -> dict | None:
    if margins.empty:
        return None
    row = margins[(margins["student"] == student) & (margins["collection"] == collection)]
    return None if row.empty else {"diff": float(row[cols.difference].iloc[0])}


def _teacher_sentence(margins: pd.DataFrame, cols: Columns, main: str) -> str:
    """KD can only pass on what the teacher knows: quote the teacher − CL table's pooled rows."""
    if margins.empty:
        return ""
    parts = []
    for row in margins.to_dict("records"):
        words = {"teacher": "teacher better", "CL": "CL better"}.get(row["winner"], "no significant difference")
        parts.append(f"{row['student']} {row['collection']}: {_signed(row[cols.difference])}, "
                     f"p = {_p(row[cols.p_corrected])} → {words}")
    behind = [f"{r['student']} ({r['collection']})" for r in margins.to_dict("records") if r["winner"] != "teacher"]
    text = f"Teacher − CL ({main}, the same tests): " + "; ".join(parts) + "."
    if behind:
        text += (" The teacher was not significantly better than the CL run of " + ", ".join(behind) +
                 ": there it had no measured margin to pass on, and what KD added is not explained by one.")
    else:
        text += " The teacher beat every student's CL run significantly: the setting the paper's claim is about."
    return text


def _signed(value) -> str:
    return "n/a" if pd.isna(value) else f"{value:+.3f}"


def _p(p) -> str:
    if pd.isna(p):
        return "n/a"
    return f"{p:.2g}" if p < 0.001 else f"{p:.3f}"


# -- plots -----------------------------------------------------------------------------------------------------
def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_kd_minus_cl(config, kd: pd.DataFrame, path: Path) -> Path | None:
    """KD − CL per student (:func:`plot_comparison`)."""
    return plot_comparison(config, kd, columns(config), path)


def plot_comparison(config, kd: pd.DataFrame, cols: Columns, path: Path) -> Path | None:
    """``cols.b`` − ``cols.a`` per student of a comparison table, in and out of domain (pooled), with the table's
    intervals around the estimate they surround (the mean difference under t, Hodges–Lehmann under Wilcoxon);
    each collection as a faint dot."""
    if kd.empty:
        return None
    what = f"{cols.b} − {cols.a}"
    centre = cols.estimate or cols.difference
    plt = _pyplot()
    students = list(dict.fromkeys(kd["student"]))
    fig, ax = plt.subplots(figsize=(max(5.5, 1.6 * len(students) + 2), 3.6))
    for offset, in_domain, colour, label in ((-0.12, True, "tab:blue", IN_DOMAIN),
                                             (0.12, False, "tab:orange", OUT_OF_DOMAIN)):
        pooled = kd[(kd["scope"] == "pooled") & (kd["in_domain"] == in_domain)].set_index("student")
        each = kd[(kd["scope"] == "collection") & (kd["in_domain"] == in_domain)]
        xs = [i + offset for i, s in enumerate(students) if s in pooled.index]
        if not xs:
            continue
        rows = pooled.loc[[s for s in students if s in pooled.index]]
        err = np.vstack([(rows[centre] - rows[cols.low]).to_numpy(float),
                         (rows[cols.high] - rows[centre]).to_numpy(float)])
        err = np.where(np.isfinite(err), err, 0.0)  # no interval (too few queries): the point alone
        ax.errorbar(xs, rows[centre], yerr=err, fmt="o", color=colour, capsize=4, label=label)
        for i, s in enumerate(students):
            dots = each[each["student"] == s][centre]
            ax.scatter([i + offset * 2] * len(dots), dots, s=10, color=colour, alpha=0.35)
    ax.axhline(0, color="grey", linewidth=0.8)
    ax.set_xticks(range(len(students)), students)
    ax.set_ylabel(f"{what} ({_measure(config.evaluation.main_measure)})")
    ax.set_title(f"{what} per student ({centre}, pooled queries, {cols.interval}; dots: single collections)",
                 fontsize=8)
    ax.legend(fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    paths.write_atomically(path, lambda tmp: fig.savefig(tmp, dpi=120))
    plt.close(fig)
    return path


def plot_unjudged_curve(config, curve: pd.DataFrame, path: Path) -> Path | None:
    """:func:`unjudged_curve_table` drawn: one panel per base student and scope; the base's KD run and the students
    whose unjudged queries come from the training dataset as a line over their counts (symlog axis, counts as
    ticks), with the table's intervals; students with other data as labelled diamonds; CL, teacher and BM25 as
    labelled horizontal lines."""
    if not curve["kind"].isin([UNJUDGED, OTHER_DATA]).any():
        return None
    from matplotlib import transforms

    main = _measure(config.evaluation.main_measure)
    low, high = _curve_interval(config)
    plt = _pyplot()
    panels = list(dict.fromkeys(zip(curve["base"], curve["scope"])))
    fig, axes = plt.subplots(1, len(panels), figsize=(5.2 * len(panels), 4.0), squeeze=False)
    for ax, (base, scope) in zip(axes[0], panels):
        rows = curve[(curve["base"] == base) & (curve["scope"] == scope)]
        line = rows[rows["kind"].isin(["KD (base)", UNJUDGED])].sort_values("unjudged queries")
        apart = rows[rows["kind"] == OTHER_DATA]
        # other data sits apart from the line: 10 points to the left of its count, so that its bar stays visible
        dodge = transforms.offset_copy(ax.transData, fig=fig, x=-10, units="points")
        for points, style in ((line, dict(fmt="o-", color="tab:blue", label=f"{base} KD + unjudged queries")),
                              (apart, dict(fmt="D", color="tab:purple", transform=dodge,
                                           label="unjudged queries of other data (drawn left of its count)"))):
            if points.empty:
                continue
            err = np.vstack([(points[main] - points[low]).to_numpy(float),
                             (points[high] - points[main]).to_numpy(float)])
            ax.errorbar(points["unjudged queries"], points[main], yerr=np.where(np.isfinite(err), err, 0.0),
                        capsize=4, markersize=5, **style)
        for row in apart.to_dict("records"):
            ax.annotate(f"{row['system']} ({row['unjudged queries']:.0f})", (row["unjudged queries"], row[main]),
                        textcoords="offset points", xytext=(-14, 0), ha="right", va="center", fontsize=7,
                        color="tab:purple")
        for row, linestyle in zip(rows[rows["kind"].isin(REFERENCES)].to_dict("records"), ("--", ":", "-.")):
            ax.axhline(row[main], color="grey", linestyle=linestyle, linewidth=1)
            ax.text(0.01, row[main], f"{row['system']} {row[main]:.3f}", transform=ax.get_yaxis_transform(),
                    ha="left", va="bottom", fontsize=7, color="dimgrey")
        counts = line["unjudged queries"].to_numpy(float)
        positive = [x for x in (*counts, *apart["unjudged queries"]) if x > 0]
        ax.set_xscale("symlog", linthresh=min(positive) if positive else 1.0)
        ax.set_xticks(counts, [f"{x:.0f}" for x in counts])
        ax.minorticks_off()
        ax.margins(x=0.08)
        ax.set(xlabel="unjudged training queries (symlog axis)", ylabel=main, title=scope)
        ax.legend(fontsize=7, loc="lower right", bbox_to_anchor=(1.0, 0.08))
    level = f"{100 * (1 - config.evaluation.alpha):g}%"
    fig.suptitle(f"{main} (pooled queries, seeds averaged) against unjudged training queries; bars: {level} paired t "
                 "interval of the difference from the base KD run, added to its mean", fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    paths.write_atomically(path, lambda tmp: fig.savefig(tmp, dpi=120))
    plt.close(fig)
    return path


def plot_training_curves(models, path: Path, metric: str = "metric", window: int = 10) -> Path | None:
    """Loss per step (moving average over ``window`` steps) for CL and for KD runs — their scales differ — and the
    validation metric per step; one colour per model throughout."""
    logs = [m for m in models if m.log is not None and len(m.log)]
    if not logs:
        return None
    plt = _pyplot()
    fig, (cl_ax, kd_ax, metric_ax) = plt.subplots(1, 3, figsize=(14, 3.9))
    colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for i, m in enumerate(logs):
        colour, style = colours[i % len(colours)], ("-", "--", ":", "-.")[(i // len(colours)) % 4]
        log = m.log
        loss = log["loss"].rolling(window, min_periods=1).mean()
        (kd_ax if m.objective == "KD" else cl_ax).plot(log["step"], loss, color=colour, linestyle=style,
                                                       label=m.name, linewidth=1.2)
        if "metric" in log and log["metric"].notna().any():
            valid = log[log["metric"].notna()]
            metric_ax.plot(valid["step"], valid["metric"], marker="o", markersize=3, color=colour, linestyle=style,
                           label=m.name, linewidth=1.2)
    cl_ax.set(xlabel="step", ylabel=f"loss (moving average of {window} steps)", title="CL: InfoNCE")
    kd_ax.set(xlabel="step", title="KD: KL to the teacher")
    metric_ax.set(xlabel="step", ylabel=f"validation {metric}", title="Validation")
    for ax in (cl_ax, kd_ax, metric_ax):
        if ax.lines:
            ax.legend(fontsize=6)
        else:
            ax.text(0.5, 0.5, "no validation set" if ax is metric_ax else "no such runs", ha="center",
                    va="center", transform=ax.transAxes)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    paths.write_atomically(path, lambda tmp: fig.savefig(tmp, dpi=120))
    plt.close(fig)
    return path


# -- everything ------------------------------------------------------------------------------------------------
def kd_vs_bm25_table(config, collections) -> pd.DataFrame:
    """KD − BM25 per student (:func:`comparison_table`): whether the distilled reranker beats the stage it reranks."""
    pairs = [(s.name, ["BM25"], _names(config, s.name, "KD")) for s in config.students if "KD" in s.objectives]
    return comparison_table(config, collections, pairs, columns(config, "BM25", "KD"))


@dataclass
class Derived:
    """Everything the report computes from the per-query values (and the unjudged counts): what ``kdcl verify``
    recomputes and compares with a committed report."""

    tables: dict[str, tuple[pd.DataFrame, str]]   # file stem → (frame, its Markdown with legend)
    sections: dict[str, str]                        # report.md section title → body
    verdict: str
    summary: pd.DataFrame
    summary_markdown: str
    kd: pd.DataFrame
    teacher: pd.DataFrame
    comparisons: dict[str, tuple[pd.DataFrame, Columns]]  # plot stem → (table, its columns)
    curve: pd.DataFrame
    per_collection: list


def derive(config, collections, counts: dict[str, float]) -> Derived:
    """Every table, section and the verdict, from ``collections``' per-query values and the unjudged ``counts``
    (:func:`unjudged_counts`)."""
    tables: dict[str, tuple[pd.DataFrame, str]] = {}
    per_collection = []
    for c in collections:
        means = mean_table(config, c)
        tables[f"{c.label}.mean"] = (means, markdown(means))
        per_collection.append((c, means))
    summary = summary_table(config, collections)
    kd = kd_vs_cl_table(config, collections)
    teacher = teacher_vs_cl_table(config, collections)
    bm25 = kd_vs_bm25_table(config, collections)
    summary_md = summary_markdown(config, summary, kd, collections)
    tables["summary"] = (summary, summary_md)
    sections, comparisons = {}, {}
    for stem, title, table, cols in (
            ("kd_vs_cl", "KD − CL", kd, columns(config, "CL", "KD")),
            ("teacher_vs_cl", "Teacher − CL: what KD could pass on", teacher, columns(config, "CL", "teacher")),
            ("kd_vs_bm25", "KD − BM25: does the distilled reranker beat the first stage?", bm25,
             columns(config, "BM25", "KD")),
            *((f"unjudged_vs_{objective.lower()}", f"KD with unjudged queries − the base student's {objective}",
               table, columns(config, objective, UNJUDGED))
              for objective, table in unjudged_tables(config, collections).items())):
        table_md = markdown(table) + "\n\n" + legend(config, cols)
        tables[stem] = (table, table_md)
        sections[title] = _without(table_md, table)
        comparisons[stem] = (table, cols)
    curve = unjudged_curve_table(config, collections, counts)
    if not curve.empty:
        curve_md = markdown(curve) + "\n\n" + unjudged_curve_caption(config)
        tables["unjudged_curve"] = (curve, curve_md)
        sections[f"{_measure(config.evaluation.main_measure)} against unjudged training queries"] = \
            _without(curve_md, curve)
    text = verdict(config, summary, kd, teacher, bm25)
    return Derived(tables, sections, text, summary, summary_md, kd, teacher, comparisons, curve, per_collection)


def write_report(config, models, collections, out: Path) -> Report:
    """Writes every table, plot and ``report.md`` under ``out``; returns what it wrote."""
    out = Path(out)
    tables, plots = out / "tables", out / "plots"
    tables.mkdir(parents=True, exist_ok=True)
    files: list[Path] = []

    def save(frame: pd.DataFrame, stem: str, text: str | None = None) -> None:
        paths.write_atomically(tables / f"{stem}.csv", lambda tmp: frame.to_csv(tmp, index=False))
        paths.write_text_atomically(tables / f"{stem}.md", (text or markdown(frame)) + "\n")
        files.extend([tables / f"{stem}.csv", tables / f"{stem}.md"])

    for c in collections:
        save(c.table, c.label)  # pt.Experiment's own table
    derived = derive(config, collections, unjudged_counts(config, models))
    for stem, (frame, text) in derived.tables.items():
        save(frame, stem, text)
    plot_files = [plot_kd_minus_cl(config, derived.kd, plots / "kd_minus_cl.png"),
                  plot_training_curves(models, plots / "training_curves.png",
                                       _measure(config.training_args(config.teacher)["metric"]))]
    plot_files += [plot_comparison(config, table, cols, plots / f"{stem}.png")
                   for stem, (table, cols) in derived.comparisons.items() if stem.startswith("unjudged_vs_")]
    if not derived.curve.empty:
        plot_files.append(plot_unjudged_curve(config, derived.curve, plots / "unjudged_curve.png"))
    files.extend(p for p in plot_files if p is not None)
    report = _report_markdown(config, derived.summary_markdown, derived.sections, derived.verdict,
                              derived.per_collection, models, plot_files, out)
    paths.write_text_atomically(out / "report.md", report)
    files.append(out / "report.md")
    return Report(derived.summary, derived.summary_markdown, derived.kd, derived.verdict, files, derived.teacher)


def _filtered(model, trained) -> dict:
    """The Training table's columns of teacher-filtered negatives (``training.negative_filter``), shown when some
    stage filtered: the suspect negatives (query, document) it dropped or relabelled positive, and in how many
    queries; empty for a stage without a filter."""
    if not any((m.groups or {}).get("negative_filter") for m in trained):
        return {}
    groups = model.groups or {}
    rule = groups.get("negative_filter")
    if not rule:
        return {"negative filter": "", "suspect negatives": "", "queries filtered": ""}
    return {"negative filter": f"{rule['action']}, margin {rule['margin']:g}",
            "suspect negatives": groups.get("negatives_dropped", 0) + groups.get("negatives_relabelled", 0),
            "queries filtered": groups.get("queries_filtered", 0)}


def _without(text: str, table: pd.DataFrame) -> str:
    """The Markdown of ``table`` without its ``in_domain`` column (the row labels say it), legend kept."""
    if "in_domain" not in table:
        return text
    return markdown(table.drop(columns=["in_domain"])) + text[len(markdown(table)):]


def _report_markdown(config, summary_md, sections: dict[str, str], text, per_collection, models, plot_files,
                     out: Path) -> str:
    parts = [f"# {config.name}", config.description.strip(), "## Summary", summary_md]
    for title, body in sections.items():
        parts += [f"## {title}", body]
    parts += ["## Verdict", text]
    for plot in plot_files:
        if plot is not None:
            parts.append(f"![{plot.stem}]({plot.relative_to(out).as_posix()})")
    parts.append("## Per collection")
    for c, means in per_collection:
        parts += [f"### {c.label} ({IN_DOMAIN if c.in_domain else OUT_OF_DOMAIN}; {c.queries} queries, "
                  f"reranking the top {c.depth})", markdown(means)]
    trained = [m for m in models if m.objective != "given"]
    if trained:
        rows = pd.DataFrame([{"model": m.name, "objective": m.objective, "seed": "" if m.seed is None else str(m.seed),
                              "training seconds": round(m.seconds, 1), "reused": m.reused, **_filtered(m, trained)}
                             for m in trained])
        parts += ["## Training", markdown(rows)]
    return "\n\n".join(p for p in parts if p) + "\n"
