"""Fusion model: logistic regression on the deep-learning signature score plus the clinical predictors.

The DFSigM probability enters as its logit (``score_transform="logit"``, default; clipped to [1e-6, 1-1e-6]):
on the log-odds scale a calibrated score is linear in the outcome's log-odds (for an LR head it IS the
head's linear predictor), so one coefficient suffices and its OR reads "per unit of DL log-odds".
``"identity"`` uses the probability itself (OR per 1.0 of probability). A missing score is an error, not
imputed: the imaging score is the point of the model. Clinical variables follow the clinical model's
rules (training median/mode, optional indicators, unseen levels -> mode, all fitted on training only).

Training-cohort scores: in-sample DFSigM predictions are optimistic, which inflates the DL coefficient.
Fit the fusion on out-of-fold training scores (:func:`training.models.out_of_fold_scores`) where possible;
validation cohorts always get the final DFSigM's scores.

:func:`nomogram` turns any fitted :class:`~training.clinical.LogisticModel` into points per variable
(Harrell's construction) for the nomogram figure.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd
from scipy.special import expit, logit

from core.errors import InputError
from training.clinical import (
    CONST,
    LogisticModel,
    TabularDesign,
    _check_y,
    _logit,
    _term_rows,
    _variable_pvalues,
)

logger = logging.getLogger(__name__)

EPS = 1e-6


@dataclass
class FusionModel(LogisticModel):
    """``predict_proba(df_with_score) -> [N]``; ``df`` needs ``score_col`` and the clinical predictors."""

    score_col: str = "score_dfsig"
    score_transform: str = "logit"
    score_term: str = "DL score"

    def _prepare(self, df: pd.DataFrame, source: str | None) -> pd.DataFrame:
        return _with_score_term(df, self.score_col, self.score_transform, self.score_term, source)


def _with_score_term(
    df: pd.DataFrame, col: str, transform: str, term: str, source: str | None
) -> pd.DataFrame:
    if col not in df.columns:
        raise InputError("signature score column missing", source=source, field=col)
    score = pd.to_numeric(df[col], errors="coerce").to_numpy(dtype=float)
    if not np.all(np.isfinite(score)):
        raise InputError(
            "signature score missing or not numeric (it is never imputed)", source=source, field=col
        )
    if transform == "logit":
        if np.any((score < 0) | (score > 1)):
            raise InputError(
                "signature score must be a probability in [0, 1] for the logit", source=source, field=col
            )
        clipped = np.clip(score, EPS, 1 - EPS)
        if np.any(clipped != score):
            logger.info(
                "fusion: %d score(s) clipped to [%g, 1-%g] before the logit",
                int(np.sum(clipped != score)),
                EPS,
                EPS,
            )
        value = logit(clipped)
    elif transform == "identity":
        value = score
    else:
        raise InputError(
            f"score_transform must be 'logit' or 'identity', got {transform!r}", field="score_transform"
        )
    return df.assign(**{term: value})


@dataclass
class FusionResult:
    table: pd.DataFrame
    model: FusionModel
    notes: list[str] = field(default_factory=list)


def fit_fusion(
    df: pd.DataFrame,
    y: Any,
    *,
    clinical_predictors: list[str],
    score_col: str = "score_dfsig",
    score_transform: str = "logit",
    score_term: str = "DL score",
    categorical: list[str] | tuple[str, ...] = (),
    missing_indicator: bool = False,
    source: str | None = None,
) -> FusionResult:
    """Fit ``logit P = b0 + b_score * score + sum b_j * clinical_j`` on the TRAINING cohort (statsmodels)."""
    df = df.reset_index(drop=True)
    y = _check_y(y, len(df))
    if score_term in clinical_predictors:
        raise InputError(f"clinical predictor named like the score term {score_term!r}", field=score_term)
    prepared = _with_score_term(df, score_col, score_transform, score_term, source)
    variables = [score_term, *clinical_predictors]
    design = TabularDesign.fit(
        prepared, variables, categorical=categorical, missing_indicator=missing_indicator, source=source
    )
    X = design.transform(prepared, source=source)
    fit = _logit(y, X)
    var_p = _variable_pvalues(y, X, fit, design, variables)
    table = pd.DataFrame(_term_rows(fit, design, var_p, len(y)))
    model = FusionModel(
        design=design,
        params=fit.params,
        cov=fit.cov,
        predictors=variables,
        n_train=len(y),
        notes=[fit.note] if fit.note else [],
        score_col=score_col,
        score_transform=score_transform,
        score_term=score_term,
    )
    return FusionResult(table=table, model=model, notes=list(model.notes))


# ------------------------------------------------------------------------------------------- nomogram


@dataclass
class Nomogram:
    """Points per variable value; total points map linearly onto the linear predictor.

    Each variable's contribution ``b * x`` is shifted so its smallest value over the training range scores 0;
    the variable with the widest contribution range spans ``max_points``. Hence
    ``lp = lp_at_zero + total_points / points_per_lp`` and ``P = sigmoid(lp)``.
    """

    variables: list[dict]
    lp_at_zero: float
    points_per_lp: float
    max_points: float = 100.0

    def probability(self, total_points: np.ndarray | float) -> np.ndarray:
        return expit(self.lp_at_zero + np.asarray(total_points, dtype=float) / self.points_per_lp)

    def points_scale(self, n: int = 11) -> dict:
        """Total-points axis with the probability under each tick (for drawing)."""
        top = self.max_points * len(self.variables)
        ticks = np.linspace(0, top, n)
        return {"total_points": ticks.tolist(), "probability": self.probability(ticks).tolist()}

    def to_dict(self) -> dict:
        return {
            "variables": self.variables,
            "lp_at_zero": self.lp_at_zero,
            "points_per_lp": self.points_per_lp,
            "max_points": self.max_points,
            **self.points_scale(),
        }


def nomogram(model: LogisticModel, *, max_points: float = 100.0, n_ticks: int = 5) -> Nomogram:
    """Harrell-style nomogram of a fitted logistic model (clinical or fusion); training-cohort ranges."""
    design = model.design
    entries: list[tuple[str, str, list[float], list[str], np.ndarray]] = []
    for var in model.predictors:
        cols = design.columns_of([var])
        level_cols = [c for c in cols if c != f"{var}__missing"]
        if design.kinds[var] == "continuous":
            lo, hi = design.ranges[var]
            values = np.linspace(lo, hi, n_ticks)
            contrib = float(model.params[var]) * values
            entries.append((var, "continuous", values.tolist(), [f"{v:.4g}" for v in values], contrib))
        else:
            levels = design.levels[var]
            contrib = np.array([0.0] + [float(model.params[c]) for c in level_cols])
            entries.append((var, "categorical", list(range(len(levels))), list(levels), contrib))
        if f"{var}__missing" in cols:
            beta = float(model.params[f"{var}__missing"])
            entries.append((f"{var} missing", "indicator", [0, 1], ["no", "yes"], np.array([0.0, beta])))
    spans = [float(c.max() - c.min()) for *_, c in entries]
    widest = max(spans) if spans and max(spans) > 0 else 1.0
    points_per_lp = max_points / widest
    lp_at_zero = float(model.params[CONST]) + sum(float(c.min()) for *_, c in entries)
    variables = [
        {
            "name": name,
            "kind": kind,
            "values": values,
            "labels": labels,
            "coef_contribution": c.tolist(),
            "points": ((c - c.min()) * points_per_lp).tolist(),
        }
        for name, kind, values, labels, c in entries
    ]
    return Nomogram(
        variables=variables, lp_at_zero=lp_at_zero, points_per_lp=points_per_lp, max_points=max_points
    )
