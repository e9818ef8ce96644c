"""All study statistics for a set of scores on one or more cohorts, as one JSON-serialisable dict.

`evaluate_models` is the per-cohort core the study calls with cut-offs fixed on the training cohort;
`evaluate_table` validates a prediction table (the `pdl1 evaluate` CLI) and loops over its cohorts.
Undefined numbers are None (never NaN), and every skipped or degraded statistic carries a note.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import pandas as pd
from scipy.stats import norm

from core.errors import InputError
from training.stats.calibration import (
    brier_score,
    calibration_curve,
    calibration_slope_intercept,
    hosmer_lemeshow,
)
from training.stats.decision_curve import decision_curve
from training.stats.delong import pairwise_delong, validate_binary_labels, validate_scores
from training.stats.thresholds import threshold_metrics, youden_cutoff

__all__ = ["evaluate_models", "evaluate_table", "json_safe"]

log = logging.getLogger(__name__)


def json_safe(obj: Any) -> Any:
    """Recursively convert numpy scalars/arrays and tuples to plain Python, NaN/inf to None."""
    if isinstance(obj, Mapping):
        return {str(k): json_safe(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple | np.ndarray):
        return [json_safe(v) for v in (obj.tolist() if isinstance(obj, np.ndarray) else obj)]
    if isinstance(obj, bool | np.bool_):
        return bool(obj)
    if isinstance(obj, int | np.integer):
        return int(obj)
    if isinstance(obj, float | np.floating):
        f = float(obj)
        return f if math.isfinite(f) else None
    return obj


def _calibration(y: np.ndarray, p: np.ndarray, name: str, groups: int, notes: list[str]) -> dict[str, Any]:
    out: dict[str, Any] = {"hosmer_lemeshow": None, "ece": None, "curve": None}
    try:
        hl = hosmer_lemeshow(y, p, g=groups)
        if not math.isfinite(hl.statistic) and any(sum(o) == 0 for o in hl.observed):
            msg = (
                f"{name}: Hosmer–Lemeshow as in R is NaN (empty interval between tied predictions); "
                "reported with the empty intervals left out"
            )
            log.warning(msg)
            notes.append(msg)
            hl = hosmer_lemeshow(y, p, g=groups, drop_empty_groups=True)
        curve = calibration_curve(y, p, groups)
    except InputError as exc:  # e.g. constant predictions: no risk groups
        notes.append(f"{name}: Hosmer–Lemeshow and calibration curve not computed ({exc.problem})")
    else:
        total = sum(b.n for b in curve)
        out["hosmer_lemeshow"] = {
            **hl.to_dict(),
            "rule": "R ResourceSelection::hoslem.test: type-7 quantile breaks, unique, "
            "cut(include.lowest=TRUE), right-closed; df = non-empty groups - 2",
        }
        out["ece"] = sum(b.n * abs(b.observed - b.mean_predicted) for b in curve) / total
        out["curve"] = [vars(b) for b in curve]
    recal = calibration_slope_intercept(y, p)
    notes.extend(f"{name}: {n}" for n in recal.notes)
    out.update(
        brier=brier_score(y, p),
        slope=recal.slope,
        slope_ci=recal.slope_ci,
        intercept=recal.intercept,
        intercept_ci=recal.intercept_ci,
        n_clipped_for_logit=recal.n_clipped,
    )
    return out


def evaluate_models(
    y: Any,
    scores: Mapping[str, Any],
    *,
    cutoffs: Mapping[str, float] | None = None,
    cutoff_source: str | None = None,
    n_boot: int = 1000,
    seed: int = 0,
    alpha: float = 0.05,
    hl_groups: int = 10,
    dca_thresholds: Sequence[float] | None = None,
    source: str | None = None,
) -> dict[str, Any]:
    """Statistics of every score on one cohort (higher score = positive).

    - AUC with DeLong variance and (1 - alpha) CI; DeLong covariance matrix; paired DeLong test for each pair.
    - Threshold metrics at `cutoffs[name]` (e.g. Youden on the training cohort; `cutoff_source` says where
      it came from) or, when `cutoffs` is None, at the Youden cut-off of this cohort; stratified bootstrap
      CIs with the same seed for every score, so replicates are paired across models.
    - For scores within [0, 1]: calibration (Hosmer–Lemeshow, Brier, slope, intercept, ECE, curve bins) and
      the decision curve; other scores get a note instead.
    """
    if not scores:
        raise InputError("no score columns given", source=source, field="score_cols")
    yv = validate_binary_labels(y, source=source)
    sv = {name: validate_scores(s, yv.size, source=source, field=name) for name, s in scores.items()}
    aucs, cov, pairs = pairwise_delong(yv, sv, alpha=alpha, source=source)
    models: dict[str, Any] = {}
    for i, (name, s) in enumerate(sv.items()):
        notes: list[str] = []
        var = float(cov[i, i])
        half = float(norm.ppf(1.0 - alpha / 2.0)) * math.sqrt(max(var, 0.0))
        auc = aucs[name]
        if cutoffs is None:
            yc = youden_cutoff(yv, s, field=name)
            cut, cut_from = yc.cutoff, "youden on this cohort"
        else:
            if name not in cutoffs:
                raise InputError(f"no cut-off given for score {name!r}", source=source, field="cutoffs")
            cut, cut_from = float(cutoffs[name]), cutoff_source or "given"
        tm = threshold_metrics(yv, s, cut, n_boot=n_boot, seed=seed, alpha=alpha, field=name)
        entry: dict[str, Any] = {
            "auc": auc,
            "auc_ci": [max(0.0, auc - half), min(1.0, auc + half)],
            "auc_var": var,
            "auc_se": math.sqrt(max(var, 0.0)),
            "threshold": {
                "cutoff": cut,
                "cutoff_from": cut_from,
                "rule": "positive when score >= cutoff",
                "tp": tm.tp,
                "fp": tm.fp,
                "tn": tm.tn,
                "fn": tm.fn,
                "metrics": {
                    k: {"value": v, "ci": tm.ci.get(k), "n_valid_boot": tm.n_valid.get(k)}
                    for k, v in tm.values.items()
                },
                "bootstrap": {"n_boot": n_boot, "seed": seed, "method": tm.method},
            },
            "calibration": None,
            "decision_curve": None,
        }
        if s.min() < 0.0 or s.max() > 1.0:
            notes.append(
                f"{name}: scores outside [0, 1] are not probabilities; calibration and decision curve skipped"
            )
        else:
            entry["calibration"] = _calibration(yv, s, name, hl_groups, notes)
            entry["decision_curve"] = decision_curve(yv, s, dca_thresholds).to_dict()
        entry["notes"] = notes
        models[name] = entry
    names = list(sv)
    return json_safe(
        {
            "n": int(yv.size),
            "events": int(yv.sum()),
            "prevalence": float(yv.mean()),
            "models": models,
            "pairwise_delong": pairs,
            "auc_covariance": {"order": names, "matrix": cov},
        }
    )


def _column(df: pd.DataFrame, col: str, source: str | None) -> pd.Series:
    if col not in df.columns:
        raise InputError(
            f"column not found; available columns: {', '.join(map(str, df.columns))}",
            source=source,
            field=col,
        )
    return df[col]


def _numeric_scores(series: pd.Series, col: str, source: str | None) -> np.ndarray:
    values = pd.to_numeric(series, errors="coerce").to_numpy(dtype=np.float64)
    bad = ~np.isfinite(values)
    if bad.any():
        rows = np.flatnonzero(bad)[:5].tolist()
        raise InputError(
            f"{int(bad.sum())} missing, non-numeric or infinite score(s) (0-based rows {rows})",
            source=source,
            field=col,
        )
    return values


def evaluate_table(
    df: pd.DataFrame,
    *,
    label_col: str,
    score_cols: Sequence[str],
    cohort_col: str | None = None,
    threshold_cohort: str | None = None,
    source: str | None = None,
    n_boot: int = 1000,
    seed: int = 0,
    alpha: float = 0.05,
) -> dict[str, Any]:
    """Evaluate a prediction table per cohort ("all" when there is no cohort column).

    Cut-offs: Youden on `threshold_cohort` applied to every cohort when given, else each cohort's own Youden
    cut-off (reported in each model's ``threshold.cutoff_from``).
    """
    score_cols = list(score_cols)
    if not score_cols:
        raise InputError("no score columns given", source=source, field="score_cols")
    if len(set(score_cols)) != len(score_cols):
        raise InputError(f"duplicate score columns in {score_cols}", source=source, field="score_cols")
    y_all = validate_binary_labels(_column(df, label_col, source).to_numpy(), source=source, field=label_col)
    s_all = {c: _numeric_scores(_column(df, c, source), c, source) for c in score_cols}
    if cohort_col is None:
        if threshold_cohort is not None:
            raise InputError(
                "a threshold cohort needs a cohort column", source=source, field="threshold_cohort"
            )
        groups = {"all": np.ones(y_all.size, dtype=bool)}
    else:
        cohorts = _column(df, cohort_col, source)
        if cohorts.isna().any():
            raise InputError(
                f"{int(cohorts.isna().sum())} row(s) without a cohort", source=source, field=cohort_col
            )
        labels = cohorts.astype(str).to_numpy()
        groups = {str(c): labels == c for c in pd.unique(labels)}
    cutoffs = None
    cutoff_source = None
    if threshold_cohort is not None:
        if threshold_cohort not in groups:
            raise InputError(
                f"threshold cohort {threshold_cohort!r} not found; cohorts: {', '.join(groups)}",
                source=source,
                field=cohort_col,
            )
        sel = groups[threshold_cohort]
        cutoffs = {c: youden_cutoff(y_all[sel], s[sel], field=c).cutoff for c, s in s_all.items()}
        cutoff_source = f"youden on cohort {threshold_cohort!r}"
    results = {}
    for name, sel in groups.items():
        where = source if cohort_col is None else f"{source or 'table'} (cohort {name!r})"
        results[name] = evaluate_models(
            y_all[sel],
            {c: s[sel] for c, s in s_all.items()},
            cutoffs=cutoffs,
            cutoff_source=cutoff_source,
            n_boot=n_boot,
            seed=seed,
            alpha=alpha,
            source=where,
        )
    return json_safe(
        {
            "source": source,
            "label_col": label_col,
            "score_cols": score_cols,
            "cohort_col": cohort_col,
            "threshold_cohort": threshold_cohort,
            "settings": {
                "alpha": alpha,
                "n_boot": n_boot,
                "seed": seed,
                "auc": "DeLong (Sun & Xu midranks); higher score = positive; CI clipped to [0, 1] as pROC",
                "decision_curve": "thresholds 0.01..0.99 step 0.01; positive when risk >= threshold",
            },
            "cutoffs": cutoffs,
            "cohorts": results,
        }
    )
