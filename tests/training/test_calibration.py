"""Calibration statistics against hand calculation and independent re-implementations (pandas, scipy)."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest
from scipy.optimize import brentq
from scipy.special import expit, logit
from scipy.stats import chi2
from sklearn.linear_model import LogisticRegression

from core.errors import InputError
from training.stats.calibration import (
    brier_score,
    calibration_curve,
    calibration_slope_intercept,
    expected_calibration_error,
    hosmer_lemeshow,
    r_quantile_type7,
)


def test_hosmer_lemeshow_hand_computed() -> None:
    # n = 12, g = 4. Type-7 index = 1 + 11 p for p = 0, .25, .5, .75, 1 -> 1, 3.75, 6.5, 9.25, 12, so the
    # breaks are 0.1, 0.2 + .75 * 0.1 = 0.275, 0.45, 0.725, 0.9 and each interval holds 3 patients.
    p = [0.1, 0.1, 0.2, 0.3, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 0.9]
    y = [0, 0, 1, 0, 1, 0, 1, 0, 1, 1, 1, 1]
    # group: (obs y0, obs y1) vs (exp y0, exp y1)
    # [0.1, 0.275]  (2, 1) vs (2.6, 0.4): 0.36/2.6 + 0.36/0.4
    # (0.275, 0.45] (2, 1) vs (2.0, 1.0): 0
    # (0.45, 0.725] (1, 2) vs (1.2, 1.8): 0.04/1.2 + 0.04/1.8
    # (0.725, 0.9]  (0, 3) vs (0.4, 2.6): 0.16/0.4 + 0.16/2.6         total = 14/9, df = 4 - 2
    hl = hosmer_lemeshow(y, p, g=4)
    np.testing.assert_allclose(hl.breaks, [0.1, 0.275, 0.45, 0.725, 0.9], atol=1e-15)
    assert hl.observed == [[2, 1], [2, 1], [1, 2], [0, 3]]
    assert hl.statistic == pytest.approx(14 / 9, abs=1e-12)
    assert hl.df == 2 and hl.groups == 4
    assert hl.p_value == pytest.approx(math.exp(-7 / 9), abs=1e-12)  # chi2 with 2 df: P = exp(-x/2)
    assert hl.note is None


def _hl_pandas(y: np.ndarray, p: np.ndarray, g: int) -> tuple[float, int, float]:
    """Independent re-implementation: numpy type-7 quantiles, pandas.cut and groupby; none of our code."""
    breaks = np.unique(np.quantile(p, np.linspace(0, 1, g + 1), method="linear"))
    cats = pd.cut(p, bins=breaks, right=True, include_lowest=True)
    frame = pd.DataFrame({"y": y, "p": p, "g": cats})
    grp = frame.groupby("g", observed=False)
    o1 = grp["y"].sum().to_numpy(dtype=float)
    e1 = grp["p"].sum().to_numpy(dtype=float)
    n = grp.size().to_numpy(dtype=float)
    with np.errstate(divide="ignore", invalid="ignore"):
        terms = (o1 - e1) ** 2 / e1 + ((n - o1) - (n - e1)) ** 2 / (n - e1)
    stat = float(np.sum(terms))  # NaN propagates, as in R
    df = int((n > 0).sum()) - 2
    return stat, df, float(chi2.sf(stat, df))


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("g", [10, 5])
def test_hosmer_lemeshow_matches_pandas_reimplementation(seed: int, g: int) -> None:
    rng = np.random.default_rng(seed)
    p = expit(rng.normal(-0.5, 1.2, size=180))
    y = rng.binomial(1, np.clip(p * 1.15, 0, 1))
    hl = hosmer_lemeshow(y, p, g=g)
    stat, df, pval = _hl_pandas(y, p, g)
    assert hl.statistic == pytest.approx(stat, rel=1e-12)
    assert hl.df == df == g - 2
    assert hl.p_value == pytest.approx(pval, rel=1e-9)
    assert sum(sum(r) for r in hl.observed) == 180


def test_hosmer_lemeshow_with_ties_matches_pandas() -> None:
    rng = np.random.default_rng(7)
    p = np.round(expit(rng.normal(0, 1, size=120)), 1)  # 11 distinct values at most: duplicate breaks
    y = rng.binomial(1, p)
    hl = hosmer_lemeshow(y, p)
    stat, df, _ = _hl_pandas(y, p, 10)
    assert hl.groups < 10 and hl.df == df
    np.testing.assert_allclose(hl.statistic, stat, rtol=1e-12)  # NaN == NaN where both hit an empty interval


def test_empty_interval_gives_nan_like_r_and_can_be_dropped() -> None:
    # sorted p: 0.05, 0.1 x5, 0.2 x6; type-7 deciles: 0.05, 0.1 (x4), 0.15, 0.2 (x5) -> breaks 0.05, 0.1,
    # 0.15, 0.2; the interval (0.1, 0.15] is empty (0/0 in R), the other two hold 6 patients each.
    p = np.array([0.05] + [0.1] * 5 + [0.2] * 6)
    y = np.array([0, 0, 1, 0, 0, 0, 0, 1, 0, 0, 1, 0])
    hl = hosmer_lemeshow(y, p)
    np.testing.assert_allclose(hl.breaks, [0.05, 0.1, 0.15, 0.2])
    assert math.isnan(hl.statistic) and hl.groups == 2 and hl.df == 0
    assert "empty" in hl.note
    dropped = hosmer_lemeshow(y, p, drop_empty_groups=True)
    e1 = 0.05 + 0.5  # first group: y1 observed 1, expected 0.55; second: observed 2, expected 1.2
    ref = (1 - e1) ** 2 / e1 + (5 - (6 - e1)) ** 2 / (6 - e1) + (2 - 1.2) ** 2 / 1.2 + (4 - 4.8) ** 2 / 4.8
    assert dropped.statistic == pytest.approx(ref, abs=1e-12)
    assert dropped.empty_groups_dropped and math.isnan(dropped.p_value)  # df = 0: no p-value


def test_r_quantile_type7_agrees_with_numpy() -> None:
    rng = np.random.default_rng(0)
    x = rng.random(37)
    probs = np.arange(11) * 0.1
    np.testing.assert_allclose(r_quantile_type7(x, probs), np.quantile(x, probs), rtol=0, atol=1e-15)


def test_identical_predictions_raise() -> None:
    with pytest.raises(InputError):
        hosmer_lemeshow([0, 1, 0, 1], [0.3, 0.3, 0.3, 0.3])


@pytest.mark.parametrize("bad", [[0.1, 1.2, 0.3, 0.5], [0.1, np.nan, 0.3, 0.5], [-0.1, 0.2, 0.3, 0.5]])
def test_non_probabilities_raise(bad: list) -> None:
    with pytest.raises(InputError):
        brier_score([0, 1, 0, 1], bad)


def test_brier_score() -> None:
    y = np.array([0, 1, 1, 0, 1])
    p = np.array([0.2, 0.7, 0.9, 0.4, 0.5])
    assert brier_score(y, p) == pytest.approx(np.mean((p - y) ** 2), abs=1e-15)


def _simulate(n: int, slope: float, intercept: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    p = expit(rng.normal(-0.3, 1.5, size=n))
    y = rng.binomial(1, expit(intercept + slope * logit(p)))
    return y, p


def test_calibration_slope_matches_unpenalised_sklearn() -> None:
    y, p = _simulate(600, slope=0.6, intercept=0.4, seed=1)
    res = calibration_slope_intercept(y, p)
    lr = LogisticRegression(C=np.inf, tol=1e-12, max_iter=10_000).fit(logit(p)[:, None], y)
    assert res.slope == pytest.approx(float(lr.coef_[0, 0]), abs=1e-6)
    assert res.slope_ci[0] < res.slope < res.slope_ci[1]
    assert res.slope_ci[1] < 1.0  # a miscalibrated (too extreme) model is detected: slope CI excludes 1


def test_calibration_in_the_large_solves_score_equation() -> None:
    y, p = _simulate(500, slope=1.0, intercept=-0.7, seed=2)
    res = calibration_slope_intercept(y, p)
    lp = logit(p)
    a = brentq(lambda a: np.sum(y - expit(a + lp)), -10, 10, xtol=1e-14)  # MLE of glm(y ~ 1, offset = lp)
    assert res.intercept == pytest.approx(a, abs=1e-7)
    assert res.intercept_ci[1] < 0.0


def test_perfect_model_has_slope_one_intercept_zero() -> None:
    y, p = _simulate(4000, slope=1.0, intercept=0.0, seed=5)
    res = calibration_slope_intercept(y, p)
    assert res.slope_ci[0] < 1.0 < res.slope_ci[1]
    assert res.intercept_ci[0] < 0.0 < res.intercept_ci[1]


def test_probabilities_of_zero_and_one_are_clipped_and_recorded() -> None:
    y = np.array([0, 0, 1, 1, 0, 1, 0, 1])
    p = np.array([0.0, 0.2, 0.7, 1.0, 0.4, 0.6, 0.3, 0.55])
    res = calibration_slope_intercept(y, p)
    assert res.n_clipped == 2 and any("clipped" in n for n in res.notes)


def test_perfect_separation_is_reported_not_a_number() -> None:
    y = np.array([0, 0, 0, 1, 1, 1])
    p = np.array([0.1, 0.2, 0.3, 0.6, 0.7, 0.8])
    res = calibration_slope_intercept(y, p)
    assert res.slope is None and any("separation" in n for n in res.notes)


def test_calibration_curve_bins_are_hl_groups() -> None:
    rng = np.random.default_rng(4)
    p = rng.random(95)
    y = rng.binomial(1, p)
    bins = calibration_curve(y, p)
    hl = hosmer_lemeshow(y, p)
    assert len(bins) == hl.groups == 10
    assert sum(b.n for b in bins) == 95 and sum(b.events for b in bins) == int(y.sum())
    for b, obs, exp in zip(bins, hl.observed, hl.expected):
        assert b.events == obs[1] and b.mean_predicted == pytest.approx(exp[1] / b.n)
        assert b.observed_ci_low <= b.observed <= b.observed_ci_high
    ece = expected_calibration_error(y, p)
    assert ece == pytest.approx(sum(abs(o[1] - e[1]) for o, e in zip(hl.observed, hl.expected)) / 95)
