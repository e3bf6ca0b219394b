"""Paired comparisons over queries: the test, an interval that agrees with it, the minimum detectable effect, and
the multiple-testing correction. The report's KD − CL and teacher − CL tables are built from these alone.

Every comparison pairs two systems on the same queries; ``d`` holds each query's difference (B − A).

- ``test="t"``: Student's paired t-test (scipy ``ttest_1samp(d)``, the same as ``ttest_rel(B, A)``); the interval
  is the paired t interval of the mean difference at level ``1 - alpha``. It excludes 0 exactly when ``p < alpha``.
- ``test="wilcoxon"``: the signed-rank test (scipy ``wilcoxon(d)``, zero differences dropped, as pt.Experiment
  does); the estimate is the Hodges–Lehmann shift (the median of the Walsh averages ``(d_i + d_j) / 2``, i ≤ j),
  and the interval is the test inverted: the shifts ``s`` for which ``wilcoxon(d - s)`` does not reject at
  ``alpha`` (the construction of R's ``wilcox.test(conf.int=TRUE)``), taken around the shift the test accepts
  best. It excludes 0 exactly when ``p < alpha``. With many tied or zero differences the test can reject every
  shift; the interval is then missing (NaN).
- Intervals are per comparison, not corrected for multiplicity; decisions use the corrected p-value.
- ``minimum_detectable_effect``: the smallest true mean difference that a two-sided paired t-test on ``n``
  queries with the observed standard deviation ``sd`` of the differences detects with the given power at level
  ``alpha``: ``MDE = λ · sd / √n``, with ``λ`` the noncentrality at which ``P(|T| > t_{1-α/2, n-1}) = power``
  for ``T ~ noncentral t(n - 1, λ)`` (about ``(z_{1-α/2} + z_{power}) · sd / √n = 2.80 · sd / √n`` for large n
  at α = 0.05). Under the Wilcoxon test the same figure stands in (the signed-rank test is about as powerful as
  the t-test for near-normal differences: asymptotic relative efficiency 3/π ≈ 0.95).
- ``correct``: statsmodels' ``multipletests`` with the configured method (``None``: no correction).

Example::

    >>> import numpy as np
    >>> c = paired(np.array([.5, .6, .7, .4]), np.array([.6, .6, .9, .5]), test="t", alpha=0.05)
    >>> round(c.mean_difference, 3), c.queries
    (0.1, 4)
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass

import numpy as np

POWER = 0.8
_HL_PAIRS = 2_000_000  # Walsh averages kept for the Hodges–Lehmann estimate; beyond, a seeded random sample


@dataclass(frozen=True)
class Comparison:
    """Two systems on the same queries: means, the mean difference (B − A), the test's estimate, interval and p."""

    queries: int
    mean_a: float
    mean_b: float
    mean_difference: float   # mean over queries of B − A (= mean_b − mean_a)
    estimate: float          # what the interval surrounds: the mean difference (t) or Hodges–Lehmann (wilcoxon)
    ci_low: float
    ci_high: float
    p: float
    sd: float                # sample standard deviation of the per-query differences


def paired(a, b, *, test: str, alpha: float) -> Comparison:
    """Compares ``b`` with ``a`` (arrays of one value per query, in the same query order)."""
    a, b = np.asarray(a, dtype=float), np.asarray(b, dtype=float)
    n = len(a)
    nan = float("nan")
    if n == 0:
        return Comparison(0, nan, nan, nan, nan, nan, nan, nan, nan)
    d = b - a
    mean = float(d.mean())
    base = dict(queries=n, mean_a=float(a.mean()), mean_b=float(b.mean()), mean_difference=mean)
    if n < 2:
        return Comparison(**base, estimate=mean, ci_low=nan, ci_high=nan, p=nan, sd=nan)
    sd = float(d.std(ddof=1))
    if np.allclose(d, 0):  # identical systems on these queries: nothing to test
        return Comparison(**base, estimate=0.0, ci_low=0.0, ci_high=0.0, p=1.0, sd=sd)
    if test == "wilcoxon":
        estimate, low, high = wilcoxon_interval(d, alpha)
        return Comparison(**base, estimate=estimate, ci_low=low, ci_high=high, p=signed_rank_p(d), sd=sd)
    if test != "t":
        raise ValueError(f"test must be 't' or 'wilcoxon', got {test!r}")
    low, high = t_interval(d, alpha)
    return Comparison(**base, estimate=mean, ci_low=low, ci_high=high, p=t_p(d), sd=sd)


# -- the paired t-test ---------------------------------------------------------------------------------------------
def t_p(d: np.ndarray) -> float:
    from scipy import stats

    return float(stats.ttest_1samp(d, 0.0).pvalue)


def t_interval(d: np.ndarray, alpha: float) -> tuple[float, float]:
    """The ``1 - alpha`` paired t interval of the mean difference."""
    from scipy import stats

    n = len(d)
    half = stats.t.ppf(1 - alpha / 2, n - 1) * d.std(ddof=1) / math.sqrt(n)
    return float(d.mean() - half), float(d.mean() + half)


# -- the signed-rank test ------------------------------------------------------------------------------------------
def signed_rank_p(d: np.ndarray, shift: float = 0.0) -> float:
    """scipy's two-sided Wilcoxon signed-rank p-value of ``d - shift`` (zeros dropped); 1 when all are zero."""
    from scipy import stats

    x = d - shift
    if not np.any(x):
        return 1.0
    with warnings.catch_warnings():  # exact/normal-approximation notes on ties and small n
        warnings.simplefilter("ignore")
        p = float(stats.wilcoxon(x).pvalue)
    return 1.0 if math.isnan(p) else p


def walsh_averages(d: np.ndarray, limit: int = _HL_PAIRS) -> np.ndarray:
    """Sorted ``(d_i + d_j) / 2`` for i ≤ j; beyond ``limit`` pairs, a seeded random sample of ``limit`` of them."""
    n = len(d)
    if n * (n + 1) // 2 <= limit:
        i, j = np.triu_indices(n)
    else:
        rng = np.random.default_rng(0)
        i, j = rng.integers(0, n, limit), rng.integers(0, n, limit)
    return np.sort((d[i] + d[j]) / 2)


def hodges_lehmann(d: np.ndarray) -> float:
    """The Hodges–Lehmann shift: the median of the Walsh averages."""
    return float(np.median(walsh_averages(np.asarray(d, dtype=float))))


def wilcoxon_interval(d: np.ndarray, alpha: float) -> tuple[float, float, float]:
    """(Hodges–Lehmann estimate, low, high): the shifts the signed-rank test does not reject at ``alpha``.

    Found by bisection from the best-accepted shift near the estimate outwards (the p-value is constant between
    Walsh averages); then made to agree with the test at 0 exactly: 0 lies inside exactly when ``p(0) >= alpha``.
    ``low``/``high`` are ±inf when no shift on that side is rejected (n ≤ 5), NaN when every shift is.
    """
    d = np.asarray(d, dtype=float)
    walsh = walsh_averages(d)
    estimate = float(np.median(walsh))

    def accepted(shift: float) -> bool:
        return signed_rank_p(d, shift) >= alpha

    below, above = walsh[walsh < estimate], walsh[walsh > estimate]
    centres = [estimate]
    if len(below):
        centres += [(below[-1] + estimate) / 2, float(below[-1])]
    if len(above):
        centres += [(above[0] + estimate) / 2, float(above[0])]
    best = max(centres, key=lambda s: signed_rank_p(d, s))
    if not accepted(best):
        return estimate, float("nan"), float("nan")
    span = float(d.max() - d.min()) or 1.0
    far_low, far_high = float(d.min()) - span, float(d.max()) + span
    low = -math.inf if accepted(far_low) else _boundary(accepted, far_low, best)
    high = math.inf if accepted(far_high) else _boundary(accepted, far_high, best)
    if accepted(0.0):
        low, high = min(low, 0.0), max(high, 0.0)
    elif low <= 0.0 <= high:  # accepted shifts on both sides of a rejected 0: keep the side of the best one
        if best > 0:
            low = _boundary(accepted, 0.0, best)
        else:
            high = _boundary(accepted, 0.0, best)
    return estimate, low, high


def _boundary(accepted, rejected_at: float, accepted_at: float, tolerance: float = 1e-10) -> float:
    """The accepted point nearest the boundary between ``rejected_at`` and ``accepted_at``, by bisection."""
    out, inside = rejected_at, accepted_at
    while abs(inside - out) > tolerance:
        middle = (out + inside) / 2
        if middle in (out, inside):
            break
        if accepted(middle):
            inside = middle
        else:
            out = middle
    return float(inside)


# -- power ---------------------------------------------------------------------------------------------------------
def minimum_detectable_effect(sd: float, n: int, alpha: float, power: float = POWER) -> float:
    """The smallest mean difference a two-sided paired t-test on ``n`` queries detects with ``power`` at ``alpha``,
    for per-query differences of standard deviation ``sd`` (see the module docstring). NaN when it is undefined."""
    if n < 2 or not sd > 0 or math.isnan(sd):
        return float("nan")
    return mde_from_se(sd / math.sqrt(n), n - 1, alpha, power)


def mde_from_se(se: float, df: float, alpha: float, power: float = POWER) -> float:
    """The smallest true difference a two-sided t-test with standard error ``se`` on ``df`` degrees of freedom
    detects with ``power`` at ``alpha``: ``λ · se``, with ``λ`` the noncentrality at which a noncentral t on ``df``
    degrees of freedom lands beyond the critical values with that probability. NaN when undefined."""
    from scipy import optimize, stats

    if not (se > 0) or not (df > 0) or math.isnan(se) or math.isnan(df):
        return float("nan")
    critical = stats.t.ppf(1 - alpha / 2, df)

    def shortfall(noncentrality: float) -> float:
        # the far tail P(T < -critical) is tiny wherever the root lies; scipy's nct.cdf can return NaN out there
        wrong_side = float(np.nan_to_num(stats.nct.cdf(-critical, df, noncentrality)))
        return float(stats.nct.sf(critical, df, noncentrality)) + wrong_side - power

    upper = 10.0
    while shortfall(upper) < 0:
        upper *= 2
    return float(optimize.brentq(shortfall, 0.0, upper, xtol=1e-10) * se)


# -- multiplicity --------------------------------------------------------------------------------------------------
def correct(p, method: str | None, alpha: float) -> np.ndarray:
    """``p`` adjusted by statsmodels' ``multipletests(method=...)`` over the non-NaN entries (one family);
    unchanged when ``method`` is None. NaN stays NaN."""
    p = np.asarray(p, dtype=float)
    out = p.copy()
    ok = ~np.isnan(p)
    if method is None or not ok.any():
        return out
    from statsmodels.stats.multitest import multipletests

    out[ok] = multipletests(p[ok], alpha=alpha, method=method)[1]
    return out


def family_alpha(alpha: float, method: str | None, members: int) -> float:
    """The level the power figure is computed at: ``alpha / m`` for a family of ``m`` corrected tests (the level
    Holm applies to the smallest p-value and Bonferroni to every one; at or below the thresholds of Šidák and
    Benjamini–Hochberg, so the power is at least the stated one under those too), ``alpha`` without a correction."""
    return alpha if method is None or members <= 1 else alpha / members
