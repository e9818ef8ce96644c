"""Calibration of predicted probabilities: Hosmer–Lemeshow, calibration curve, Brier, slope and intercept.

Why these conventions: Hosmer–Lemeshow results differ between packages only by their grouping rule, so the
rule is R's ``ResourceSelection::hoslem.test`` (the one most radiology papers cite), reproduced step by step
and documented in :func:`hosmer_lemeshow`. Slope and intercept follow Van Calster et al. (2016/2019): logistic
recalibration on the logit of the predicted risk.
"""

from __future__ import annotations

import logging
import warnings
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
from scipy.stats import chi2
from sklearn.metrics import brier_score_loss

from core.errors import InputError
from training.stats.delong import validate_binary_labels, validate_scores

__all__ = [
    "CalibrationBin",
    "HosmerLemeshow",
    "LogisticRecalibration",
    "brier_score",
    "calibration_curve",
    "calibration_slope_intercept",
    "expected_calibration_error",
    "hoslem_groups",
    "hosmer_lemeshow",
    "r_quantile_type7",
    "validate_probabilities",
]

log = logging.getLogger(__name__)

#: Probabilities are clipped to [LOGIT_EPS, 1 - LOGIT_EPS] before the logit (a 0 or 1 has an infinite logit).
LOGIT_EPS = 1e-12


def validate_probabilities(
    y: Any, p: Any, *, source: str | None = None, field: str | None = "probability"
) -> tuple[np.ndarray, np.ndarray]:
    """Binary labels and finite probabilities in [0, 1] of the same length, or InputError naming the field."""
    yv = validate_binary_labels(y, source=source)
    pv = validate_scores(p, yv.size, source=source, field=field)
    if pv.min() < 0.0 or pv.max() > 1.0:
        raise InputError(
            f"predicted probabilities must lie in [0, 1]; found range [{pv.min():.4g}, {pv.max():.4g}]",
            source=source,
            field=field,
        )
    return yv, pv


def r_quantile_type7(x: np.ndarray, probs: np.ndarray) -> np.ndarray:
    """R's ``quantile(x, probs, type = 7)`` in R's own arithmetic (not numpy's lerp): breaks agree bitwise.

    index = 1 + (n - 1) * p, lo/hi = floor/ceiling(index), q = x[lo], replaced by
    ``(1 - h) * x[lo] + h * x[hi]`` (h = index - lo) only when index > lo and x[hi] != x[lo].
    """
    xs = np.sort(np.asarray(x, dtype=np.float64))
    n = xs.size
    index = 1.0 + max(n - 1, 0) * np.asarray(probs, dtype=np.float64)
    lo = np.floor(index).astype(np.int64)
    hi = np.ceil(index).astype(np.int64)
    qs = xs[lo - 1].copy()
    xhi = xs[hi - 1]
    interp = (index > lo) & (xhi != qs)
    h = (index - lo)[interp]
    qs[interp] = (1.0 - h) * qs[interp] + h * xhi[interp]
    return qs


def hoslem_groups(p: np.ndarray, g: int = 10) -> tuple[np.ndarray, np.ndarray]:
    """(breaks, group index per patient), as R's
    ``cut(p, unique(quantile(p, seq(0, 1, 1/g))), include.lowest = TRUE)``.

    Groups are right-closed intervals (b[i-1], b[i]], the first one closed on both sides. Some groups may be
    empty when predictions are tied (R keeps such levels).
    """
    if g < 2:
        raise InputError(f"the number of groups must be at least 2, got {g}", field="g")
    # R: seq(0, 1, by = 1/g) is from + (0:n) * by, capped at `to`.
    probs = np.minimum(np.arange(g + 1) * (1.0 / g), 1.0)
    breaks = np.unique(r_quantile_type7(p, probs))  # unique() of sorted breaks keeps their order
    if breaks.size < 2:
        raise InputError(
            "all predicted probabilities are identical: Hosmer–Lemeshow needs at least 2 groups",
            field="probability",
        )
    idx = np.searchsorted(breaks, p, side="left") - 1  # x in (b[i], b[i+1]] -> i
    idx[idx < 0] = 0  # include.lowest: x == b[0] belongs to the first interval
    return breaks, idx


@dataclass(frozen=True)
class HosmerLemeshow:
    """Result of :func:`hosmer_lemeshow`. statistic/p are NaN or inf where R's would be (see `note`)."""

    statistic: float
    df: int
    p_value: float
    groups: int  # non-empty groups (R's G)
    requested_groups: int
    breaks: list[float]
    observed: list[list[float]]  # per interval: [y0, y1] (empty intervals included, as R's xtabs)
    expected: list[list[float]]  # per interval: [sum(1 - p), sum(p)]
    empty_groups_dropped: bool = False
    note: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def hosmer_lemeshow(y: Any, p: Any, g: int = 10, *, drop_empty_groups: bool = False) -> HosmerLemeshow:
    """Hosmer–Lemeshow goodness-of-fit test as R's ``ResourceSelection::hoslem.test(y, p, g)`` (0.3-6).

    Grouping rule, step by step:

    1. breaks = ``unique(quantile(p, probs = seq(0, 1, 1/g)))`` with R's default type-7 quantiles; the 0 and 1
       probabilities are included, so the breaks span min(p)..max(p); duplicate breaks (ties) are dropped, so
       there may be fewer than g groups.
    2. groups = ``cut(p, breaks, include.lowest = TRUE)``: right-closed intervals (b[i-1], b[i]], the first
       one closed [b0, b1].
    3. per group the observed counts (y = 0, y = 1) and expected counts (sum(1 - p), sum(p));
       chi2 = sum over groups and BOTH outcome columns of (obs - exp)^2 / exp.
    4. df = G - 2 with G the number of non-empty groups (ResourceSelection >= 0.3-6; 0.3-5 used g - 2);
       p = 1 - pchisq(chi2, df). G < 2 is an error, as in R.

    Like R, an empty interval (possible with tied predictions) gives 0/0 and a NaN statistic, and a group
    whose expected count is 0 gives NaN or inf. With ``drop_empty_groups=True`` empty intervals are left out
    of the sum instead (R's df already ignores them); the result records it. With only 2 groups (df = 0) the
    p-value is NaN (R would print a degenerate 1 - pchisq(x, 0)).
    """
    yv, pv = validate_probabilities(y, p)
    breaks, idx = hoslem_groups(pv, g)
    k = breaks.size - 1
    n_in = np.bincount(idx, minlength=k).astype(np.float64)
    y1 = np.bincount(idx, weights=yv.astype(np.float64), minlength=k)
    e1 = np.bincount(idx, weights=pv, minlength=k)
    obs = np.column_stack([n_in - y1, y1])
    exp = np.column_stack([n_in - e1, e1])
    nonempty = n_in > 0
    n_groups = int(nonempty.sum())
    if n_groups < 2:
        raise InputError(
            "Hosmer–Lemeshow: the data gave fewer than 2 groups (negative df)", field="probability"
        )
    keep = nonempty if drop_empty_groups else np.ones(k, dtype=bool)
    with np.errstate(divide="ignore", invalid="ignore"):
        stat = float(np.sum((obs[keep] - exp[keep]) ** 2 / exp[keep]))
    df = n_groups - 2
    notes = []
    if n_groups < g:
        notes.append(f"the data allowed {n_groups} of the {g} requested groups (tied predictions)")
    if (~nonempty).any():
        notes.append(
            f"{int((~nonempty).sum())} empty interval(s) between tied predictions"
            + (" left out of the sum" if drop_empty_groups else " make the statistic NaN, as in R")
        )
    if df == 0:
        notes.append("only 2 groups: df = 0, no p-value")
    pval = float(chi2.sf(stat, df)) if df > 0 and np.isfinite(stat) else float("nan")
    if not np.isfinite(stat):
        notes.append("statistic is not finite: a group has an expected count of 0")
    return HosmerLemeshow(
        statistic=stat,
        df=df,
        p_value=pval,
        groups=n_groups,
        requested_groups=g,
        breaks=breaks.tolist(),
        observed=obs.tolist(),
        expected=exp.tolist(),
        empty_groups_dropped=bool(drop_empty_groups and (~nonempty).any()),
        note="; ".join(notes) or None,
    )


@dataclass(frozen=True)
class CalibrationBin:
    """One bin of the calibration curve: observed event rate (Wilson 95% CI) against mean predicted risk."""

    lower: float
    upper: float
    n: int
    events: int
    mean_predicted: float
    observed: float
    observed_ci_low: float
    observed_ci_high: float


def calibration_curve(y: Any, p: Any, n_bins: int = 10) -> list[CalibrationBin]:
    """Calibration-plot data on the Hosmer–Lemeshow risk groups (quantile bins), so plot and test agree.

    Empty intervals (tied predictions) are omitted. Observed CIs are Wilson intervals (statsmodels).
    """
    from statsmodels.stats.proportion import proportion_confint

    yv, pv = validate_probabilities(y, p)
    breaks, idx = hoslem_groups(pv, n_bins)
    k = breaks.size - 1
    n_in = np.bincount(idx, minlength=k)
    ev = np.bincount(idx, weights=yv.astype(np.float64), minlength=k).round().astype(np.int64)
    sp = np.bincount(idx, weights=pv, minlength=k)
    out = []
    for i in np.flatnonzero(n_in > 0):
        lo, hi = proportion_confint(int(ev[i]), int(n_in[i]), alpha=0.05, method="wilson")
        obs = float(ev[i] / n_in[i])
        lo, hi = min(float(lo), obs), max(float(hi), obs)  # Wilson gives 1 - 1e-16 for 9/9: keep obs inside
        out.append(
            CalibrationBin(
                lower=float(breaks[i]),
                upper=float(breaks[i + 1]),
                n=int(n_in[i]),
                events=int(ev[i]),
                mean_predicted=float(sp[i] / n_in[i]),
                observed=obs,
                observed_ci_low=lo,
                observed_ci_high=hi,
            )
        )
    return out


def expected_calibration_error(y: Any, p: Any, n_bins: int = 10) -> float:
    """ECE = sum_b (n_b / N) |observed_b - mean predicted_b| over the bins of :func:`calibration_curve`."""
    bins = calibration_curve(y, p, n_bins)
    total = sum(b.n for b in bins)
    return float(sum(b.n * abs(b.observed - b.mean_predicted) for b in bins) / total)


def brier_score(y: Any, p: Any) -> float:
    """Mean squared error of the predicted probability (scikit-learn's ``brier_score_loss``)."""
    yv, pv = validate_probabilities(y, p)
    return float(brier_score_loss(yv, pv))


@dataclass(frozen=True)
class LogisticRecalibration:
    """Calibration slope (ideal 1) and intercept / calibration-in-the-large (ideal 0), Wald 95% CIs.

    Values are None when the fit is not usable (non-convergence, perfect separation); `notes` says why.
    """

    slope: float | None
    slope_ci: tuple[float, float] | None
    intercept: float | None
    intercept_ci: tuple[float, float] | None
    n_clipped: int
    notes: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _glm(y: np.ndarray, exog: np.ndarray, offset: np.ndarray | None, what: str, notes: list[str]) -> Any:
    import statsmodels.api as sm
    from statsmodels.tools.sm_exceptions import ConvergenceWarning, PerfectSeparationWarning

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            res = sm.GLM(y, exog, family=sm.families.Binomial(), offset=offset).fit()
        except (np.linalg.LinAlgError, ValueError) as exc:
            notes.append(f"{what}: GLM failed ({exc})")
            return None
    bad = [w for w in caught if issubclass(w.category, PerfectSeparationWarning | ConvergenceWarning)]
    if bad or not res.converged:
        notes.append(f"{what}: not estimable ({'perfect separation' if bad else 'GLM did not converge'})")
        return None
    return res


def calibration_slope_intercept(y: Any, p: Any, alpha: float = 0.05) -> LogisticRecalibration:
    """Logistic recalibration on lp = logit(p) (statsmodels GLM, binomial):

    - slope: coefficient b of ``glm(y ~ lp)`` (R: ``glm(y ~ qlogis(p), binomial)``);
    - intercept: calibration-in-the-large, a of ``glm(y ~ 1, offset = lp)`` (slope fixed at 1).

    p of exactly 0 or 1 is clipped to [1e-12, 1 - 1e-12] first; the count is logged and recorded.
    """
    yv, pv = validate_probabilities(y, p)
    clipped = np.clip(pv, LOGIT_EPS, 1.0 - LOGIT_EPS)
    n_clipped = int(np.count_nonzero(clipped != pv))
    notes: list[str] = []
    if n_clipped:
        msg = (
            f"{n_clipped} probabilities of exactly 0 or 1 clipped to "
            f"[{LOGIT_EPS}, 1 - {LOGIT_EPS}] for the logit"
        )
        log.warning("calibration slope/intercept: %s", msg)
        notes.append(msg)
    lp = np.log(clipped) - np.log1p(-clipped)
    yf = yv.astype(np.float64)
    ones = np.ones_like(lp)
    slope_fit = _glm(yf, np.column_stack([ones, lp]), None, "slope", notes)
    int_fit = _glm(yf, ones[:, None], lp, "intercept", notes)

    def _ci(res: Any, i: int) -> tuple[float, float]:
        ci = np.asarray(res.conf_int(alpha=alpha))
        return float(ci[i, 0]), float(ci[i, 1])

    return LogisticRecalibration(
        slope=None if slope_fit is None else float(slope_fit.params[1]),
        slope_ci=None if slope_fit is None else _ci(slope_fit, 1),
        intercept=None if int_fit is None else float(int_fit.params[0]),
        intercept_ci=None if int_fit is None else _ci(int_fit, 0),
        n_clipped=n_clipped,
        notes=notes,
    )
