"""flexmoe_mt.stats against closed forms and hand computations (no scipy)."""

import math

import pytest

from flexmoe_mt.stats import gain_ratio, paired, regularized_incomplete_beta, t_cdf, t_quantile, welch


@pytest.mark.parametrize("t", [-7.5, -2.0, -0.3, 0.0, 0.4, 1.0, 3.3, 12.0])
def test_t_cdf_matches_the_closed_forms_for_one_and_two_degrees_of_freedom(t):
    assert t_cdf(t, 1) == pytest.approx(0.5 + math.atan(t) / math.pi, abs=1e-12)  # Cauchy
    assert t_cdf(t, 2) == pytest.approx(0.5 + t / (2 * math.sqrt(2 + t * t)), abs=1e-12)


def test_t_cdf_tends_to_the_normal_and_matches_tabulated_values():
    normal = 0.5 * (1 + math.erf(1.3 / math.sqrt(2)))
    assert t_cdf(1.3, 1e7) == pytest.approx(normal, abs=1e-6)
    assert 2 * t_cdf(-2.0, 10) == pytest.approx(0.0733880, abs=1e-6)  # two-sided p, t = 2, df = 10
    assert t_quantile(0.975, 10) == pytest.approx(2.2281389, abs=1e-6)
    assert t_quantile(0.975, 2) == pytest.approx(4.3026527, abs=1e-6)
    assert t_quantile(0.025, 4) == pytest.approx(-2.7764451, abs=1e-6)


def test_incomplete_beta_against_a_polynomial_case():
    # I_x(2, 3) = 6x^2 - 8x^3 + 3x^4 (binomial sum)
    for x in (0.05, 0.3, 0.6, 0.97):
        assert regularized_incomplete_beta(2, 3, x) == pytest.approx(6 * x**2 - 8 * x**3 + 3 * x**4, abs=1e-12)


def test_welch_by_hand():
    # a: mean 2, var 1; b: mean 4, var 4 -> se^2 = 1/3 + 4/3 = 5/3, df = (5/3)^2 / ((1/3)^2/2 + (4/3)^2/2) = 50/17
    result = welch([1.0, 2.0, 3.0], [2.0, 4.0, 6.0])
    se, df = math.sqrt(5 / 3), 50 / 17
    assert result.difference == pytest.approx(-2.0)
    assert result.df == pytest.approx(df)
    assert result.p == pytest.approx(2 * t_cdf(-2.0 / se, df))
    assert 0.2 < result.p < 0.25  # t = -1.549 on ~2.94 df
    half = t_quantile(0.975, df) * se
    assert (result.low, result.high) == pytest.approx((-2.0 - half, -2.0 + half))
    assert result.verdict(-1) == "not significant at this size"


def test_paired_by_hand_and_verdicts():
    # differences 1, 2, 3: mean 2, sd 1, se 1/sqrt(3), t = 2 sqrt(3) on 2 df
    result = paired([11.0, 12.0, 13.0], [10.0, 10.0, 10.0])
    t = 2 * math.sqrt(3)
    assert result.p == pytest.approx(2 * (1 - (0.5 + t / (2 * math.sqrt(2 + t * t)))))
    assert result.p == pytest.approx(0.0742, abs=1e-3)
    strong = paired([11.0, 12.1, 13.0, 12.0, 11.9], [1.0, 2.0, 3.0, 2.1, 1.9])
    assert strong.verdict(+1) == "holds" and strong.verdict(-1) == "does not hold"
    assert math.isnan(welch([1.0], [2.0, 3.0]).p) and welch([1.0], [2.0, 3.0]).verdict(1).startswith("not testable")


def test_gain_ratio_is_the_share_of_the_teachers_gain_and_undefined_without_a_gain():
    dense, teacher, student = [10.0, 10.2, 9.8], [13.0, 13.2, 12.8], [11.0, 11.2, 10.8]
    result = gain_ratio(student, teacher, dense)
    assert result.ratio == pytest.approx(1 / 3)
    # equal variances v/n = 0.04/3 each: Var(R) = (2v + R^2 2v - 2 R v) / 9 with v = 0.04/3
    v = 0.04 / 3
    se = math.sqrt((2 * v + (1 / 9) * 2 * v - 2 / 3 * v) / 9)
    assert result.high - result.ratio == pytest.approx(t_quantile(0.975, 2) * se)
    assert gain_ratio(student, [9.0, 10.5, 9.9], dense).ratio is None
    assert "undefined" in gain_ratio(student, [9.0, 10.5, 9.9], dense).describe()


def test_describe_never_prints_a_p_value_of_zero():
    tiny = welch([10.0, 10.1, 10.2, 10.1], [1.0, 1.1, 1.2, 1.1])
    assert tiny.p < 0.0005
    assert "p < 0.001 (Welch)" in tiny.describe() and "p = 0.000" not in tiny.describe()
    assert "p = 0.2" in welch([1.0, 2.0, 3.0], [2.0, 4.0, 6.0]).describe()
