"""Decision-curve analysis (Vickers & Elkin, 2006): net benefit of a risk model across risk thresholds.

Convention (same as the ``dcurves`` package and R's ``dcurves``/``rmda``): a patient is test-positive when the
predicted risk is >= the threshold t, and

    NB(t) = TP/n - FP/n * t / (1 - t)
    treat-all: prevalence - (1 - prevalence) * t / (1 - t);  treat-none: 0.

Counts come from sorted scores and ``searchsorted`` (O(n log n + T log n)), so 99 thresholds cost nothing.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

from core.errors import InputError
from training.stats.calibration import validate_probabilities
from training.stats.delong import validate_binary_labels

__all__ = ["DEFAULT_THRESHOLDS", "DecisionCurve", "decision_curve", "net_benefit", "treat_all_net_benefit"]

#: 0.01, 0.02, ..., 0.99, each exactly i / 100 (as ``[i / 100 for i in range(1, 100)]``).
DEFAULT_THRESHOLDS: np.ndarray = np.arange(1, 100) / 100.0


def _thresholds(thresholds: Any) -> np.ndarray:
    t = DEFAULT_THRESHOLDS if thresholds is None else np.asarray(thresholds, dtype=np.float64).ravel()
    if t.size == 0 or not np.all(np.isfinite(t)) or t.min() <= 0.0 or t.max() >= 1.0:
        raise InputError(
            "decision-curve thresholds must be finite and strictly between 0 and 1", field="thresholds"
        )
    return t


def net_benefit(y: Any, p: Any, thresholds: Any = None) -> np.ndarray:
    """Net benefit of treating patients with risk >= t, for each threshold t."""
    yv, pv = validate_probabilities(y, p)
    t = _thresholds(thresholds)
    n = yv.size
    pos = np.sort(pv[yv == 1])
    neg = np.sort(pv[yv == 0])
    tp = pos.size - np.searchsorted(pos, t, side="left")  # count of positives with p >= t
    fp = neg.size - np.searchsorted(neg, t, side="left")
    return tp / n - fp / n * (t / (1.0 - t))


def treat_all_net_benefit(y: Any, thresholds: Any = None) -> np.ndarray:
    """Net benefit of treating everyone: prevalence - (1 - prevalence) * t / (1 - t)."""
    yv = validate_binary_labels(y)
    t = _thresholds(thresholds)
    prevalence = float(np.mean(yv == 1))
    return prevalence - (1.0 - prevalence) * (t / (1.0 - t))


@dataclass(frozen=True)
class DecisionCurve:
    """Net benefit of the model, treat-all and treat-none on a common threshold grid."""

    thresholds: list[float]
    net_benefit: list[float]
    treat_all: list[float]
    treat_none: list[float]
    n: int
    prevalence: float
    rule: str = "test-positive when risk >= threshold"

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def decision_curve(y: Any, p: Any, thresholds: Any = None) -> DecisionCurve:
    """Decision curve of one model (default grid 0.01..0.99 in steps of 0.01)."""
    yv, pv = validate_probabilities(y, p)
    t = _thresholds(thresholds)
    nb = net_benefit(yv, pv, t)
    return DecisionCurve(
        thresholds=t.tolist(),
        net_benefit=nb.tolist(),
        treat_all=treat_all_net_benefit(yv, t).tolist(),
        treat_none=[0.0] * t.size,
        n=int(yv.size),
        prevalence=float(yv.mean()),
    )
