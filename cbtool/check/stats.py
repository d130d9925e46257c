"""The statistics behind ``cbtool check`` and ``compare``: McNemar's test, two-proportion tests and intervals,
and the paired t-test over seeds of ``cbtool sweep``.

Pure functions on counts, using only the standard library (no scipy, no torch).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from statistics import NormalDist
from typing import Any


@dataclass(frozen=True)
class TestResult:
    """A two-sided p-value, the statistic behind it (``None`` for exact tests) and the method's name."""

    p_value: float
    method: str
    statistic: float | None = None


def _z(confidence: float) -> float:
    if not 0.0 < confidence < 1.0:
        raise ValueError(f"confidence must be between 0 and 1, got {confidence}")
    return NormalDist().inv_cdf(0.5 + confidence / 2.0)


def chi2_1df_sf(x: float) -> float:
    """Survival function of the chi-square distribution with one degree of freedom."""
    return math.erfc(math.sqrt(max(x, 0.0) / 2.0))


def binomial_two_sided_p(k: int, n: int) -> float:
    """Exact two-sided p-value of ``k`` successes in ``n`` fair coin flips (doubling the smaller tail)."""
    if n == 0:
        return 1.0
    tail = sum(math.comb(n, i) for i in range(min(k, n - k) + 1))
    return min(1.0, 2 * tail / 2**n)  # int / int divides exactly before rounding to float


def mcnemar_test(b: int, c: int, *, exact_below: int = 25) -> TestResult:
    """McNemar's test on the discordant pairs of a paired comparison.

    ``b``: samples only the baseline got right; ``c``: samples only the current model got right.
    Exact binomial when ``b + c < exact_below``, else chi-square with continuity correction.
    """
    if b < 0 or c < 0:
        raise ValueError(f"discordant counts must be non-negative, got b={b}, c={c}")
    n = b + c
    if n < exact_below:
        return TestResult(binomial_two_sided_p(min(b, c), n), "mcnemar-exact")
    statistic = (abs(b - c) - 1) ** 2 / n
    return TestResult(chi2_1df_sf(statistic), "mcnemar-chi2", statistic)


def wilson_interval(successes: int, n: int, confidence: float = 0.95) -> tuple[float, float]:
    """Wilson score interval for a proportion (as a fraction, not percent)."""
    if n <= 0:
        return (0.0, 1.0)
    z = _z(confidence)
    p = successes / n
    denominator = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denominator
    half = z / denominator * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n))
    low = 0.0 if successes == 0 else max(0.0, centre - half)
    high = 1.0 if successes == n else min(1.0, centre + half)
    return (low, high)


def two_proportion_interval(x1: int, n1: int, x2: int, n2: int, confidence: float = 0.95) -> tuple[float, float]:
    """Interval for ``x2/n2 - x1/n1`` from independent samples (Newcombe's hybrid score, from Wilson intervals)."""
    p1, p2 = x1 / n1, x2 / n2
    l1, u1 = wilson_interval(x1, n1, confidence)
    l2, u2 = wilson_interval(x2, n2, confidence)
    d = p2 - p1
    return (d - math.sqrt((p2 - l2) ** 2 + (u1 - p1) ** 2), d + math.sqrt((u2 - p2) ** 2 + (p1 - l1) ** 2))


def two_proportion_test(x1: int, n1: int, x2: int, n2: int) -> TestResult:
    """Two-sided z-test (pooled variance) that two independent proportions are equal."""
    pooled = (x1 + x2) / (n1 + n2)
    variance = pooled * (1 - pooled) * (1 / n1 + 1 / n2)
    if variance == 0:
        return TestResult(1.0, "two-proportion-z", 0.0)
    z = (x2 / n2 - x1 / n1) / math.sqrt(variance)
    return TestResult(math.erfc(abs(z) / math.sqrt(2)), "two-proportion-z", z)


def paired_proportion_interval(b: int, c: int, n: int, confidence: float = 0.95) -> tuple[float, float]:
    """Interval for the paired difference ``(c - b) / n``: Wald with continuity correction (Fleiss).

    The correction keeps the interval in step with the continuity-corrected McNemar test, so that
    an interval that excludes zero and a significant p-value almost always go together.
    """
    if n <= 0:
        raise ValueError(f"n must be positive, got {n}")
    z = _z(confidence)
    d = (c - b) / n
    half = z * math.sqrt(max(b + c - (c - b) ** 2 / n, 0.0)) / n + 1 / n
    return (max(-1.0, d - half), min(1.0, d + half))


def discordant_counts(baseline_correct: str, current_correct: str) -> tuple[int, int]:
    """``(b, c)``: samples right only in the baseline, and right only in the current run."""
    b = c = 0
    for old, new in zip(baseline_correct, current_correct):
        if old != new:
            if old == "1":
                b += 1
            else:
                c += 1
    return b, c


def paired_top1_test(reference: Mapping[str, Any], other: Mapping[str, Any]) -> TestResult | None:
    """McNemar's test on top1 of two models scored on the same samples (``None`` without both ``correct``)."""
    a, b = reference["metrics"].get("correct"), other["metrics"].get("correct")
    if not a or not b or len(a) != len(b):
        return None
    return mcnemar_test(*discordant_counts(a, b))


def regularized_beta(x: float, a: float, b: float) -> float:
    """The regularized incomplete beta function I_x(a, b), by its continued fraction (Lentz's method)."""
    if not 0.0 <= x <= 1.0:
        raise ValueError(f"x must lie in [0, 1], got {x}")
    if x in (0.0, 1.0):
        return x
    front = math.exp(math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b) + a * math.log(x) + b * math.log1p(-x))
    # The fraction converges fast below the mean of the distribution; above it, use I_x(a, b) = 1 - I_{1-x}(b, a).
    if x < (a + 1.0) / (a + b + 2.0):
        return front * _beta_fraction(x, a, b) / a
    return 1.0 - front * _beta_fraction(1.0 - x, b, a) / b


def _beta_fraction(x: float, a: float, b: float, *, eps: float = 1e-15, tiny: float = 1e-300) -> float:
    c, d = 1.0, 1.0 - (a + b) * x / (a + 1.0)
    d = 1.0 / (d if abs(d) > tiny else tiny)
    h = d
    for m in range(1, 500):
        for numerator in (m * (b - m) * x / ((a + 2 * m - 1) * (a + 2 * m)),
                          -(a + m) * (a + b + m) * x / ((a + 2 * m) * (a + 2 * m + 1))):  # fmt: skip
            d = 1.0 + numerator * d
            d = 1.0 / (d if abs(d) > tiny else tiny)
            c = 1.0 + numerator / c
            c = c if abs(c) > tiny else tiny
            h *= d * c
        if abs(d * c - 1.0) < eps:
            break
    return h


def student_t_two_sided_p(t: float, df: float) -> float:
    """Two-sided p-value of Student's t distribution with ``df`` degrees of freedom: P(|T| >= |t|)."""
    if df <= 0:
        raise ValueError(f"degrees of freedom must be positive, got {df}")
    if math.isinf(t):
        return 0.0
    return regularized_beta(df / (df + t * t), df / 2.0, 0.5)


def paired_t_test(baseline: Sequence[float], current: Sequence[float]) -> TestResult:
    """Two-sided paired t-test that ``current - baseline`` has mean zero (pairs in order; at least two).

    When every difference is the same, the test has no spread to judge by: p is 1 for no difference and nan
    otherwise (undefined: a few seeds that happen to tie prove nothing); the statistic is then ``None``.
    """
    if len(baseline) != len(current):
        raise ValueError(f"paired samples differ in length: {len(baseline)} and {len(current)}")
    n = len(baseline)
    if n < 2:
        raise ValueError(f"a paired t-test needs at least 2 pairs, got {n}")
    differences = [y - x for x, y in zip(baseline, current)]
    mean = sum(differences) / n
    variance = sum((d - mean) ** 2 for d in differences) / (n - 1)
    if variance <= (1e-12 * max(1.0, abs(mean))) ** 2:
        return TestResult(1.0 if abs(mean) <= 1e-12 else math.nan, "paired-t", None)
    t = mean / math.sqrt(variance / n)
    return TestResult(student_t_two_sided_p(t, n - 1), "paired-t", t)
