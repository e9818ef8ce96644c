"""Cut-off selection (Youden) and threshold metrics with stratified percentile-bootstrap CIs.

Why: the study fixes the cut-off on the training cohort and applies it unchanged to the validation cohorts;
re-optimising it per cohort would flatter the validation numbers. So the cut-off is a plain float that travels
between cohorts, and the bootstrap here resamples patients with the cut-off held fixed.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
from sklearn.metrics import roc_curve

from core.errors import InputError
from training.stats.delong import validate_binary_labels, validate_scores

__all__ = [
    "METRICS",
    "ThresholdMetrics",
    "YoudenCutoff",
    "confusion_metrics",
    "threshold_metrics",
    "youden_cutoff",
]

METRICS = ("accuracy", "sensitivity", "specificity", "ppv", "npv", "f1")


@dataclass(frozen=True)
class YoudenCutoff:
    """Cut-off maximising J = sensitivity + specificity - 1; test-positive when score >= cutoff."""

    cutoff: float
    youden_j: float
    sensitivity: float
    specificity: float
    rule: str = "youden; midpoint between adjacent observed scores; positive when score >= cutoff"


def _labels_scores(y: Any, score: Any, field: str) -> tuple[np.ndarray, np.ndarray]:
    yv = validate_binary_labels(y)
    sv = validate_scores(score, yv.size, field=field)
    if yv.min() == yv.max():
        raise InputError("both classes (0 and 1) must be present", field="label")
    return yv, sv


def youden_cutoff(y: Any, score: Any, *, field: str = "score") -> YoudenCutoff:
    """Youden-optimal cut-off on one (training) cohort.

    As pROC's ``coords(..., "best")`` the cut-off is the midpoint between the lowest score classed positive
    and the next lower observed score, so ">=" and ">" agree on this cohort and the value transfers to other
    cohorts without depending on an observed score. Ties in J go to the highest cut-off (the most specific).
    """
    yv, sv = _labels_scores(y, score, field)
    fpr, tpr, thr = roc_curve(yv, sv, drop_intermediate=False)  # thr[0] = inf (nobody positive)
    j = tpr - fpr
    # compare J exactly in integers (J * m * n = TP * n - FP * m): float rounding must not break ties
    m, n = int(yv.sum()), int(yv.size - yv.sum())
    key = np.rint(tpr * m).astype(np.int64) * n - np.rint(fpr * n).astype(np.int64) * m
    k = 1 + int(np.argmax(key[1:]))  # first maximum = highest cut-off among ties
    if k + 1 < thr.size:
        hi, lo = float(thr[k]), float(thr[k + 1])
        cut = (hi + lo) / 2.0
        if not lo < cut <= hi:  # adjacent floats: the midpoint rounds onto `lo`
            cut = hi
    else:
        cut = float(thr[k])
    return YoudenCutoff(
        cutoff=cut, youden_j=float(j[k]), sensitivity=float(tpr[k]), specificity=float(1.0 - fpr[k])
    )


def confusion_metrics(tp: Any, fp: Any, tn: Any, fn: Any) -> dict[str, np.ndarray]:
    """Accuracy, sensitivity, specificity, PPV, NPV, F1 from (arrays of) counts; NaN where undefined (0/0)."""
    tp, fp, tn, fn = (np.asarray(a, dtype=np.float64) for a in (tp, fp, tn, fn))
    with np.errstate(divide="ignore", invalid="ignore"):
        return {
            "accuracy": (tp + tn) / (tp + fp + tn + fn),
            "sensitivity": tp / (tp + fn),
            "specificity": tn / (tn + fp),
            "ppv": tp / (tp + fp),
            "npv": tn / (tn + fn),
            "f1": 2.0 * tp / (2.0 * tp + fp + fn),
        }


@dataclass(frozen=True)
class ThresholdMetrics:
    """Metrics at a fixed cut-off: point values, percentile-bootstrap CIs and the confusion counts."""

    cutoff: float
    tp: int
    fp: int
    tn: int
    fn: int
    values: dict[str, float]
    ci: dict[str, tuple[float, float]]
    n_valid: dict[str, int]  # bootstrap replicates where the metric was defined
    n_boot: int
    seed: int
    alpha: float
    method: str = "stratified percentile bootstrap (cases and controls resampled separately), cut-off fixed"

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def threshold_metrics(
    y: Any,
    score: Any,
    cutoff: float,
    *,
    n_boot: int = 1000,
    seed: int = 0,
    alpha: float = 0.05,
    field: str = "score",
) -> ThresholdMetrics:
    """Metrics of "score >= cutoff" with percentile bootstrap (1 - alpha) CIs.

    Resampling is stratified: each replicate draws the cases and the controls with replacement within
    their class, so every replicate has the cohort's prevalence and both classes. Vectorised over
    replicates: the only per-replicate work is a row sum of a boolean matrix. Replicates where a metric is
    0/0 (e.g. PPV with no test-positives) are left out of that metric's CI; `n_valid` records how many
    remained.
    """
    yv, sv = _labels_scores(y, score, field)
    if not np.isfinite(cutoff):
        raise InputError(f"cut-off must be finite, got {cutoff}", field="cutoff")
    if n_boot < 0:
        raise InputError(f"n_boot must be >= 0, got {n_boot}", field="n_boot")
    if not 0.0 < alpha < 1.0:
        raise InputError(f"alpha must be in (0, 1), got {alpha}", field="alpha")
    test_pos = sv >= cutoff
    pos_hit = test_pos[yv == 1]  # per case: classed positive?
    neg_hit = test_pos[yv == 0]  # per control: classed positive?
    m, n = pos_hit.size, neg_hit.size
    tp, fp = int(pos_hit.sum()), int(neg_hit.sum())
    point = {k: float(v) for k, v in confusion_metrics(tp, fp, n - fp, m - tp).items()}
    ci: dict[str, tuple[float, float]] = {}
    n_valid: dict[str, int] = {}
    if n_boot > 0:
        rng = np.random.default_rng(seed)
        tp_b = pos_hit[rng.integers(0, m, size=(n_boot, m))].sum(axis=1)
        fp_b = neg_hit[rng.integers(0, n, size=(n_boot, n))].sum(axis=1)
        boot = confusion_metrics(tp_b, fp_b, n - fp_b, m - tp_b)
        for k, vals in boot.items():
            ok = vals[np.isfinite(vals)]
            n_valid[k] = int(ok.size)
            if ok.size:
                lo, hi = np.quantile(ok, [alpha / 2.0, 1.0 - alpha / 2.0])
                ci[k] = (float(lo), float(hi))
            else:
                ci[k] = (float("nan"), float("nan"))
    return ThresholdMetrics(
        cutoff=float(cutoff),
        tp=tp,
        fp=fp,
        tn=n - fp,
        fn=m - tp,
        values=point,
        ci=ci,
        n_valid=n_valid,
        n_boot=n_boot,
        seed=seed,
        alpha=alpha,
    )
