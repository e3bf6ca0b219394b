"""The report's statistics: correction by the configured method, one definition per number, intervals that agree
with their test, the minimum detectable effect, and the teacher's margin over each student's CL run.

Evaluation results are made up here (per-query values of known shape), so every number has a known answer.
"""

from __future__ import annotations

import math
import re
from types import SimpleNamespace

import numpy as np
import pandas as pd
import pytest
from scipy import stats

from pyterrier_kdcl.experiment import report, seed_aware, statistics
from pyterrier_kdcl.experiment.config import load_config

MEASURE = "nDCG@10"
# label: (in domain, queries, KD − CL shift); the two OOD collections differ in size and in effect, so the mean
# over their queries and the mean of their two means differ
COLLECTIONS = {"manpages": (True, 40, 0.02), "faq-small": (False, 10, 0.20), "faq-big": (False, 60, 0.0)}


def make_config(test: str = "t", correction: str | None = "holm", alpha: float = 0.05, seeds=(1, 2)):
    return load_config({
        "name": "made-up",
        "seeds": list(seeds),
        "train": {"dataset": "irds:kdcl/manpages/train"},
        "teacher": {"model": "minilm-l6"},
        "students": [{"name": "small", "model": "minilm-l3"}, {"name": "large", "model": "minilm-l6"}],
        "evaluation": {"in_domain": [{"dataset": "irds:kdcl/manpages/test", "name": "manpages"}],
                       "out_of_domain": [{"dataset": "irds:kdcl/faq/python", "name": "faq-small"},
                                         {"dataset": "irds:kdcl/faq/debian", "name": "faq-big"}],
                       "measures": [MEASURE], "test": test, "correction": correction, "alpha": alpha},
    }, check_environment=False)


def make_collections(config, collections=COLLECTIONS, teacher_margin: float = 0.05, noise: float = 0.1, seed=0):
    """Per-query values: CL = base + noise, KD = CL + the collection's shift (the large student: + 0), teacher =
    base + margin; pt.Experiment-like tables of the means."""
    rng = np.random.default_rng(seed)
    out = []
    for label, (in_domain, n, shift) in collections.items():
        qids = [f"q{i}" for i in range(n)]
        base = rng.uniform(0.2, 0.8, n)
        rows = [("BM25", q, v) for q, v in zip(qids, base - 0.1)]
        rows += [("teacher", q, v) for q, v in zip(qids, base + teacher_margin + rng.normal(0, noise, n))]
        for student, student_shift in (("small", shift), ("large", 0.0)):
            for s in config.seeds:
                cl = base + rng.normal(0, noise, n)
                rows += [(f"{student}-CL-s{s}", q, v) for q, v in zip(qids, cl)]
                rows += [(f"{student}-KD-s{s}", q, v)
                         for q, v in zip(qids, cl + student_shift + rng.normal(0, noise, n))]
        perquery = pd.DataFrame(rows, columns=["name", "qid", "value"]).assign(measure=MEASURE)
        table = perquery.groupby("name", sort=False)["value"].mean().rename(MEASURE).reset_index()
        out.append(SimpleNamespace(label=label, in_domain=in_domain, table=table, perquery=perquery, queries=n,
                                   depth=10, seconds=0.0))
    return out


def _per_query(collections, labels, names) -> pd.Series:
    parts = []
    for c in collections:
        if c.label in labels:
            pq = c.perquery[c.perquery["name"].isin(names)]
            parts.append(pq.groupby("qid")["value"].mean().rename(lambda q, c=c: f"{c.label}/{q}"))
    return pd.concat(parts)


# -- item 8: the configured correction, through statsmodels ------------------------------------------------------
@pytest.mark.parametrize("method", ["holm", "bonferroni", "fdr_bh", None])
def test_the_kd_table_corrects_with_the_configured_method(method):
    from statsmodels.stats.multitest import multipletests

    config = make_config(correction=method)
    kd = report.kd_vs_cl_table(config, make_collections(config))
    cols = report.columns(config)
    assert cols.p_corrected == (f"p ({method})" if method else "p (no correction)")
    for scope in ("collection", "pooled"):
        family = kd[kd["scope"] == scope]
        expected = family[cols.p] if method is None else multipletests(family[cols.p], method=method)[1]
        assert np.allclose(family[cols.p_corrected], expected)
        assert (family["significant"] == (family[cols.p_corrected] < 0.05)).all()
    teacher = report.teacher_vs_cl_table(config, make_collections(config))
    family = teacher[teacher["scope"] == "pooled"]
    if method:
        assert np.allclose(family[cols.p_corrected], multipletests(family[cols.p], method=method)[1])


def test_correction_keeps_nan_out_of_the_family():
    from statsmodels.stats.multitest import multipletests

    p = np.array([0.01, np.nan, 0.04, 0.03])
    out = statistics.correct(p, "holm", 0.05)
    assert np.isnan(out[1]) and np.allclose(out[[0, 2, 3]], multipletests(p[[0, 2, 3]], method="holm")[1])


# -- item 9: one definition per number -----------------------------------------------------------------------------
def test_a_pooled_number_has_one_definition_in_summary_table_and_verdict():
    config = make_config()
    collections = make_collections(config)
    summary = report.summary_table(config, collections)
    kd = report.kd_vs_cl_table(config, collections)
    text = report.verdict(config, summary, kd, report.teacher_vs_cl_table(config, collections))
    label = "out of domain (pooled queries)"
    assert label in summary.columns and "OOD mean" not in summary.columns
    row = kd[(kd["student"] == "small") & (kd["collection"] == label)].iloc[0]
    assert row["scope"] == "pooled" and row["queries"] == 70

    ood = ["faq-small", "faq-big"]
    per_query = (_per_query(collections, ood, ["small-KD-s1", "small-KD-s2"])
                 - _per_query(collections, ood, ["small-CL-s1", "small-CL-s2"]))
    by_system = summary.set_index("system")[label]
    assert row["KD-CL"] == pytest.approx(per_query.mean())  # the mean over queries ...
    assert by_system["small KD"] - by_system["small CL"] == pytest.approx(row["KD-CL"])  # ... in both tables
    macro = summary.set_index("system")[ood].mean(axis=1)
    assert abs((macro["small KD"] - macro["small CL"]) - row["KD-CL"]) > 0.02  # the other definition differs here
    assert "[ ]: 95% CI (seed-aware t, uncorrected)" in text.splitlines()[0]  # the verdict names its interval
    student_line = next(line for line in text.splitlines() if line.startswith("- small"))
    assert f"{label}: {row['KD-CL']:+.3f}" in student_line  # the verdict quotes the table


def test_a_single_collection_scope_is_named_by_its_collection():
    config = make_config()
    collections = make_collections(config)
    summary = report.summary_table(config, collections)
    kd = report.kd_vs_cl_table(config, collections)
    assert "in domain (manpages)" in set(kd["collection"]) and "in domain (pooled queries)" not in summary


# -- item 10: intervals that agree with their test ------------------------------------------------------------------
def test_the_t_interval_is_the_paired_t_interval_and_agrees_with_the_t_test():
    rng = np.random.default_rng(1)
    for trial in range(200):
        n = int(rng.choice([3, 10, 40, 200]))
        a = rng.uniform(0, 1, n)
        b = a + rng.normal(rng.normal(0, 0.05), 0.2, n)
        alpha = [0.05, 0.01][trial % 2]
        c = statistics.paired(a, b, test="t", alpha=alpha)
        expected = stats.ttest_rel(b, a)
        ci = expected.confidence_interval(1 - alpha)
        assert c.p == pytest.approx(expected.pvalue) and (c.ci_low, c.ci_high) == pytest.approx((ci.low, ci.high))
        assert (c.ci_low > 0 or c.ci_high < 0) == (c.p < alpha)


def _ir_like(rng, n):
    """Differences of a measure on a grid, with many exact zeros (identical rankings) and ties."""
    d = np.round(rng.normal(rng.normal(0, 0.05), 0.2, n) / 0.05) * 0.05
    d[rng.random(n) < rng.uniform(0.1, 0.7)] = 0
    return d


def test_the_wilcoxon_interval_inverts_the_signed_rank_test_and_agrees_with_it():
    rng = np.random.default_rng(2)
    defined = 0
    for _ in range(60):
        d = _ir_like(rng, int(rng.choice([6, 20, 60, 200])))
        if not d.any():
            continue
        estimate, low, high = statistics.wilcoxon_interval(d, 0.05)
        p = stats.wilcoxon(d).pvalue
        if math.isnan(low):  # the test rejects every shift: no interval to disagree
            assert p < 0.05
            continue
        defined += 1
        assert (low > 0 or high < 0) == (p < 0.05), (d.tolist(), low, high, p)
        for shift in (low, high):  # the ends are accepted shifts
            if math.isfinite(shift):
                assert statistics.signed_rank_p(d, shift) >= 0.05
    assert defined > 40


def test_the_wilcoxon_interval_is_the_textbook_one_without_ties():
    """n = 10, continuous: the exact 95% interval is [W_(9), W_(47)] of the 55 sorted Walsh averages (the signed-rank
    statistic's two-sided 5% critical value is 8)."""
    rng = np.random.default_rng(3)
    for _ in range(5):
        d = rng.normal(0.3, 1, 10)
        walsh = np.sort([(d[i] + d[j]) / 2 for i in range(10) for j in range(i, 10)])
        estimate, low, high = statistics.wilcoxon_interval(d, 0.05)
        assert estimate == pytest.approx(np.median(walsh))
        assert (low, high) == pytest.approx((walsh[8], walsh[46]), abs=1e-8)


def test_the_wilcoxon_table_shows_hodges_lehmann_and_names_its_interval():
    """With one seed, ``test: wilcoxon`` is the signed-rank test over queries (with several, the seed-aware test)."""
    config = make_config(test="wilcoxon", seeds=(1,))
    collections = make_collections(config)
    kd = report.kd_vs_cl_table(config, collections)
    cols = report.columns(config)
    assert cols.estimate == "HL" and "HL, Wilcoxon" in cols.low and cols.p == "p (wilcoxon, one seed)"
    row = kd[kd["collection"] == "faq-big"].iloc[0]
    d = (_per_query(collections, ["faq-big"], ["small-KD-s1"])
         - _per_query(collections, ["faq-big"], ["small-CL-s1"])).to_numpy()
    assert row[cols.p] == pytest.approx(stats.wilcoxon(d).pvalue)
    assert row["HL"] == pytest.approx(statistics.hodges_lehmann(d))
    assert row[cols.low] <= row["HL"] <= row[cols.high]
    t = report.kd_vs_cl_table(make_config(test="t", seeds=(1,)), collections)
    assert "HL" not in t and "(one seed, t, uncorrected)" in report.columns(make_config(seeds=(1,))).low
    several = make_config(test="wilcoxon")
    assert report.columns(several).estimate is None and report.columns(several).p == "p (seed-aware t)"
    legend = report.legend(config, cols)
    assert "Hodges–Lehmann" in legend and "not corrected for multiple comparisons" in legend


# -- the minimum detectable effect ----------------------------------------------------------------------------------
def test_minimum_detectable_effect_matches_statsmodels_and_a_simulation():
    from statsmodels.stats.power import TTestPower

    for n, sd, alpha in ((10, 0.2, 0.05), (120, 0.15, 0.05), (400, 0.3, 0.0125)):
        effect = TTestPower().solve_power(nobs=n, alpha=alpha, power=0.8, alternative="two-sided")
        assert statistics.minimum_detectable_effect(sd, n, alpha) == pytest.approx(effect * sd, rel=1e-4)
    assert statistics.minimum_detectable_effect(0.2, 10_000, 0.05) == pytest.approx(2.8016 * 0.2 / 100, rel=1e-3)
    assert math.isnan(statistics.minimum_detectable_effect(0.2, 1, 0.05))
    rng = np.random.default_rng(4)
    mde = statistics.minimum_detectable_effect(1.0, 20, 0.05)
    rejected = np.mean([stats.ttest_1samp(rng.normal(mde, 1.0, 20), 0).pvalue < 0.05 for _ in range(4000)])
    assert rejected == pytest.approx(0.8, abs=0.025)


def test_every_row_prints_its_mde_at_the_family_level_and_the_verdict_quotes_it():
    config = make_config()
    collections = make_collections(config)
    kd = report.kd_vs_cl_table(config, collections)
    cols = report.columns(config)
    for scope in ("collection", "pooled"):
        family = kd[kd["scope"] == scope]
        assert (family[cols.mde_alpha] == 0.05 / len(family)).all()
        for row in family.to_dict("records"):
            assert row[cols.mde] == pytest.approx(statistics.mde_from_se(row["se"], row["df"], 0.05 / len(family)))
    none = report.kd_vs_cl_table(make_config(correction=None), collections)
    assert (none[cols.mde_alpha] == 0.05).all()
    text = report.verdict(config, report.summary_table(config, collections), kd,
                          report.teacher_vs_cl_table(config, collections))
    nulls = kd[(kd["scope"] == "pooled") & ~kd["significant"]]
    assert len(nulls)  # the large student: KD = CL
    for row in nulls.to_dict("records"):
        line = next(line for line in text.splitlines() if line.startswith(f"- {row['student']}"))
        assert f"underpowered below the MDE {row[cols.mde]:.3f}" in line


def test_the_verdict_says_when_the_teachers_margin_is_below_the_mde():
    config = make_config()
    collections = make_collections(config, teacher_margin=0.0, noise=0.3)
    kd = report.kd_vs_cl_table(config, collections)
    teacher = report.teacher_vs_cl_table(config, collections)
    text = report.verdict(config, report.summary_table(config, collections), kd, teacher)
    assert "the teacher's whole margin over CL" in text and "is below it" in text
    assert "The teacher was not significantly better than the CL run of" in text


# -- the teacher's margin -------------------------------------------------------------------------------------------
def test_the_teachers_margin_over_each_cl_run_is_tested_like_kd_minus_cl(tmp_path):
    config = make_config()
    collections = make_collections(config, teacher_margin=0.15)
    teacher = report.teacher_vs_cl_table(config, collections)
    cols = report.columns(config, "CL", "teacher")
    assert set(teacher["student"]) == {"small", "large"}
    pooled = teacher[teacher["scope"] == "pooled"]
    assert set(pooled["collection"]) == {"in domain (manpages)", "out of domain (pooled queries)"}
    row = pooled[(pooled["student"] == "small") & ~pooled["in_domain"]].iloc[0]
    ood = ["faq-small", "faq-big"]
    cl = np.vstack([_per_query(collections, ood, [f"small-CL-s{s}"]).to_numpy() for s in (1, 2)])
    teacher_values = _per_query(collections, ood, ["teacher"]).to_numpy()[None, :]
    expected = seed_aware.crossed(cl, teacher_values, alpha=0.05)
    assert row["teacher-CL"] == pytest.approx((teacher_values - cl).mean()) and row[cols.p] == pytest.approx(expected.p)
    assert row["per seed teacher-CL"] == " ".join(f"{d:+.4f}" for d in expected.per_seed)
    assert (pooled["winner"] == "teacher").all() and pooled[cols.mde].notna().all()

    written = report.write_report(config, [], collections, tmp_path)
    assert (tmp_path / "tables" / "teacher_vs_cl.csv").exists()
    assert pd.read_csv(tmp_path / "tables" / "teacher_vs_cl.csv").columns.tolist() == teacher.columns.tolist()
    md = (tmp_path / "tables" / "kd_vs_cl.md").read_text()
    assert "| MDE (80% power) | MDE α |" in md and "λ·se" in md
    text = (tmp_path / "report.md").read_text()
    assert "## Teacher − CL: what KD could pass on" in text and "## KD − CL" in text
    assert "The teacher beat every student's CL run significantly" in written.verdict
    assert written.teacher_vs_cl is not None and re.search(r"Teacher − CL \(nDCG@10", written.verdict)
