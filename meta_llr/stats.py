"""The project's statistics, in one place: thin calls into scipy / numpy, each with its formula and source.

Used by ``meta_llr.compare`` (group summaries, tests against the baseline), ``meta_llr.study``
(hypothesis verdicts) and ``meta_llr.bench`` (CI of the paired step-time ratio). Needs
scipy >= 1.12 (``quantile_test``; ``ttest_ind(...).confidence_interval`` is 1.11,
``ttest_1samp(...).confidence_interval`` 1.10).

Undefined results are NaN, never a made-up number: a t-test needs at least 2 values per arm and
some variance. When every value of both arms is the same, Welch's t is 0/0 or ±d/0 and there is
no sampling distribution to read a p-value from, so :func:`welch` gives ``p = nan`` (no
``p = 0`` for "obviously different", no ``p = 1`` for "identical") and :func:`welch_note` says
why; the interval of the difference is NaN too.
"""
from __future__ import annotations

import math
from typing import NamedTuple

import numpy as np
from scipy import stats

NO_VARIANCE = "no variance: every value of both arms is the same, so Welch's t is undefined (p = NaN)"
TOO_FEW = "fewer than 2 values in an arm: no t-test"


def _finite(values) -> np.ndarray:
    return np.asarray([v for v in values if v is not None and np.isfinite(v)], dtype=np.float64)


def _pair(a, b) -> tuple[np.ndarray, np.ndarray]:
    return np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)


def _constant(x: np.ndarray) -> bool:
    """All values equal: the sample variance is exactly 0 (``x.var()`` can round to ~1e-32)."""
    return bool(np.all(x == x[0])) if len(x) else True


# ----------------------------------------------------------------------------- one sample

def mean_ci(values, confidence: float = 0.95) -> dict:
    """Mean, sample std ``s`` (ddof 1) and the two-sided t confidence interval of the mean,
    ``mean ± t_{(1+confidence)/2, n-1} s / sqrt(n)`` (Student 1908), over the finite values.

    ``scipy.stats.ttest_1samp(x, 0).confidence_interval(confidence)``. n = 0: all NaN;
    n = 1: the mean, the rest NaN. Zero spread gives the zero-width interval ``[mean, mean]``
    (shown next to std 0, so not mistaken for a measured precision)."""
    x = _finite(values)
    n = len(x)
    if n == 0:
        return {"n": 0, "mean": math.nan, "std": math.nan, "ci_low": math.nan, "ci_high": math.nan}
    mean = float(x.mean())
    if n == 1:
        return {"n": 1, "mean": mean, "std": math.nan, "ci_low": math.nan, "ci_high": math.nan}
    if _constant(x):  # what scipy gives (mean ± t * 0), without its precision-loss warning
        return {"n": n, "mean": mean, "std": 0.0, "ci_low": mean, "ci_high": mean}
    ci = stats.ttest_1samp(x, 0.0).confidence_interval(confidence)
    return {"n": n, "mean": mean, "std": float(x.std(ddof=1)), "ci_low": float(ci.low), "ci_high": float(ci.high)}


def median_ci(values, confidence: float = 0.95) -> tuple[float, float] | None:
    """Distribution-free confidence interval of the median from binomial order statistics
    (Thompson 1936; Conover, *Practical Nonparametric Statistics*, 3rd ed., 1999, the quantile
    test): the sorted values ``x_(k)``, ``x_(n+1-k)`` with the largest k such that
    ``P(Binomial(n, 1/2) <= k-1) <= (1 - confidence)/2``; coverage >= ``confidence``.

    ``scipy.stats.quantile_test(x, p=0.5).confidence_interval(confidence)`` (scipy >= 1.12).
    None when n is too small for any such k (n <= 5 at 95%: even ``[min, max]`` covers less)."""
    x = np.asarray(list(values), dtype=np.float64)
    if len(x) == 0:
        return None
    ci = stats.quantile_test(x, p=0.5).confidence_interval(confidence)
    if not (np.isfinite(ci.low) and np.isfinite(ci.high)):
        return None
    return float(ci.low), float(ci.high)


# ----------------------------------------------------------------------------- two samples

def welch_note(a, b) -> str:
    """Why :func:`welch` / :func:`welch_interval` give NaN for these arms, or "" when they don't."""
    a, b = _pair(a, b)
    if len(a) < 2 or len(b) < 2:
        return TOO_FEW
    if _constant(a) and _constant(b):
        return NO_VARIANCE
    return ""


def welch(a, b, alternative: str = "two-sided") -> tuple[float, float]:
    """Welch's t statistic and p-value for mean(a) - mean(b) (Welch 1947; Satterthwaite 1946):
    ``t = (mean_a - mean_b) / sqrt(s_a²/n_a + s_b²/n_b)`` against Student's t with the
    Welch–Satterthwaite degrees of freedom ``(v_a + v_b)² / (v_a²/(n_a-1) + v_b²/(n_b-1))``,
    ``v = s²/n``. ``scipy.stats.ttest_ind(a, b, equal_var=False, alternative=alternative)``.

    ``(nan, nan)`` when :func:`welch_note` is not empty (fewer than 2 values in an arm, or no
    variance in either arm)."""
    if welch_note(a, b):
        return math.nan, math.nan
    result = stats.ttest_ind(*_pair(a, b), equal_var=False, alternative=alternative)
    return float(result.statistic), float(result.pvalue)


def welch_interval(a, b, confidence: float = 0.95) -> tuple[float, float]:
    """Two-sided Welch–Satterthwaite confidence interval of mean(a) - mean(b):
    ``diff ± t_{(1+confidence)/2, df} sqrt(v_a + v_b)`` (df and v as in :func:`welch`).
    ``scipy.stats.ttest_ind(a, b, equal_var=False).confidence_interval(confidence)``
    (scipy >= 1.11). ``(nan, nan)`` when :func:`welch_note` is not empty."""
    if welch_note(a, b):
        return math.nan, math.nan
    ci = stats.ttest_ind(*_pair(a, b), equal_var=False).confidence_interval(confidence)
    return float(ci.low), float(ci.high)


class Tost(NamedTuple):
    statistic: float   # t of the deciding (larger-p) one-sided test
    pvalue: float      # H0: |mean_a - mean_b| >= margin; small = equivalent within the margin
    pvalue_outside: float  # H0: |mean_a - mean_b| <= margin; small = different by more than the margin


def tost(a, b, margin: float) -> Tost:
    """Equivalence of two means within ``±margin`` by two one-sided Welch tests (TOST,
    Schuirmann 1987): ``p = max(p(A - B > -margin), p(A - B < +margin))``, each a shifted
    :func:`welch`. ``pvalue_outside`` tests the opposite, ``|A - B| > margin``: the smaller
    of ``p(A - B > +margin)`` and ``p(A - B < -margin)``, doubled (Bonferroni over the two
    directions), capped at 1. All NaN when :func:`welch_note` is not empty."""
    a, b = _pair(a, b)
    if welch_note(a, b):
        return Tost(math.nan, math.nan, math.nan)
    t_low, p_low = welch(a + margin, b, "greater")   # H0: A - B <= -margin
    t_high, p_high = welch(a - margin, b, "less")    # H0: A - B >= +margin
    _, p_above = welch(a - margin, b, "greater")     # H0: A - B <= +margin
    _, p_below = welch(a + margin, b, "less")        # H0: A - B >= -margin
    return Tost(t_low if p_low >= p_high else t_high, max(p_low, p_high), min(1.0, 2 * min(p_above, p_below)))


def hedges_g(a, b) -> float:
    """Standardised mean difference with Hedges' small-sample correction (Hedges 1981, J. Educ.
    Stat. 6(2); Hedges & Olkin 1985, ch. 5): ``g = J (mean_a - mean_b) / s_pooled``,
    ``s_pooled = sqrt(((n_a-1) s_a² + (n_b-1) s_b²) / (n_a + n_b - 2))``,
    ``J = 1 - 3 / (4 (n_a + n_b) - 9)`` (= 1 - 3/(4 df - 1)). scipy has no effect-size function.
    NaN with fewer than 2 values in an arm; ±inf (0 if the means are equal) when neither arm varies."""
    a, b = _pair(a, b)
    na, nb = len(a), len(b)
    if na < 2 or nb < 2:
        return math.nan
    if _constant(a) and _constant(b):
        return math.copysign(math.inf, a[0] - b[0]) if a[0] != b[0] else 0.0
    pooled = math.sqrt(((na - 1) * a.var(ddof=1) + (nb - 1) * b.var(ddof=1)) / (na + nb - 2))
    return float((1 - 3 / (4 * (na + nb) - 9)) * (a.mean() - b.mean()) / pooled)


# ----------------------------------------------------------------------------- multiple tests

def holm(pvalues) -> list[float]:
    """Holm's step-down adjusted p-values (Holm 1979), in the input order: sort the m finite
    p-values, ``p_adj(i) = max_{j<=i} min(1, (m - j + 1) p_(j))``. NaN stays NaN and does not
    count in m. scipy has no Holm (``scipy.stats.false_discovery_control`` is Benjamini–Hochberg
    / –Yekutieli, which control the FDR, not the family-wise error)."""
    p = np.asarray(pvalues, dtype=np.float64)
    out = np.full(len(p), math.nan)
    valid = np.flatnonzero(np.isfinite(p))
    order = valid[np.argsort(p[valid], kind="stable")]
    m = len(order)
    out[order] = np.maximum.accumulate(np.minimum(1.0, (m - np.arange(m)) * p[order]))
    return out.tolist()


# ----------------------------------------------------------------------------- power

def power_t(effect: float, sd: float, n: int, alpha: float = 0.05, alternative: str = "two-sided") -> float:
    """Power of the two-sample t-test with ``n`` values per arm for a true mean difference
    ``effect`` when both arms have standard deviation ``sd`` (Cohen 1988, *Statistical Power
    Analysis*, ch. 2): with ``df = 2n - 2`` and noncentrality ``δ = effect / (sd sqrt(2/n))``,
    two-sided ``P(|T'| > t_{1-α/2})``, one-sided (``greater``: effect > 0 claimed)
    ``P(T' > t_{1-α})``, ``T' ~`` noncentral t(df, δ) (``scipy.stats.nct``). Welch's test has
    about this power for equal n. NaN for n < 2 or sd not > 0."""
    if n < 2 or not (sd > 0) or not math.isfinite(effect):
        return math.nan
    df, delta = 2 * n - 2, effect / (sd * math.sqrt(2 / n))
    if alternative == "two-sided":
        crit = stats.t.ppf(1 - alpha / 2, df)
        return float(stats.nct.sf(crit, df, delta) + stats.nct.cdf(-crit, df, delta))
    if alternative == "less":
        delta = -delta
    return float(stats.nct.sf(stats.t.ppf(1 - alpha, df), df, delta))


def tost_power(margin: float, sd: float, n: int, alpha: float = 0.05, true_diff: float = 0.0) -> float:
    """Power of TOST (:func:`tost`) to show ``|A - B| < margin`` with ``n`` values per arm when
    the true difference is ``true_diff`` and both arms have standard deviation ``sd``: the usual
    noncentral-t approximation (Chow & Liu, *Design and Analysis of Bioavailability and
    Bioequivalence Studies*, 2008, §5.3), ``1 - P(T' < t_c; δ_low) - P(T' > -t_c; δ_high)``
    with ``δ = (true_diff ± margin) / (sd sqrt(2/n))``, ``t_c = t_{1-α, 2n-2}``, clipped at 0."""
    if n < 2 or not (sd > 0):
        return math.nan
    df, se = 2 * n - 2, sd * math.sqrt(2 / n)
    crit = stats.t.ppf(1 - alpha, df)
    power = 1 - stats.nct.cdf(crit, df, (true_diff + margin) / se) - stats.nct.sf(-crit, df, (true_diff - margin) / se)
    return float(max(0.0, power))


def seeds_needed(effect: float, sd: float, alpha: float = 0.05, power: float = 0.8,
                 alternative: str = "two-sided", equivalence: bool = False, most: int = 100_000) -> int | None:
    """The smallest n per arm whose power (:func:`power_t`, or :func:`tost_power` with
    ``effect`` as the margin when ``equivalence``) reaches ``power``; None if even ``most`` is short."""
    def achieved(n: int) -> float:
        return tost_power(effect, sd, n, alpha) if equivalence else power_t(effect, sd, n, alpha, alternative)

    if not (sd > 0) or not math.isfinite(effect) or effect == 0 or achieved(most) < power:
        return None
    low, high = 2, most  # power grows with n: bisect for the first n that reaches it
    while low < high:
        mid = (low + high) // 2
        low, high = (mid + 1, high) if achieved(mid) < power else (low, mid)
    return low


def detectable_effect(sd: float, n: int, alpha: float = 0.05, power: float = 0.8,
                      alternative: str = "two-sided") -> float:
    """The smallest true difference the t-test with ``n`` values per arm detects with ``power``
    (the root of ``power_t(effect) = power``, ``scipy.optimize.brentq``); NaN for n < 2."""
    from scipy.optimize import brentq

    if n < 2 or not (sd > 0):
        return math.nan
    side = "greater" if alternative != "two-sided" else alternative
    high = sd
    while power_t(high, sd, n, alpha, side) < power:
        high *= 2
    return float(brentq(lambda e: power_t(e, sd, n, alpha, side) - power, 0.0, high, xtol=sd * 1e-9))


def pooled_sd(a, b) -> float:
    """``sqrt(((n_a-1) s_a² + (n_b-1) s_b²) / (n_a + n_b - 2))``; NaN with fewer than 2 values in an arm."""
    a, b = _pair(a, b)
    if len(a) < 2 or len(b) < 2:
        return math.nan
    return float(math.sqrt(((len(a) - 1) * a.var(ddof=1) + (len(b) - 1) * b.var(ddof=1)) / (len(a) + len(b) - 2)))


def iqm_ci(values, confidence: float = 0.95, resamples: int = 2000, seed: int = 0) -> tuple[float, float, float]:
    """The interquartile mean (the mean of the middle 50 %, ``scipy.stats.trim_mean(x, 0.25)``)
    and its percentile-bootstrap confidence interval (``scipy.stats.bootstrap``, a fixed seed so
    a report is reproducible), the aggregate rliable recommends across runs and tasks (Agarwal
    et al. 2021, *Deep RL at the Edge of the Statistical Precipice*). NaNs with fewer than 2
    finite values."""
    x = _finite(values)
    if len(x) < 2:
        return (float(x[0]) if len(x) else math.nan), math.nan, math.nan
    iqm = float(stats.trim_mean(x, 0.25))
    if _constant(x):
        return iqm, iqm, iqm
    ci = stats.bootstrap((x,), lambda v, axis: stats.trim_mean(v, 0.25, axis=axis), confidence_level=confidence,
                         n_resamples=resamples, method="percentile", random_state=np.random.default_rng(seed),
                         vectorized=True).confidence_interval
    return iqm, float(ci.low), float(ci.high)
