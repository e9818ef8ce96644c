"""Feature selection as scikit-learn transformers, so that it is fitted on the training cohort only.

The study's chain is ``[ICC] -> z-score -> Mann-Whitney U -> Spearman redundancy -> LASSO (<= k)``. Every
step is an estimator that learns from ``fit`` data alone and only *indexes columns* in ``transform``;
putting the chain in a :class:`~sklearn.pipeline.Pipeline` therefore makes leakage-free cross-validation
and cohort-wise validation the default. Fallbacks (nothing passes a filter, LASSO keeps too few/many) are
warned, logged and recorded in ``fallback_`` so a run's report can say what happened.

ICC design: the reproducibility filter needs a *second* measurement of every feature (a repeat
segmentation), which scikit-learn's ``fit(X, y)`` has no slot for. :class:`ICCFilter` takes it as the
sample-aligned fit parameter ``X_repeat`` (requested by default for metadata routing), so it is split
together with ``X`` by any cross-validation splitter: ``pipeline.fit(X, y, icc__X_repeat=X2)`` works with
routing off, ``pipeline.fit(X, y, X_repeat=X2)`` with routing on. The filter sits *first*, on raw features:
ICC is invariant to one affine map applied to both measurements, so it equals the ICC of the z-scored
features while needing no scaler for the repeat.
"""

from __future__ import annotations

import logging
import math
import warnings
from collections.abc import Mapping
from dataclasses import dataclass, fields
from numbers import Integral, Real
from typing import Any

import numpy as np
from scipy import stats
from sklearn.base import BaseEstimator, _fit_context
from sklearn.exceptions import ConvergenceWarning
from sklearn.feature_selection import SelectorMixin
from sklearn.linear_model import LogisticRegression, LogisticRegressionCV
from sklearn.model_selection import StratifiedKFold
from sklearn.pipeline import Pipeline
from sklearn.preprocessing import StandardScaler
from sklearn.svm import l1_min_c
from sklearn.utils import ClassifierTags
from sklearn.utils._param_validation import Interval, StrOptions
from sklearn.utils.multiclass import type_of_target
from sklearn.utils.validation import check_array, check_is_fitted, validate_data

from core.errors import InputError

logger = logging.getLogger(__name__)

ICC_KINDS = ("ICC(1,1)", "ICC(2,1)", "ICC(3,1)")


def _warn(message: str) -> None:
    """Fallbacks are never silent: warn the caller and leave a trace in the run log."""
    logger.warning(message)
    warnings.warn(message, UserWarning, stacklevel=3)


def _binary_target(y: np.ndarray, who: str) -> tuple[np.ndarray, np.ndarray]:
    """The classes and a boolean 'is positive' (= second sorted class) vector; only two classes make sense."""
    kind = type_of_target(y, input_name="y", raise_unknown=True)
    if kind != "binary":
        raise ValueError(f"{who} needs a binary outcome (two classes), got y of type {kind!r}.")
    classes = np.unique(y)
    if classes.size != 2:
        raise ValueError(f"{who} needs two classes in y, got {classes.size} class (n_samples={y.size}).")
    return classes, y == classes[1]


def column_auc(X: np.ndarray, positive: np.ndarray) -> np.ndarray:
    """Per-column AUC of the raw feature as a score for the positive class (ties count one half)."""
    ranks = stats.rankdata(X, axis=0)
    n1 = int(positive.sum())
    n0 = positive.size - n1
    u1 = ranks[positive].sum(axis=0) - n1 * (n1 + 1) / 2.0
    return u1 / (n1 * n0)


def _binary_supervised_tags(tags):
    """Tags of a selector that needs a binary y: y required, and `multi_class=False` so that scikit-learn's
    estimator checks feed it two classes (ClassifierTags is the only place that fact can be stated)."""
    tags.target_tags.required = True
    tags.classifier_tags = ClassifierTags(multi_class=False)
    return tags


# --------------------------------------------------------------------------------------------- ICC


def icc(*measurements: np.ndarray, kind: str = "ICC(2,1)") -> np.ndarray:
    """Intraclass correlation per column between k >= 2 measurements of the same n subjects.

    Shrout & Fleiss (1979) single-measure forms from the two-way ANOVA mean squares:
    ICC(1,1) one-way random; ICC(2,1) two-way random, absolute agreement (the usual radiomics choice:
    a systematic offset between segmentations lowers it); ICC(3,1) two-way mixed, consistency.
    A column that is constant over everything gives NaN (0/0): it carries no information to reproduce.
    """
    if kind not in ICC_KINDS:
        raise ValueError(f"kind must be one of {ICC_KINDS}, got {kind!r}.")
    if len(measurements) < 2:
        raise ValueError("icc needs at least two measurements (arrays of shape [n_subjects, n_features]).")
    arrays = [np.asarray(m, dtype=np.float64) for m in measurements]
    arrays = [a[:, None] if a.ndim == 1 else a for a in arrays]
    if any(a.shape != arrays[0].shape or a.ndim != 2 for a in arrays):
        shapes = [a.shape for a in arrays]
        raise ValueError(f"icc needs equally shaped 2-D arrays [n_subjects, n_features], got {shapes}.")
    ratings = np.stack(arrays, axis=1)  # [n, k, p]
    n, k = ratings.shape[:2]
    if n < 2:
        raise ValueError(f"icc needs at least 2 subjects, got {n} sample(s).")
    grand = ratings.mean(axis=(0, 1))
    ss_rows = k * ((ratings.mean(axis=1) - grand) ** 2).sum(axis=0)
    ss_cols = n * ((ratings.mean(axis=0) - grand) ** 2).sum(axis=0)
    ss_total = ((ratings - grand) ** 2).sum(axis=(0, 1))
    ss_err = np.maximum(ss_total - ss_rows - ss_cols, 0.0)
    ms_rows = ss_rows / (n - 1)
    ms_cols = ss_cols / (k - 1)
    ms_err = ss_err / ((n - 1) * (k - 1))
    with np.errstate(divide="ignore", invalid="ignore"):
        if kind == "ICC(1,1)":
            ms_within = (ss_cols + ss_err) / (n * (k - 1))
            return (ms_rows - ms_within) / (ms_rows + (k - 1) * ms_within)
        if kind == "ICC(2,1)":
            return (ms_rows - ms_err) / (ms_rows + (k - 1) * ms_err + k * (ms_cols - ms_err) / n)
        return (ms_rows - ms_err) / (ms_rows + (k - 1) * ms_err)


class ICCFilter(SelectorMixin, BaseEstimator):
    """Keep features whose ICC between two segmentations is >= ``threshold`` (default ICC(2,1)).

    ``fit(X, y=None, X_repeat=...)``: ``X_repeat`` holds the same features extracted from the repeat
    segmentation, row-aligned with ``X``. It is required: a reproducibility filter without a repeat has
    nothing to measure, so it raises instead of keeping everything. If no feature reaches the threshold the
    ``fallback_k`` most reproducible ones are kept, with a warning.
    """

    __metadata_request__fit = {"X_repeat": True}

    _parameter_constraints: dict = {
        "threshold": [Interval(Real, -1, 1, closed="both")],
        "kind": [StrOptions(set(ICC_KINDS))],
        "fallback_k": [Interval(Integral, 1, None, closed="left")],
    }

    def __init__(self, threshold: float = 0.75, *, kind: str = "ICC(2,1)", fallback_k: int = 12) -> None:
        self.threshold = threshold
        self.kind = kind
        self.fallback_k = fallback_k

    @_fit_context(prefer_skip_nested_validation=True)
    def fit(self, X, y=None, X_repeat=None):
        X = validate_data(self, X, reset=True, dtype=np.float64)
        if X_repeat is None:
            raise ValueError(
                "ICCFilter.fit needs X_repeat (features of the repeat segmentation, row-aligned with X); "
                "in a Pipeline pass fit(..., icc__X_repeat=X2), or leave the ICC step out."
            )
        X_repeat = check_array(X_repeat, dtype=np.float64, input_name="X_repeat")
        if X_repeat.shape != X.shape:
            raise ValueError(f"X_repeat has shape {X_repeat.shape}, X has {X.shape}: they must match.")
        self.icc_ = icc(X, X_repeat, kind=self.kind)
        mask = np.nan_to_num(self.icc_, nan=-np.inf) >= self.threshold
        self.fallback_ = None
        if not mask.any():
            k = min(self.fallback_k, X.shape[1])
            order = np.argsort(-np.nan_to_num(self.icc_, nan=-np.inf), kind="stable")[:k]
            mask[order] = True
            self.fallback_ = f"no feature had {self.kind} >= {self.threshold}; kept the {k} most reproducible"
            _warn(f"ICCFilter: {self.fallback_}.")
        self.support_ = mask
        return self

    def _get_support_mask(self) -> np.ndarray:
        check_is_fitted(self, "support_")
        return self.support_

    def __sklearn_tags__(self):
        tags = super().__sklearn_tags__()
        tags.input_tags.allow_nan = False
        return tags


# --------------------------------------------------------------------------------------- Mann-Whitney


class MannWhitneySelector(SelectorMixin, BaseEstimator):
    """Univariate two-sided Mann-Whitney U filter: keep features with (adjusted) p < ``alpha``.

    ``correction`` is None/"none" or "fdr_bh" (Benjamini-Hochberg over all input features). When nothing
    passes (pure noise, or a tiny cohort) the ``fallback_k`` features with the smallest p are kept and a
    warning says so; returning zero features would only move the failure downstream.
    Learned: ``pvalues_`` (raw), ``pvalues_adjusted_``, ``scores_`` (U of the positive class), ``auc_``.
    """

    _parameter_constraints: dict = {
        "alpha": [Interval(Real, 0, 1, closed="right")],
        "correction": [None, StrOptions({"none", "fdr_bh"})],
        "fallback_k": [Interval(Integral, 1, None, closed="left")],
        "method": [StrOptions({"auto", "asymptotic", "exact"})],
    }

    def __init__(
        self,
        alpha: float = 0.05,
        *,
        correction: str | None = None,
        fallback_k: int = 12,
        method: str = "auto",
    ) -> None:
        self.alpha = alpha
        self.correction = correction
        self.fallback_k = fallback_k
        self.method = method

    @_fit_context(prefer_skip_nested_validation=True)
    def fit(self, X, y):
        X, y = validate_data(self, X, y, reset=True, dtype=np.float64)
        self.classes_, positive = _binary_target(y, type(self).__name__)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)  # constant columns -> NaN p, handled below
            res = stats.mannwhitneyu(X[positive], X[~positive], axis=0, method=self.method)
        self.scores_ = np.asarray(res.statistic, dtype=np.float64)
        self.pvalues_ = np.nan_to_num(np.asarray(res.pvalue, dtype=np.float64), nan=1.0)
        self.auc_ = self.scores_ / (positive.sum() * (~positive).sum())
        if self.correction == "fdr_bh":
            self.pvalues_adjusted_ = stats.false_discovery_control(self.pvalues_, method="bh")
        else:
            self.pvalues_adjusted_ = self.pvalues_.copy()
        mask = self.pvalues_adjusted_ < self.alpha
        self.fallback_ = None
        if not mask.any():
            k = min(self.fallback_k, X.shape[1])
            mask[np.argsort(self.pvalues_, kind="stable")[:k]] = True
            corr = self.correction or "uncorrected"
            self.fallback_ = f"no feature had p < {self.alpha} ({corr}); kept the {k} smallest p"
            _warn(f"MannWhitneySelector: {self.fallback_}.")
        self.support_ = mask
        return self

    def _get_support_mask(self) -> np.ndarray:
        check_is_fitted(self, "support_")
        return self.support_

    def __sklearn_tags__(self):
        return _binary_supervised_tags(super().__sklearn_tags__())


# ---------------------------------------------------------------------------------------- correlation


class CorrelationFilter(SelectorMixin, BaseEstimator):
    """Drop redundant features: of any pair with |rho| > ``threshold`` keep the more relevant one.

    Relevance is the univariate |AUC - 0.5| on the fit data (the same quantity the Mann-Whitney U tests).
    Greedy and deterministic: visit features by decreasing relevance (ties: lower column index first) and
    keep one unless it correlates above the threshold with a feature already kept. Constant columns have an
    undefined correlation, treated as 0 (they are not redundant with anything; the LASSO ignores them).
    """

    _parameter_constraints: dict = {
        "threshold": [Interval(Real, 0, 1, closed="right")],
        "method": [StrOptions({"spearman", "pearson"})],
    }

    def __init__(self, threshold: float = 0.9, *, method: str = "spearman") -> None:
        self.threshold = threshold
        self.method = method

    @_fit_context(prefer_skip_nested_validation=True)
    def fit(self, X, y):
        X, y = validate_data(self, X, y, reset=True, dtype=np.float64)
        self.classes_, positive = _binary_target(y, type(self).__name__)
        data = stats.rankdata(X, axis=0) if self.method == "spearman" else X
        with np.errstate(divide="ignore", invalid="ignore"):
            centred = data - data.mean(axis=0)
            norms = np.sqrt((centred**2).sum(axis=0))
            corr = (centred.T @ centred) / np.outer(norms, norms)
        corr = np.nan_to_num(corr, nan=0.0)
        self.relevance_ = np.abs(column_auc(X, positive) - 0.5)
        order = np.lexsort((np.arange(X.shape[1]), -self.relevance_))
        kept: list[int] = []
        for j in order:
            if not kept or np.all(np.abs(corr[j, kept]) <= self.threshold):
                kept.append(int(j))
        mask = np.zeros(X.shape[1], dtype=bool)
        mask[kept] = True
        self.support_ = mask
        return self

    def _get_support_mask(self) -> np.ndarray:
        check_is_fitted(self, "support_")
        return self.support_

    def __sklearn_tags__(self):
        return _binary_supervised_tags(super().__sklearn_tags__())


# ---------------------------------------------------------------------------------------------- LASSO


def _l1_logistic(C: float, *, solver: str, random_state, max_iter: int) -> LogisticRegression:
    """An L1 logistic regression that is warning-free on scikit-learn >= 1.8 (`penalty` deprecated there)."""
    return LogisticRegression(
        C=C, l1_ratio=1.0, solver=solver, random_state=random_state, max_iter=max_iter, tol=1e-6
    )


class LassoSelector(SelectorMixin, BaseEstimator):
    """Cross-validated L1 logistic regression keeping at most ``max_features`` nonzero coefficients.

    Expects z-scored input (the L1 penalty is scale dependent; the pipeline scales first).
    1. ``LogisticRegressionCV`` (L1, stratified ``cv`` folds shuffled with ``random_state``, ``scoring``)
       picks ``C_cv_`` from the grid. ``Cs`` is a list, or an int n: n values log-spaced over three
       decades upwards from ``l1_min_c`` (the C at which the first coefficient leaves zero), so the grid
       always spans the interesting part of the path for the data at hand.
    2. The full path (one L1 fit per C on all fit data) is stored in ``path_`` for the LASSO figure.
    3. If ``C_cv_`` keeps more than ``max_features``, walk the path down to the largest C <= ``C_cv_`` with
       between ``min_features`` and ``max_features`` nonzero coefficients (a sparser *fitted* model, not a
       truncation of a denser one; logged, noted in ``path_note_``). If ``C_cv_`` keeps fewer than
       ``min_features`` (typical for noise), walk up to the smallest C that keeps enough. Only if no grid
       point fits are the largest-|coef| ``max_features`` of the nearest denser fit kept. These two are
       fallbacks: they warn and set ``fallback_``.
    Learned: ``C_`` (used), ``C_cv_``, ``coef_`` [n_features_in_] (0 = dropped), ``intercept_``, ``path_``.
    """

    _parameter_constraints: dict = {
        "max_features": [Interval(Integral, 1, None, closed="left")],
        "min_features": [Interval(Integral, 1, None, closed="left")],
        "cv": [Interval(Integral, 2, None, closed="left")],
        "Cs": [Interval(Integral, 2, None, closed="left"), "array-like"],
        "scoring": [StrOptions({"neg_log_loss", "roc_auc"})],
        "solver": [StrOptions({"liblinear", "saga"})],
        "max_iter": [Interval(Integral, 1, None, closed="left")],
        "random_state": ["random_state"],
    }

    def __init__(
        self,
        max_features: int = 12,
        *,
        min_features: int = 1,
        cv: int = 5,
        Cs=20,
        scoring: str = "neg_log_loss",
        solver: str = "liblinear",
        max_iter: int = 5000,
        random_state=0,
    ) -> None:
        self.max_features = max_features
        self.min_features = min_features
        self.cv = cv
        self.Cs = Cs
        self.scoring = scoring
        self.solver = solver
        self.max_iter = max_iter
        self.random_state = random_state

    def _grid(self, X: np.ndarray, y01: np.ndarray) -> np.ndarray:
        if not isinstance(self.Cs, Integral):
            grid = np.sort(np.asarray(self.Cs, dtype=np.float64).ravel())
            if grid.size == 0 or np.any(grid <= 0):
                raise ValueError(f"Cs must be an int >= 2 or a list of positive floats, got {self.Cs!r}.")
            return grid
        try:
            c0 = l1_min_c(X, y01, loss="log")
        except ValueError:  # ill-posed: X^T y == 0, e.g. constant columns only
            logger.info("LassoSelector: l1_min_c undefined for this data; using the grid 1e-4..1e4")
            return np.logspace(-4, 4, int(self.Cs))
        return c0 * np.logspace(0, 3, int(self.Cs))

    @_fit_context(prefer_skip_nested_validation=True)
    def fit(self, X, y):
        X, y = validate_data(self, X, y, reset=True, dtype=np.float64)
        self.classes_, positive = _binary_target(y, type(self).__name__)
        y01 = positive.astype(int)
        n_minor = int(min(y01.sum(), y01.size - y01.sum()))
        notes = []
        n_splits = self.cv
        if n_minor < 2:
            raise ValueError(f"LassoSelector needs >= 2 samples of each class for CV, got {n_minor}.")
        if n_minor < self.cv:
            n_splits = n_minor
            notes.append(f"smaller class has {n_minor} samples < cv={self.cv}; used {n_splits} folds")
        grid = self._grid(X, y01)
        folds = StratifiedKFold(n_splits=n_splits, shuffle=True, random_state=self.random_state)
        cv_model = LogisticRegressionCV(
            Cs=list(grid),
            l1_ratios=(1.0,),
            cv=folds,
            solver=self.solver,
            scoring=self.scoring,
            max_iter=self.max_iter,
            tol=1e-6,
            random_state=self.random_state,
            use_legacy_attributes=False,
        )
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always", ConvergenceWarning)
            cv_model.fit(X, y01)
            coefs, intercepts, n_iters = [], [], []
            for C in grid:
                m = _l1_logistic(
                    float(C), solver=self.solver, random_state=self.random_state, max_iter=self.max_iter
                )
                m.fit(X, y01)
                coefs.append(m.coef_.ravel().copy())
                intercepts.append(float(m.intercept_[0]))
                n_iters.append(int(np.max(m.n_iter_)))
        self.n_convergence_warnings_ = sum(issubclass(w.category, ConvergenceWarning) for w in caught)
        if self.n_convergence_warnings_:
            logger.warning(
                "LassoSelector: %d convergence warning(s) on the path", self.n_convergence_warnings_
            )
        coefs_arr = np.asarray(coefs)
        nnz = (coefs_arr != 0).sum(axis=1)
        scores = np.asarray(cv_model.scores_)[:, 0, :]  # [folds, n_Cs]
        self.C_cv_ = float(cv_model.C_)
        i_cv = int(np.argmin(np.abs(grid - self.C_cv_)))
        i_use, chosen_note = self._choose(grid, nnz, i_cv)
        self.path_note_ = None
        if chosen_note and nnz[i_cv] > self.max_features and nnz[i_use] <= self.max_features:
            self.path_note_ = chosen_note  # the designed walk down the path, not a fallback
            logger.info("LassoSelector: %s", chosen_note)
        elif chosen_note:
            notes.append(chosen_note)
        self.fallback_ = "; ".join(notes) or None
        coef = coefs_arr[i_use].copy()
        if nnz[i_use] > self.max_features:  # truncation fallback (no grid point in range)
            keep = np.argsort(-np.abs(coef), kind="stable")[: self.max_features]
            trimmed = np.zeros_like(coef)
            trimmed[keep] = coef[keep]
            coef = trimmed
        if self.fallback_:
            _warn(f"LassoSelector: {self.fallback_}.")
        self.C_ = float(grid[i_use])
        self.coef_ = coef
        self.intercept_ = intercepts[i_use]
        self.n_iter_ = n_iters[i_use]
        self.support_ = coef != 0
        self.path_ = {
            "Cs": grid.tolist(),
            "n_nonzero": nnz.tolist(),
            "coefs": coefs_arr.tolist(),
            "cv_mean": scores.mean(axis=0).tolist(),
            "cv_sd": scores.std(axis=0).tolist(),
            "scoring": self.scoring,
            "C_cv": self.C_cv_,
            "C_used": self.C_,
            "note": self.path_note_,
        }
        return self

    def _choose(self, grid: np.ndarray, nnz: np.ndarray, i_cv: int) -> tuple[int, str | None]:
        lo, hi = self.min_features, self.max_features
        if lo <= nnz[i_cv] <= hi:
            return i_cv, None
        ok = np.flatnonzero((nnz >= lo) & (nnz <= hi))
        if nnz[i_cv] > hi:
            below = ok[ok < i_cv]
            if below.size:
                i = int(below[-1])
                return (
                    i,
                    f"CV-optimal C={grid[i_cv]:.4g} kept {nnz[i_cv]} > {hi}; used C={grid[i]:.4g} ({nnz[i]})",
                )
        else:
            above = ok[ok > i_cv]
            if above.size:
                i = int(above[0])
                return (
                    i,
                    f"CV-optimal C={grid[i_cv]:.4g} kept {nnz[i_cv]} < {lo}; used C={grid[i]:.4g} ({nnz[i]})",
                )
        if ok.size:
            i = int(ok[np.argmin(np.abs(ok - i_cv))])
            return i, f"no C near the CV optimum kept {lo}..{hi} features; used C={grid[i]:.4g} ({nnz[i]})"
        denser = np.flatnonzero(nnz > hi)
        if denser.size == 0:
            raise ValueError(
                f"LassoSelector: no C in the grid ({grid[0]:.3g}..{grid[-1]:.3g}) selects any feature; "
                "pass larger Cs."
            )
        i = int(denser[0])
        return (
            i,
            f"no C in the grid kept {lo}..{hi} features; kept the {hi} largest |coef| at C={grid[i]:.4g}",
        )

    def _get_support_mask(self) -> np.ndarray:
        check_is_fitted(self, "support_")
        return self.support_

    def __sklearn_tags__(self):
        return _binary_supervised_tags(super().__sklearn_tags__())


# --------------------------------------------------------------------------------------- the pipeline


@dataclass(frozen=True)
class SelectionSettings:
    """The selection knobs (a superset of `training.config.SelectionConfig`, which may be passed instead)."""

    icc_threshold: float = 0.75
    icc_kind: str = "ICC(2,1)"
    second_mask_column: str | None = None
    mwu_alpha: float = 0.05
    mwu_correction: str | None = "fdr_bh"
    mwu_fallback_k: int = 24
    correlation_threshold: float = 0.9
    correlation_method: str = "spearman"
    max_features: int = 12
    lasso_cv: int = 5
    lasso_Cs: int = 20
    lasso_scoring: str = "neg_log_loss"

    @classmethod
    def from_any(cls, config: Any = None) -> SelectionSettings:
        """Accept None, a mapping, this class, or any object with some of these attributes (pydantic)."""
        if config is None:
            return cls()
        if isinstance(config, cls):
            return config
        names = {f.name for f in fields(cls)}
        if isinstance(config, Mapping):
            unknown = sorted(set(config) - names)
            if unknown:
                raise InputError(
                    f"unknown selection option(s) {unknown}; known: {sorted(names)}", field="selection"
                )
            values = dict(config)
        else:
            values = {n: getattr(config, n) for n in names if hasattr(config, n)}
        return cls(**values)


def build_selection_pipeline(
    config: Any = None, *, use_icc: bool | None = None, random_state: int = 0
) -> Pipeline:
    """``[icc] -> scale -> mwu -> corr -> lasso`` as one unfitted Pipeline (fit it on training data only).

    ``use_icc`` defaults to "a second mask column is configured"; the ICC step then needs
    ``fit(X, y, icc__X_repeat=X2)`` (see :func:`fit_selection`).
    """
    s = SelectionSettings.from_any(config)
    if use_icc is None:
        use_icc = s.second_mask_column is not None
    correction = None if s.mwu_correction in (None, "none") else s.mwu_correction
    steps: list[tuple[str, Any]] = []
    if use_icc:
        steps.append(("icc", ICCFilter(s.icc_threshold, kind=s.icc_kind, fallback_k=s.mwu_fallback_k)))
    steps += [
        ("scale", StandardScaler()),
        ("mwu", MannWhitneySelector(s.mwu_alpha, correction=correction, fallback_k=s.mwu_fallback_k)),
        ("corr", CorrelationFilter(s.correlation_threshold, method=s.correlation_method)),
        (
            "lasso",
            LassoSelector(
                s.max_features,
                cv=s.lasso_cv,
                Cs=s.lasso_Cs,
                scoring=s.lasso_scoring,
                random_state=random_state,
            ),
        ),
    ]
    return Pipeline(steps)


def fit_selection(
    X: np.ndarray,
    y: np.ndarray,
    config: Any = None,
    *,
    X_repeat: np.ndarray | None = None,
    random_state: int = 0,
) -> Pipeline:
    """Build and fit the selection pipeline on ONE cohort (the training cohort); the ICC step iff X_repeat."""
    pipeline = build_selection_pipeline(config, use_icc=X_repeat is not None, random_state=random_state)
    params = {"icc__X_repeat": X_repeat} if X_repeat is not None else {}
    return pipeline.fit(X, y, **params)


def selected_indices(pipeline: Pipeline, n_features: int) -> np.ndarray:
    """Indices into the ORIGINAL columns (e.g. the 2048 deep features) that survive every selector."""
    index = np.arange(n_features)
    for name, step in pipeline.steps:
        if hasattr(step, "get_support"):
            support = step.get_support()
            if support.size != index.size:
                raise ValueError(f"step {name!r} saw {support.size} features, expected {index.size}.")
            index = index[support]
    return index


def _json_float(v: float) -> float | None:
    return None if v is None or not math.isfinite(float(v)) else float(v)


def selection_summary(pipeline: Pipeline, feature_names: list[str] | None = None) -> dict:
    """What each fitted step kept (as original indices), the LASSO path and the final coefficients.

    JSON-ready (NaN -> null); written to ``selection.json`` by the study run.
    """
    first = pipeline.steps[0][1]
    n_features = int(first.n_features_in_)
    names = list(feature_names) if feature_names is not None else [f"f{i}" for i in range(n_features)]
    if len(names) != n_features:
        raise ValueError(f"feature_names has {len(names)} names, the pipeline saw {n_features} features.")
    index = np.arange(n_features)
    steps = []
    lasso_inputs = index
    for name, step in pipeline.steps:
        entry: dict[str, Any] = {"step": name, "estimator": type(step).__name__, "n_in": int(index.size)}
        if isinstance(step, LassoSelector):
            lasso_inputs = index
        if hasattr(step, "get_support"):
            index = index[step.get_support()]
        entry["n_kept"] = int(index.size)
        entry["fallback"] = getattr(step, "fallback_", None)
        if name != "scale":
            entry["kept_indices"] = index.tolist()
        steps.append(entry)
    lasso = pipeline.steps[-1][1]
    result: dict[str, Any] = {"n_features_in": n_features, "steps": steps}
    if isinstance(lasso, LassoSelector):
        path = dict(lasso.path_)
        path["cv_mean"] = [_json_float(v) for v in path["cv_mean"]]
        path["cv_sd"] = [_json_float(v) for v in path["cv_sd"]]
        # path["coefs"][i][j] is the coefficient of original feature input_indices[j] at path["Cs"][i]
        path["input_indices"] = lasso_inputs.tolist()
        path["input_names"] = [names[i] for i in lasso_inputs]
        result["lasso"] = {"C": lasso.C_, "C_cv": lasso.C_cv_, "intercept": lasso.intercept_, "path": path}
        coef = lasso.coef_[lasso.support_]
    else:
        coef = np.full(index.size, np.nan)
    result["final"] = {
        "indices": index.tolist(),
        "names": [names[i] for i in index],
        "lasso_coef_scaled": [_json_float(c) for c in coef],
    }
    return result
