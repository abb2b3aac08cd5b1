"""meta_llr.stats: every function against an independent computation (scipy distributions and
the textbook formula), its edge cases, and the NaN (not a made-up p) for arms without variance."""
import math

import numpy as np
import pytest
from scipy import special, stats

from meta_llr.stats import (NO_VARIANCE, TOO_FEW, hedges_g, holm, mean_ci, median_ci, tost, welch,
                            welch_interval, welch_note)

RNG = np.random.default_rng(7)
SAMPLES = [(RNG.normal(0.3, 1.0, na), RNG.normal(0.0, 0.5, nb)) for na, nb in ((3, 3), (4, 6), (10, 5), (25, 30))]


def welch_by_hand(a, b):
    va, vb = a.var(ddof=1) / len(a), b.var(ddof=1) / len(b)
    df = (va + vb) ** 2 / (va ** 2 / (len(a) - 1) + vb ** 2 / (len(b) - 1))
    return (a.mean() - b.mean()) / math.sqrt(va + vb), df, math.sqrt(va + vb)


# ----------------------------------------------------------------------------- one sample

@pytest.mark.parametrize("confidence", [0.95, 0.9, 0.99])
def test_mean_ci_is_the_student_t_interval(confidence):
    for a, _ in SAMPLES:
        low, high = stats.t.interval(confidence, len(a) - 1, loc=a.mean(), scale=stats.sem(a))
        row = mean_ci(list(a), confidence)
        assert row["n"] == len(a) and row["mean"] == pytest.approx(a.mean())
        assert row["std"] == pytest.approx(a.std(ddof=1))
        assert (row["ci_low"], row["ci_high"]) == pytest.approx((low, high), rel=1e-12)


def test_mean_ci_edge_cases():
    assert mean_ci([])["n"] == 0 and math.isnan(mean_ci([])["mean"])
    one = mean_ci([0.5])
    assert one["mean"] == 0.5 and math.isnan(one["std"]) and math.isnan(one["ci_low"])
    row = mean_ci([1.0, None, float("nan"), 3.0, float("inf")])  # non-finite values are left out
    assert row["n"] == 2 and row["mean"] == 2.0
    flat = mean_ci([0.9, 0.9, 0.9])  # zero spread: zero-width interval next to std 0
    assert flat["std"] == 0 and flat["ci_low"] == flat["ci_high"] == pytest.approx(0.9)


def test_median_ci_uses_the_binomial_order_statistics():
    """The interval's ranks match scipy's binomial distribution and hold >= 95% coverage."""
    for n in (6, 10, 24, 101):
        values = list(range(n, 0, -1))  # any order: the CI is on the sorted values
        low, high = median_ci(values)
        k = low                      # values are 1..n, so the k-th smallest is k
        assert high == n + 1 - k
        assert stats.binom.cdf(k - 1, n, 0.5) <= 0.025 < stats.binom.cdf(k, n, 0.5)
        assert 1 - 2 * stats.binom.cdf(k - 1, n, 0.5) >= 0.95
    assert median_ci([1.0] * 5) is None  # n = 5: even (min, max) covers only 94%
    assert median_ci([]) is None


@pytest.mark.parametrize("confidence", [0.9, 0.95, 0.99])
def test_median_ci_matches_a_direct_binomial_search(confidence):
    """Against the definition: the largest k with P(Bin(n, 1/2) <= k-1) <= (1 - c)/2, by exact sums."""
    for n in range(1, 80):
        values = list(RNG.normal(size=n))
        tail, k = (1 - confidence) / 2, 0
        while sum(math.comb(n, j) for j in range(k + 1)) / 2 ** n <= tail:
            k += 1
        ordered = sorted(values)
        assert median_ci(values, confidence) == (None if k == 0 else (ordered[k - 1], ordered[n - k])), n


# ----------------------------------------------------------------------------- two samples

@pytest.mark.parametrize("alternative", ["two-sided", "less", "greater"])
def test_welch_matches_the_t_distribution_by_hand(alternative):
    for a, b in SAMPLES:
        t, df, _ = welch_by_hand(a, b)
        p = {"two-sided": 2 * stats.t.sf(abs(t), df), "less": stats.t.cdf(t, df),
             "greater": stats.t.sf(t, df)}[alternative]
        assert welch(a, b, alternative) == pytest.approx((t, p), rel=1e-10)
        assert welch_note(a, b) == ""


@pytest.mark.parametrize("confidence", [0.95, 0.9])
def test_welch_interval_matches_by_hand(confidence):
    for a, b in SAMPLES:
        _, df, se = welch_by_hand(a, b)
        half = stats.t.ppf(0.5 + confidence / 2, df) * se
        diff = a.mean() - b.mean()
        assert welch_interval(a, b, confidence) == pytest.approx((diff - half, diff + half), rel=1e-12)


@pytest.mark.filterwarnings("ignore:Precision loss:RuntimeWarning")  # scipy, on the one constant arm
def test_no_variance_gives_nan_and_a_note_not_a_made_up_p():
    a, b = np.array([0.9, 0.9, 0.9]), np.array([0.8, 0.8])
    assert welch_note(a, b) == NO_VARIANCE and "no variance" in NO_VARIANCE
    for alternative in ("two-sided", "less", "greater"):
        assert all(math.isnan(v) for v in welch(a, b, alternative))
    assert all(math.isnan(v) for v in welch_interval(a, b))
    assert all(math.isnan(v) for v in tost(a, b, 0.2))
    assert all(math.isnan(v) for v in welch(a, a.copy()))
    # one arm without variance is an ordinary Welch test
    c = np.array([0.7, 0.75, 0.8])
    t, df, _ = welch_by_hand(a, c)
    assert welch(a, c) == pytest.approx((t, 2 * stats.t.sf(abs(t), df))) and welch_note(a, c) == ""


def test_too_few_values():
    assert welch_note([1.0], [1.0, 2.0]) == TOO_FEW
    assert all(math.isnan(v) for v in welch([1.0], [1.0, 2.0]))
    assert all(math.isnan(v) for v in welch_interval([], [1.0, 2.0]))
    assert all(math.isnan(v) for v in tost([1.0, 2.0], [3.0], 0.1))
    assert math.isnan(hedges_g([1.0], [1.0, 2.0]))


def test_tost_is_two_shifted_one_sided_welch_tests():
    a, b = np.array([0.901, 0.903, 0.900, 0.904]), np.array([0.900, 0.905, 0.902, 0.899])
    margin = 0.05
    lower = stats.ttest_ind(a + margin, b, equal_var=False, alternative="greater")
    upper = stats.ttest_ind(a - margin, b, equal_var=False, alternative="less")
    above = stats.ttest_ind(a - margin, b, equal_var=False, alternative="greater").pvalue
    below = stats.ttest_ind(a + margin, b, equal_var=False, alternative="less").pvalue
    result = tost(a, b, margin)
    assert result.pvalue == pytest.approx(max(lower.pvalue, upper.pvalue)) and result.pvalue < 1e-4
    deciding = lower if lower.pvalue >= upper.pvalue else upper
    assert result.statistic == pytest.approx(deciding.statistic)
    assert result.pvalue_outside == pytest.approx(min(1.0, 2 * min(above, below))) and result.pvalue_outside == 1.0


def test_hedges_g_against_the_exact_correction():
    """J = 1 - 3/(4 df - 1) approximates the exact Gamma(df/2) / (sqrt(df/2) Gamma((df-1)/2)) (Hedges 1981)."""
    for a, b in SAMPLES:
        df = len(a) + len(b) - 2
        pooled = math.sqrt(((len(a) - 1) * a.var(ddof=1) + (len(b) - 1) * b.var(ddof=1)) / df)
        exact_j = special.gamma(df / 2) / (math.sqrt(df / 2) * special.gamma((df - 1) / 2))
        assert hedges_g(a, b) == pytest.approx((1 - 3 / (4 * df - 1)) * (a.mean() - b.mean()) / pooled, rel=1e-12)
        assert hedges_g(a, b) == pytest.approx(exact_j * (a.mean() - b.mean()) / pooled, rel=3e-3)  # df >= 4
    assert hedges_g([1.0, 1.0], [0.0, 0.0]) == math.inf and hedges_g([1.0, 1.0], [1.0, 1.0]) == 0.0


# ----------------------------------------------------------------------------- multiple tests

def test_holm_hand_computed():
    # sorted p: 0.01, 0.02, 0.03, 0.2 with m = 4 -> 0.04, 0.06, 0.06 (monotone), 0.2
    assert holm([0.03, 0.2, 0.01, 0.02]) == pytest.approx([0.06, 0.2, 0.04, 0.06])
    assert holm([0.5, 0.6]) == pytest.approx([1.0, 1.0])
    adjusted = holm([0.01, float("nan"), 0.04])  # NaN does not count in m
    assert adjusted[0] == pytest.approx(0.02) and math.isnan(adjusted[1]) and adjusted[2] == pytest.approx(0.04)
    assert holm([]) == [] and all(math.isnan(v) for v in holm([float("nan")] * 2))


def test_holm_matches_its_definition():
    """p_adj(i) = max_{j<=i} min(1, (m - j + 1) p_(j)), by brute force; Holm <= Bonferroni."""
    for m in (1, 2, 5, 12):
        p = RNG.uniform(0, 0.1, m)
        order = np.argsort(p)
        expected = np.empty(m)
        for i in range(m):
            expected[order[i]] = max(min(1.0, (m - j) * p[order[j]]) for j in range(i + 1))
        assert holm(p) == expected.tolist()
        assert all(h <= min(1.0, m * q) for h, q in zip(holm(p), p))


def test_power_matches_published_tables_and_the_issue():
    """Two-sample t-test power (noncentral t) against Cohen (1988), Table 2.4.1, and the
    first study's numbers: a 0.5-point effect with a 0.5-point seed spread has 16 % power at
    3 seeds per arm and needs 17."""
    from meta_llr.stats import detectable_effect, power_t, seeds_needed, tost_power

    assert power_t(0.5, 1.0, 64) == pytest.approx(0.80, abs=0.005)          # d = 0.5: n = 64
    assert seeds_needed(0.5, 1.0) == 64 and seeds_needed(0.8, 1.0) == 26     # d = 0.8: n = 26
    assert seeds_needed(1.0, 1.0) == 17
    assert power_t(0.5, 1.0, 50, alternative="greater") == pytest.approx(0.80, abs=0.01)  # one-sided
    assert power_t(0.005, 0.005, 3) == pytest.approx(0.159, abs=0.002) and seeds_needed(0.005, 0.005) == 17
    assert power_t(0.0, 1.0, 10) == pytest.approx(0.05)                      # no effect: alpha
    effect = detectable_effect(0.005, 3)
    assert power_t(effect, 0.005, 3) == pytest.approx(0.8, abs=1e-6) and effect > 0.015
    # TOST: more power with less spread and more seeds; none when the margin is far below the noise
    assert tost_power(0.005, 0.0025, 3) < tost_power(0.005, 0.0025, 10) < tost_power(0.005, 0.001, 10)
    assert tost_power(0.005, 0.05, 3) == 0.0
    assert seeds_needed(0.005, 0.005, equivalence=True) > 17
    assert math.isnan(power_t(0.1, 0.0, 5)) and seeds_needed(0.1, 0.0) is None


def test_iqm_and_its_bootstrap_interval():
    """The interquartile mean is the mean of the middle half; its interval is scipy's bootstrap
    with a fixed seed (the same report twice), and covers the IQM."""
    from meta_llr.stats import iqm_ci

    x = [0.1, 0.5, 0.6, 0.7, 0.8, 5.0, 0.55, 0.65]
    iqm, low, high = iqm_ci(x)
    middle = sorted(x)[2:6]
    assert iqm == pytest.approx(sum(middle) / 4) and low <= iqm <= high
    assert iqm_ci(x) == (iqm, low, high)
    assert iqm_ci([0.3, 0.3, 0.3]) == (0.3, 0.3, 0.3) and math.isnan(iqm_ci([0.3])[1])
