"""DeLong's AUC variance, confidence intervals and paired tests (fast midrank algorithm of Sun & Xu, 2014).

Why this module: radiology papers report "AUC (95% CI, DeLong)" and "DeLong test P" between models. The
numbers must match what reviewers get from R's pROC, so the conventions here are pROC's:

- direction is fixed, never flipped: higher score = more likely a case (pROC's ``direction = "<"``,
  controls < cases). An AUC below 0.5 is reported as such, not silently mirrored.
- ties count one half (midranks), placements use the unbiased (n - 1) covariance, as in DeLong et al. 1988.
- the CI of one AUC is the normal interval ``auc ± z * sqrt(var)`` clipped to [0, 1] (pROC ``ci.auc``);
  the CI of a paired difference is the normal interval, not clipped (pROC ``roc.test``).

References: DeLong, DeLong & Clarke-Pearson (1988) Biometrics 44:837; Sun & Xu (2014) IEEE SPL 21:1389.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
from scipy.stats import norm, rankdata

from core.errors import InputError

__all__ = [
    "auc_ci",
    "auc_delong",
    "delong_covariance",
    "delong_paired",
    "pairwise_delong",
    "validate_binary_labels",
    "validate_scores",
]


def validate_binary_labels(y: Any, *, source: str | None = None, field: str | None = "label") -> np.ndarray:
    """Labels as an int array of 0/1, or InputError (a wrong label silently flips every statistic)."""
    arr = np.asarray(y)
    if arr.ndim != 1:
        raise InputError(f"labels must be one-dimensional, got shape {arr.shape}", source=source, field=field)
    if arr.size == 0:
        raise InputError("no rows", source=source, field=field)
    if arr.dtype == bool:
        return arr.astype(np.int64)
    try:
        num = arr.astype(np.float64)
    except (TypeError, ValueError) as exc:
        values = sorted({str(v) for v in arr.tolist()})[:5]
        raise InputError(
            f"labels must be binary 0/1 (1 = positive); found non-numeric values {values}",
            source=source,
            field=field,
        ) from exc
    if np.isnan(num).any():
        raise InputError(f"{int(np.isnan(num).sum())} missing label(s)", source=source, field=field)
    bad = ~np.isin(num, (0.0, 1.0))
    if bad.any():
        values = sorted({float(v) for v in num[bad]})[:5]
        raise InputError(f"labels must be binary 0/1; found {values}", source=source, field=field)
    return num.astype(np.int64)


def validate_scores(
    score: Any, n: int, *, source: str | None = None, field: str | None = "score"
) -> np.ndarray:
    """Return scores as float64 of length n, all finite, or raise InputError naming the field."""
    try:
        arr = np.asarray(score, dtype=np.float64)
    except (TypeError, ValueError) as exc:
        raise InputError("scores must be numeric", source=source, field=field) from exc
    if arr.ndim != 1:
        raise InputError(f"scores must be one-dimensional, got shape {arr.shape}", source=source, field=field)
    if arr.shape[0] != n:
        raise InputError(f"length {arr.shape[0]} differs from the {n} labels", source=source, field=field)
    finite = np.isfinite(arr)
    if not finite.all():
        raise InputError(
            f"{int((~finite).sum())} missing or non-finite score(s) (NaN/inf)", source=source, field=field
        )
    return arr


def _check_classes(y: np.ndarray, source: str | None, field: str | None) -> tuple[int, int]:
    m = int(y.sum())
    n = int(y.size - m)
    if m < 2 or n < 2:
        raise InputError(
            f"DeLong needs at least 2 positives and 2 negatives; got {m} positive(s), {n} negative(s)",
            source=source,
            field=field,
        )
    return m, n


def delong_covariance(
    y: Any,
    scores: Sequence[Any] | np.ndarray,
    *,
    source: str | None = None,
    names: Sequence[str] | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """AUCs [k] and their DeLong covariance matrix [k, k] for k scores of the same patients.

    Sun & Xu's algorithm: with midranks of the positives alone (T_x), the negatives alone (T_y) and the pooled
    sample (T_z), the placements are V10 = (T_z[pos] - T_x) / n and V01 = 1 - (T_z[neg] - T_y) / m, the AUC is
    mean(V10), and S = cov(V10) / m + cov(V01) / n. O(k N log N), exact with ties.
    """
    yv = validate_binary_labels(y, source=source)
    if isinstance(scores, np.ndarray):
        rows = [scores] if scores.ndim == 1 else list(scores)
    else:
        rows = list(scores)
    if len(rows) == 0:
        raise InputError("no score given", source=source, field="score")
    labels = list(names) if names is not None else [f"score[{i}]" for i in range(len(rows))]
    x = np.vstack([validate_scores(r, yv.size, source=source, field=lab) for r, lab in zip(rows, labels)])
    m, n = _check_classes(yv, source, "label")
    pos = yv == 1
    xp, xn = x[:, pos], x[:, ~pos]
    tx = rankdata(xp, axis=1)  # midranks ("average") handle ties as 1/2
    ty = rankdata(xn, axis=1)
    tz = rankdata(np.hstack([xp, xn]), axis=1)
    v10 = (tz[:, :m] - tx) / n
    v01 = 1.0 - (tz[:, m:] - ty) / m
    aucs = (tz[:, :m].sum(axis=1) / m - (m + 1) / 2.0) / n
    s10 = np.atleast_2d(np.cov(v10, ddof=1))
    s01 = np.atleast_2d(np.cov(v01, ddof=1))
    return aucs, s10 / m + s01 / n


def auc_delong(y: Any, score: Any, *, source: str | None = None, field: str = "score") -> tuple[float, float]:
    """(AUC, DeLong variance) of one score; higher score = positive."""
    aucs, cov = delong_covariance(y, [score], source=source, names=[field])
    return float(aucs[0]), float(cov[0, 0])


def _z(alpha: float) -> float:
    if not 0.0 < alpha < 1.0:
        raise InputError(f"alpha must be in (0, 1), got {alpha}", field="alpha")
    return float(norm.ppf(1.0 - alpha / 2.0))


def auc_ci(
    y: Any, score: Any, alpha: float = 0.05, *, source: str | None = None, field: str = "score"
) -> tuple[float, float, float]:
    """(AUC, lower, upper): the normal DeLong interval clipped to [0, 1], as pROC's ``ci.auc``."""
    auc, var = auc_delong(y, score, source=source, field=field)
    half = _z(alpha) * float(np.sqrt(var))
    return auc, max(0.0, auc - half), min(1.0, auc + half)


def _paired_from(auc1: float, auc2: float, v1: float, v2: float, c12: float, zq: float) -> dict[str, Any]:
    """Paired DeLong test from AUCs and covariances; z and p are None if the difference has no variance."""
    diff = auc1 - auc2
    var_diff = v1 + v2 - 2.0 * c12
    out: dict[str, Any] = {"auc1": auc1, "auc2": auc2, "diff": diff, "var_diff": var_diff, "cov": c12}
    if var_diff > 0.0:
        sd = float(np.sqrt(var_diff))
        z = diff / sd
        out.update(z=z, p=float(2.0 * norm.sf(abs(z))), ci_low=diff - zq * sd, ci_high=diff + zq * sd)
    else:  # identical or perfectly separating scores: the test is undefined (pROC gives NaN)
        out.update(z=None, p=None, ci_low=diff, ci_high=diff, note="variance of the difference is 0")
    return out


def delong_paired(
    y: Any,
    s1: Any,
    s2: Any,
    alpha: float = 0.05,
    *,
    source: str | None = None,
    names: tuple[str, str] = ("score1", "score2"),
) -> dict[str, Any]:
    """Two-sided paired DeLong test of AUC(s1) - AUC(s2) on the same patients (pROC ``roc.test``, paired).

    Returns auc1, auc2, diff, var_diff, cov, z, p, ci_low, ci_high (CI of the difference, not clipped).
    """
    zq = _z(alpha)
    aucs, cov = delong_covariance(y, [s1, s2], source=source, names=list(names))
    return _paired_from(
        float(aucs[0]), float(aucs[1]), float(cov[0, 0]), float(cov[1, 1]), float(cov[0, 1]), zq
    )


def pairwise_delong(
    y: Any, scores: Mapping[str, Any], alpha: float = 0.05, *, source: str | None = None
) -> tuple[dict[str, float], np.ndarray, list[dict[str, Any]]]:
    """AUCs, covariance matrix (in the order of `scores`) and the paired test for every pair (a before b)."""
    names = list(scores)
    zq = _z(alpha)
    aucs, cov = delong_covariance(y, [scores[k] for k in names], source=source, names=names)
    tests = []
    for i in range(len(names)):
        for j in range(i + 1, len(names)):
            res = _paired_from(
                float(aucs[i]), float(aucs[j]), float(cov[i, i]), float(cov[j, j]), float(cov[i, j]), zq
            )
            tests.append({"a": names[i], "b": names[j], **res})
    return dict(zip(names, map(float, aucs))), cov, tests
