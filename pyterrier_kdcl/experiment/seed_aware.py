"""The test whose unit is the training run: two training methods compared over queries *and* seeds.

A training method is replicated by training again with another seed; a query by sampling another query. A
comparison of two methods on the same queries then has two sources of chance, and a test that averages each
query's value over seeds before a paired t-test over queries sees only the second: when training runs differ as
much as the methods do, it finds a "significant" difference in one lucky run. This module tests with both.

**The model.** ``D[s, q]``, the difference B − A of seed ``s`` on query ``q`` (runs of the two methods with the
same seed paired: they saw identical groups), follows the linear model with crossed random effects

    D[s, q] = μ + a[q] + b[s] + e[s, q],   a ~ N(0, σ²_query), b ~ N(0, σ²_seed), e ~ N(0, σ²_residual)

(a query's own advantage of B, a training run's, and their interaction), the design of subjects × items in
psycholinguistics (Clark 1973, "The language-as-fixed-effect fallacy"; Baayen, Davidson & Bates 2008, "Mixed-effects
modeling with crossed random effects for subjects and items") and of topics × systems in IR evaluation (Robertson
& Kanoulas 2012; Carterette 2015, "Bayesian inference for information retrieval evaluation"). Against a system run
once (the teacher, BM25) the same model holds: ``D[s, q] = B[s, q] − A[q]``.

**The estimate.** With every seed on every query (a balanced design) the variance components have closed forms
from the two-way ANOVA's mean squares, MS_seed (S − 1 df), MS_query (n − 1 df) and MS_residual ((S − 1)(n − 1)
df), and they equal the REML estimates where these are positive (Searle, Casella & McCulloch 1992, ch. 4). The
mean difference ``D̄`` has variance ``σ²_query/n + σ²_seed/S + σ²_residual/(nS)``, estimated by
``(MS_seed + MS_query − MS_residual)/(nS)`` with Satterthwaite's (1946) degrees of freedom. Variance components
are kept non-negative: where MS_seed ≤ MS_residual (no seed variance seen) the estimate is ``MS_query/(nS)`` on
n − 1 df, the seed-averaged paired t-test; where MS_query ≤ MS_residual, ``MS_seed/(nS)`` on S − 1 df, the t-test
over the per-seed means. So the test is never narrower than either, and with one seed per system it is the paired
t-test over queries (which then cannot tell the method from the seed: :attr:`SeedAwareComparison.one_seed`).

**Few seeds.** Satterthwaite's degrees of freedom are computed from estimated mean squares, and MS_seed has only
S − 1 of its own: when it is small by chance, the formula grants the test nearly the queries' degrees of freedom
just when its variance is underestimated (in simulation, 2 seeds with the seed spread observed here rejected a true
null 12% of the time at α = 0.05, 3 seeds 8%). So the variance is taken at the estimate, and the degrees of freedom
where MS_seed reaches the upper bound of its one-sided :data:`SEED_DF_BOUND` chi-square confidence interval: a
seed spread that the data cannot rule out decides how far the test may trust its variance. This guard is the
project's own small-sample choice, justified by the simulation below, not taken from the references.

``tests/test_seed_aware.py`` checks the estimate against statsmodels' REML fit of the same model and shows, by
simulation at the seed variance observed in the committed runs, that its type-I error stays at α where the
seed-averaged paired t-test's does not (:func:`simulate_type_one_error`; the figure:
``docs/results/seed-aware-simulation``).

Example::

    >>> import numpy as np
    >>> rng = np.random.default_rng(0)
    >>> a = rng.uniform(size=(5, 200)); b = a + 0.05 + rng.normal(0, 0.1, size=(5, 200))
    >>> c = crossed(a, b, alpha=0.05)
    >>> c.seeds, c.queries, round(c.mean_difference, 2), c.p < 0.05
    (5, 200, 0.05, True)
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from pyterrier_kdcl.experiment.statistics import POWER, mde_from_se

SEED_DF_BOUND = 0.8  # the degrees of freedom are taken where MS_seed reaches the upper bound of this confidence


@dataclass(frozen=True)
class VarianceComponents:
    """The two-way ANOVA of ``D`` (seeds × queries): mean squares and the non-negative variance components."""

    seeds: int
    queries: int
    ms_seed: float
    ms_query: float
    ms_residual: float

    @property
    def seed_var(self) -> float:
        return max(0.0, (self.ms_seed - self.ms_residual) / self.queries)

    @property
    def query_var(self) -> float:
        return max(0.0, (self.ms_query - self.ms_residual) / self.seeds)

    @property
    def residual_var(self) -> float:
        return self.ms_residual

    def variance_of_mean(self) -> tuple[float, float]:
        """``(Var(D̄), degrees of freedom)`` as the module docstring says: the variance from the mean squares, the
        degrees of freedom Satterthwaite's at the upper :data:`SEED_DF_BOUND` confidence bound of MS_seed."""
        variance, _ = self._satterthwaite(self.ms_seed)
        if self.seeds == 1:
            return variance, self.queries - 1.0
        from scipy import stats

        upper = self.ms_seed * (self.seeds - 1) / float(stats.chi2.ppf(1 - SEED_DF_BOUND, self.seeds - 1))
        return variance, self._satterthwaite(max(upper, self.ms_seed))[1]

    def _satterthwaite(self, ms_seed: float) -> tuple[float, float]:
        s, n = self.seeds, self.queries
        if s == 1:
            return self.ms_query / n, n - 1.0
        if ms_seed <= self.ms_residual:
            return self.ms_query / (n * s), n - 1.0
        if self.ms_query <= self.ms_residual:
            return ms_seed / (n * s), s - 1.0
        combined = ms_seed + self.ms_query - self.ms_residual
        terms = [(ms_seed, s - 1), (self.ms_query, n - 1), (self.ms_residual, (s - 1) * (n - 1))]
        return combined / (n * s), combined ** 2 / sum(ms ** 2 / d for ms, d in terms)


def components(d: np.ndarray) -> VarianceComponents:
    """The ANOVA of a seeds × queries array of differences (no missing values)."""
    d = np.asarray(d, dtype=float)
    s, n = d.shape
    grand = d.mean()
    seed_means, query_means = d.mean(axis=1), d.mean(axis=0)
    ss_seed = n * float(((seed_means - grand) ** 2).sum())
    ss_query = s * float(((query_means - grand) ** 2).sum())
    residual = d - seed_means[:, None] - query_means[None, :] + grand
    ss_residual = float((residual ** 2).sum())
    nan = float("nan")
    return VarianceComponents(
        seeds=s, queries=n,
        ms_seed=ss_seed / (s - 1) if s > 1 else nan,
        ms_query=ss_query / (n - 1) if n > 1 else nan,
        ms_residual=ss_residual / ((s - 1) * (n - 1)) if s > 1 and n > 1 else nan)


@dataclass(frozen=True)
class SeedAwareComparison:
    """B − A over ``seeds`` training runs and ``queries`` queries (:func:`crossed`)."""

    seeds: int
    queries: int
    mean_a: float
    mean_b: float
    mean_difference: float
    per_seed: tuple[float, ...]   # each seed's mean difference over the queries
    se: float                     # standard error of ``mean_difference`` under the crossed model
    df: float
    ci_low: float
    ci_high: float
    p: float
    seed_sd: float                # σ_seed: how much a training run's mean difference varies
    query_sd: float               # σ_query: how much a query's difference varies (beyond the seed)
    residual_sd: float

    @property
    def one_seed(self) -> bool:
        """One run per method: the test is over queries only and cannot tell the method from the seed."""
        return self.seeds == 1

    def minimum_detectable_effect(self, alpha: float, power: float = POWER) -> float:
        """The smallest true mean difference this test detects with ``power`` at ``alpha``
        (:func:`~pyterrier_kdcl.experiment.statistics.mde_from_se`)."""
        return mde_from_se(self.se, self.df, alpha, power)


def crossed(a, b, *, alpha: float) -> SeedAwareComparison:
    """Compares B with A: ``a`` and ``b`` are arrays of shape (seeds, queries), in the same query order; a system
    run once is one row (its differences are taken against each seed of the other). With several rows on both
    sides, row ``i`` of ``a`` and of ``b`` share a seed."""
    a, b = np.atleast_2d(np.asarray(a, dtype=float)), np.atleast_2d(np.asarray(b, dtype=float))
    if a.shape[1] != b.shape[1]:
        raise ValueError(f"a and b must hold the same queries: {a.shape[1]} vs {b.shape[1]} columns")
    if len(a) > 1 and len(b) > 1 and len(a) != len(b):
        raise ValueError(f"seed-paired arrays need as many seeds on both sides: {len(a)} vs {len(b)}")
    d = b - a
    s, n = d.shape
    nan = float("nan")
    per_seed = tuple(float(x) for x in d.mean(axis=1)) if n else ()
    base = dict(seeds=s, queries=n, mean_a=float(a.mean()) if n else nan, mean_b=float(b.mean()) if n else nan,
                mean_difference=float(d.mean()) if n else nan, per_seed=per_seed)
    if n < 2:
        return SeedAwareComparison(**base, se=nan, df=nan, ci_low=nan, ci_high=nan, p=nan, seed_sd=nan,
                                   query_sd=nan, residual_sd=nan)
    vc = components(d)
    spread = dict(seed_sd=math.sqrt(vc.seed_var) if s > 1 else nan,
                  query_sd=math.sqrt(vc.query_var) if s > 1 else math.sqrt(vc.ms_query),
                  residual_sd=math.sqrt(vc.residual_var) if s > 1 else nan)
    if np.allclose(d, 0):  # identical systems: nothing to test
        return SeedAwareComparison(**base, se=0.0, df=nan, ci_low=0.0, ci_high=0.0, p=1.0, **spread)
    variance, df = vc.variance_of_mean()
    se = math.sqrt(variance)
    low, high, p = _t_test(base["mean_difference"], se, df, alpha)
    return SeedAwareComparison(**base, se=se, df=df, ci_low=low, ci_high=high, p=p, **spread)


def _t_test(mean: float, se: float, df: float, alpha: float) -> tuple[float, float, float]:
    from scipy import stats

    if se == 0:
        return mean, mean, 0.0 if mean != 0 else 1.0
    half = float(stats.t.ppf(1 - alpha / 2, df)) * se
    return mean - half, mean + half, float(2 * stats.t.sf(abs(mean) / se, df))


def seed_averaged_t(a, b) -> float:
    """The p-value of the test this module replaces: each query's value averaged over seeds, then a paired t-test
    over queries (kept for the simulation that shows why it was replaced)."""
    from scipy import stats

    d = np.atleast_2d(b) - np.atleast_2d(a)
    return float(stats.ttest_1samp(d.mean(axis=0), 0.0).pvalue)


# -- power ---------------------------------------------------------------------------------------------------------
def planned_mde(seeds: int, queries: int, *, seed_sd: float, query_sd: float, residual_sd: float, alpha: float,
                power: float = POWER) -> float:
    """The MDE a comparison of ``seeds`` runs per method on ``queries`` queries is expected to have, for the given
    variance components (the expected mean squares put into :meth:`VarianceComponents.variance_of_mean`)."""
    n, s = queries, seeds
    expected = VarianceComponents(seeds=s, queries=n, ms_seed=n * seed_sd ** 2 + residual_sd ** 2,
                                  ms_query=s * query_sd ** 2 + residual_sd ** 2, ms_residual=residual_sd ** 2)
    if s == 1:  # one run: the seed's whole variance lands on the difference, which the test cannot see
        return float("nan")
    variance, df = expected.variance_of_mean()
    return mde_from_se(math.sqrt(variance), df, alpha, power)


def seeds_for_mde(target: float, queries: int, *, seed_sd: float, query_sd: float, residual_sd: float,
                  alpha: float, power: float = POWER, most: int = 50) -> int | None:
    """The fewest seeds (2 to ``most``) whose planned MDE is at most ``target``; None when ``most`` do not reach it."""
    for seeds in range(2, most + 1):
        if planned_mde(seeds, queries, seed_sd=seed_sd, query_sd=query_sd, residual_sd=residual_sd,
                       alpha=alpha, power=power) <= target:
            return seeds
    return None


# -- the simulation ----------------------------------------------------------------------------------------------
def simulate_type_one_error(*, seeds: int, queries: int, seed_sd: float, query_sd: float, residual_sd: float,
                            alpha: float = 0.05, repetitions: int = 2000, random_state: int = 0) -> dict[str, float]:
    """Rejection rates under the null (μ = 0) of this module's test and of the seed-averaged paired t-test, for
    differences drawn from the crossed model with the given components: ``{"seed-aware": rate, "seed-averaged
    t": rate}``. A correct test rejects at about ``alpha``."""
    rng = np.random.default_rng(random_state)
    rejected = {"seed-aware": 0, "seed-averaged t": 0}
    zeros = np.zeros((seeds, queries))
    for _ in range(repetitions):
        d = (rng.normal(0, query_sd, size=(1, queries)) + rng.normal(0, seed_sd, size=(seeds, 1))
             + rng.normal(0, residual_sd, size=(seeds, queries)))
        rejected["seed-aware"] += crossed(zeros, d, alpha=alpha).p < alpha
        rejected["seed-averaged t"] += seed_averaged_t(zeros, d) < alpha
    return {name: count / repetitions for name, count in rejected.items()}
