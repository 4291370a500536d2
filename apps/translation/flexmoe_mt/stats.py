"""Significance of differences over seeds: Welch's and the paired t-test, their 95% intervals,
and a ratio of gains (the paper's distillation measure) with a delta-method interval.

Plain Python (no scipy): Student's t distribution through the regularised incomplete beta
function (a continued fraction, Numerical Recipes' ``betacf``), its quantile by bisection.
"""

from __future__ import annotations

import math
import statistics
from dataclasses import dataclass
from typing import Literal

LEVEL = 0.95
ALPHA = 1 - LEVEL
Verdict = Literal["holds", "does not hold", "not significant at this size", "not testable (one seed)"]


def _incomplete_beta_fraction(a: float, b: float, x: float) -> float:
    """The continued fraction of I_x(a, b) (Lentz's method)."""
    tiny, qab, qap, qam = 1e-300, a + b, a + 1.0, a - 1.0
    c, d = 1.0, 1.0 - qab * x / qap
    d = 1.0 / (d if abs(d) > tiny else tiny)
    h = d
    for m in range(1, 400):
        m2 = 2 * m
        for numerator in (
            m * (b - m) * x / ((qam + m2) * (a + m2)),
            -(a + m) * (qab + m) * x / ((a + m2) * (qap + m2)),
        ):
            d = 1.0 + numerator * d
            d = 1.0 / (d if abs(d) > tiny else tiny)
            c = 1.0 + numerator / c
            c = c if abs(c) > tiny else tiny
            h *= d * c
        if abs(d * c - 1.0) < 1e-15:
            break
    return h


def regularized_incomplete_beta(a: float, b: float, x: float) -> float:
    """I_x(a, b) for a, b > 0 and 0 <= x <= 1."""
    if not 0.0 <= x <= 1.0:
        raise ValueError(f"x must be in [0, 1], got {x!r}")
    if x in (0.0, 1.0):
        return x
    log_front = math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b) + a * math.log(x) + b * math.log1p(-x)
    if x < (a + 1.0) / (a + b + 2.0):
        return math.exp(log_front) * _incomplete_beta_fraction(a, b, x) / a
    return 1.0 - math.exp(log_front) * _incomplete_beta_fraction(b, a, 1.0 - x) / b


def t_cdf(t: float, df: float) -> float:
    """P(T <= t) for Student's t with ``df`` > 0 degrees of freedom."""
    if not df > 0:
        raise ValueError(f"df must be > 0, got {df!r}")
    tail = 0.5 * regularized_incomplete_beta(df / 2.0, 0.5, df / (df + t * t))
    return 1.0 - tail if t > 0 else tail


def t_quantile(p: float, df: float) -> float:
    """The t with P(T <= t) = ``p`` (bisection on :func:`t_cdf`)."""
    if not 0.0 < p < 1.0:
        raise ValueError(f"p must be in (0, 1), got {p!r}")
    low, high = -1.0, 1.0
    while t_cdf(low, df) > p:
        low *= 2.0
    while t_cdf(high, df) < p:
        high *= 2.0
    for _ in range(200):
        middle = (low + high) / 2.0
        low, high = (middle, high) if t_cdf(middle, df) < p else (low, middle)
    return (low + high) / 2.0


@dataclass(frozen=True)
class Comparison:
    """``difference`` (a - b: means, or mean of paired differences) with its 95% interval
    [``low``, ``high``], the two-sided ``p`` value, degrees of freedom and the test used.
    ``p``, ``low`` and ``high`` are NaN when a side has fewer than two values."""

    difference: float
    low: float
    high: float
    p: float
    df: float
    test: Literal["Welch", "paired"]

    def verdict(self, expected_sign: int) -> Verdict:
        """``"holds"`` when significant (p < 0.05) in the expected direction (+1: a > b,
        -1: a < b), ``"does not hold"`` when significant the other way, else not significant."""
        if math.isnan(self.p):
            return "not testable (one seed)"
        if self.p >= ALPHA:
            return "not significant at this size"
        return "holds" if self.difference * expected_sign > 0 else "does not hold"

    def describe(self) -> str:
        if math.isnan(self.p):
            return f"{self.difference:+.1f} (one seed: no interval)"
        p = "p < 0.001" if self.p < 0.0005 else f"p = {self.p:.3f}"  # never "p = 0.000"
        return f"{self.difference:+.1f} [{self.low:+.1f}, {self.high:+.1f}], {p} ({self.test})"


def _from_t(difference: float, se: float, df: float, test: Literal["Welch", "paired"]) -> Comparison:
    if se == 0.0:  # no spread at all: the difference is exact
        return Comparison(difference, difference, difference, 0.0 if difference else 1.0, df, test)
    t = difference / se
    p = 2.0 * t_cdf(-abs(t), df)
    half = t_quantile(1.0 - ALPHA / 2.0, df) * se
    return Comparison(difference, difference - half, difference + half, p, df, test)


def _undefined(difference: float, test: Literal["Welch", "paired"]) -> Comparison:
    return Comparison(difference, math.nan, math.nan, math.nan, math.nan, test)


def welch(a: list[float], b: list[float]) -> Comparison:
    """Welch's unequal-variance t-test of mean(a) - mean(b) (independent samples)."""
    difference = statistics.mean(a) - statistics.mean(b)
    if len(a) < 2 or len(b) < 2:
        return _undefined(difference, "Welch")
    va, vb = statistics.variance(a) / len(a), statistics.variance(b) / len(b)
    if va + vb == 0.0:
        return _from_t(difference, 0.0, len(a) + len(b) - 2, "Welch")
    df = (va + vb) ** 2 / (va**2 / (len(a) - 1) + vb**2 / (len(b) - 1))
    return _from_t(difference, math.sqrt(va + vb), df, "Welch")


def paired(a: list[float], b: list[float]) -> Comparison:
    """Paired t-test of mean(a_i - b_i) (``a[i]`` and ``b[i]`` come from the same seed)."""
    if len(a) != len(b):
        raise ValueError(f"paired samples need equal lengths, got {len(a)} and {len(b)}")
    differences = [x - y for x, y in zip(a, b)]
    difference = statistics.mean(differences)
    if len(differences) < 2:
        return _undefined(difference, "paired")
    return _from_t(difference, statistics.stdev(differences) / math.sqrt(len(differences)), len(a) - 1, "paired")


@dataclass(frozen=True)
class GainRatio:
    """(student - dense) / (teacher - dense) with a 95% delta-method interval; ``ratio`` is
    None (undefined) unless the teacher beats dense significantly."""

    ratio: float | None
    low: float
    high: float
    teacher_gain: Comparison

    def describe(self) -> str:
        if self.ratio is None:
            return f"undefined: the teacher does not beat dense (teacher - dense {self.teacher_gain.describe()})"
        if math.isnan(self.low):
            return f"{self.ratio:.2f} (one seed: no interval)"
        return f"{self.ratio:.2f} [{self.low:.2f}, {self.high:.2f}]"


def gain_ratio(student: list[float], teacher: list[float], dense: list[float]) -> GainRatio:
    """The share of the teacher's gain over dense that the student keeps (Kudugunta et al.'s
    distillation measure), from three independent groups of seeds. Interval: first-order delta
    method, Var(R) ~ (Var(gS) + R^2 Var(gT) - 2 R Cov(gS, gT)) / gT^2 with gS = S - D, gT = T - D
    sharing the dense mean (Cov = Var(mean D)), and a t quantile with the smallest group's
    n - 1 degrees of freedom (conservative)."""
    teacher_gain = welch(teacher, dense)
    if teacher_gain.verdict(+1) != "holds":
        return GainRatio(None, math.nan, math.nan, teacher_gain)
    student_gain = statistics.mean(student) - statistics.mean(dense)
    ratio = student_gain / teacher_gain.difference
    if min(len(student), len(teacher), len(dense)) < 2:
        return GainRatio(ratio, math.nan, math.nan, teacher_gain)
    var_s, var_t, var_d = (statistics.variance(x) / len(x) for x in (student, teacher, dense))
    variance = (var_s + var_d + ratio**2 * (var_t + var_d) - 2 * ratio * var_d) / teacher_gain.difference**2
    half = t_quantile(1.0 - ALPHA / 2.0, min(len(student), len(teacher), len(dense)) - 1) * math.sqrt(variance)
    return GainRatio(ratio, ratio - half, ratio + half, teacher_gain)
