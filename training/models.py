"""The DFSigM zoo: compare classifiers by repeated stratified CV on the training cohort, refit the best.

Every candidate is ``Pipeline(StandardScaler, classifier)`` with a small grid, searched by ``GridSearchCV``
over ``RepeatedStratifiedKFold`` (5 x 3 by default) with the selection metric (ROC AUC by default). Input is
the training cohort's *already selected* features; the validation cohorts are never seen here.

CV estimates and bias: by default (``nested=False``) a candidate's score is the mean/sd over the repeated
folds of its best grid point, the usual model-comparison number; it is optimistic twice over (the grid
maximum, and the features were selected on the same training cohort, as in the published design). Only the
held-out cohorts give unbiased performance. ``nested=True`` reports an outer repeated CV around an inner
grid search (k x slower) and removes the first bias; the second needs selection inside the CV
(:func:`cv_select_and_classify`).

All candidates are converters that skl2onnx supports, so the chosen head can go into the ONE exported graph.
"""

from __future__ import annotations

import json
import logging
import time
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd
from sklearn.base import clone
from sklearn.calibration import CalibratedClassifierCV
from sklearn.ensemble import GradientBoostingClassifier, RandomForestClassifier
from sklearn.exceptions import ConvergenceWarning
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import get_scorer
from sklearn.model_selection import (
    GridSearchCV,
    RepeatedStratifiedKFold,
    StratifiedKFold,
    cross_val_predict,
    cross_validate,
)
from sklearn.neighbors import KNeighborsClassifier
from sklearn.neural_network import MLPClassifier
from sklearn.pipeline import Pipeline
from sklearn.preprocessing import StandardScaler
from sklearn.svm import SVC, LinearSVC
from threadpoolctl import threadpool_limits

from core.errors import InputError

logger = logging.getLogger(__name__)

ZOO_NAMES = ("lr", "linear_svm", "rbf_svm", "random_forest", "gradient_boosting", "knn", "mlp")
LINEAR_NAMES = frozenset({"lr", "linear_svm"})


def _platt(svm: SVC) -> CalibratedClassifierCV:
    """SVM probabilities by Platt scaling: a sigmoid fitted on 5-fold out-of-fold decision values, on top of
    ONE SVM refitted on all data (``ensemble=False``), so logit P is an affine map of the SVM margin.
    (scikit-learn 1.9 deprecates ``SVC(probability=True)`` for exactly this construction; it is also
    deterministic, which libsvm's internal Platt CV was not without a seed.)"""
    return CalibratedClassifierCV(svm, method="sigmoid", ensemble=False, cv=5)


def make_zoo(
    names: Sequence[str] | None = None, *, random_state: int = 0
) -> dict[str, tuple[Pipeline, dict]]:
    """``{name: (Pipeline(scaler, clf), param_grid)}``; small grids (~150 patients x 12 features)."""
    rs = random_state
    zoo: dict[str, tuple[Any, dict]] = {
        "lr": (LogisticRegression(max_iter=5000), {"C": [0.001, 0.01, 0.1, 1.0, 10.0]}),
        "linear_svm": (_platt(SVC(kernel="linear")), {"estimator__C": [0.01, 0.1, 1.0]}),
        "rbf_svm": (
            _platt(SVC(kernel="rbf")),
            {"estimator__C": [0.1, 1.0, 10.0], "estimator__gamma": ["scale", 0.01]},
        ),
        "random_forest": (
            RandomForestClassifier(n_estimators=100, random_state=rs, n_jobs=1),
            {"max_depth": [3, None], "min_samples_leaf": [1, 5]},
        ),
        "gradient_boosting": (
            GradientBoostingClassifier(random_state=rs, subsample=1.0),
            {"n_estimators": [50, 100], "max_depth": [1, 2], "learning_rate": [0.1]},
        ),
        "knn": (KNeighborsClassifier(), {"n_neighbors": [5, 11, 21], "weights": ["uniform", "distance"]}),
        "mlp": (
            # lbfgs suits ~100 samples; weak penalties converge slowly, and max_iter doubles as early stopping
            # (hitting it is counted in the table's convergence_warnings column).
            MLPClassifier(hidden_layer_sizes=(16,), solver="lbfgs", alpha=1.0, max_iter=300, random_state=rs),
            {"alpha": [1.0, 10.0]},
        ),
    }
    wanted = list(names) if names is not None else list(ZOO_NAMES)
    unknown = [n for n in wanted if n not in zoo]
    if unknown:
        raise InputError(
            f"unknown classifier(s) {unknown}; known: {list(ZOO_NAMES)}", field="models.candidates"
        )
    return {
        n: (
            Pipeline([("scaler", StandardScaler()), ("clf", zoo[n][0])]),
            {f"clf__{k}": v for k, v in zoo[n][1].items()},
        )
        for n in wanted
    }


@dataclass(frozen=True)
class ZooSettings:
    """Model-selection knobs (a superset of `training.config.ModelSelectionConfig`, which may be passed)."""

    candidates: tuple[str, ...] = ZOO_NAMES
    cv_splits: int = 5
    cv_repeats: int = 3
    metric: str = "roc_auc"
    prefer_linear_within: float = 0.0
    nested: bool = False
    inner_splits: int = 3

    @classmethod
    def from_any(cls, config: Any = None, **overrides: Any) -> ZooSettings:
        values: dict[str, Any] = {}
        if isinstance(config, dict):
            values.update(config)
        elif config is not None:
            for name in cls.__dataclass_fields__:
                if hasattr(config, name):
                    values[name] = getattr(config, name)
        values.update({k: v for k, v in overrides.items() if v is not None})
        unknown = sorted(set(values) - set(cls.__dataclass_fields__))
        if unknown:
            raise InputError(f"unknown model-selection option(s) {unknown}", field="models")
        if "candidates" in values:
            values["candidates"] = tuple(values["candidates"])
        try:
            get_scorer(values.get("metric", "roc_auc"))
        except ValueError as exc:
            raise InputError(
                f"unknown scikit-learn scorer {values.get('metric')!r}", field="models.metric"
            ) from exc
        return cls(**values)


@dataclass
class ZooResult:
    """The comparison table and every fitted search (best estimators refitted on the whole training set)."""

    table: pd.DataFrame
    searches: dict[str, GridSearchCV]
    best_name: str
    selection_note: str = ""


def _check_xy(X: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    X = np.asarray(X, dtype=np.float64)
    y = np.asarray(y)
    if X.ndim != 2 or X.shape[0] != y.shape[0]:
        raise InputError(
            f"features must be [n_patients, n_features] matching {y.shape[0]} labels, got {X.shape}"
        )
    if not np.all(np.isfinite(X)):
        raise InputError("features contain NaN or infinite values", field="features")
    if set(np.unique(y).tolist()) != {0, 1}:
        raise InputError(f"labels must be 0/1 with both present, got {np.unique(y).tolist()}", field="label")
    return X, y.astype(int)


def _fit_grid_to_folds(name: str, grid: dict, min_train: int) -> dict:
    """Drop k-NN sizes larger than the smallest CV training fold (small cohorts), saying so."""
    key = "clf__n_neighbors"
    if key not in grid:
        return grid
    kept = [k for k in grid[key] if k <= min_train]
    if len(kept) < len(grid[key]):
        logger.warning(
            "%s: n_neighbors %s exceed the smallest training fold (%d); dropped",
            name,
            sorted(set(grid[key]) - set(kept)),
            min_train,
        )
    return {**grid, key: kept or [max(1, min_train)]}


def compare_models(
    X: np.ndarray,
    y: np.ndarray,
    config: Any = None,
    *,
    random_state: int = 0,
    n_jobs: int = 1,
    **overrides: Any,
) -> ZooResult:
    """Search every candidate's grid by repeated stratified CV on (X, y): the training cohort's selection.

    Pick = highest mean CV score (ties: zoo order). ``prefer_linear_within`` > 0 picks the best linear head
    (LR / linear SVM: exportable with a CAM) when it is within that margin of the best.
    """
    s = ZooSettings.from_any(config, **overrides)
    X, y = _check_xy(X, y)
    outer = RepeatedStratifiedKFold(n_splits=s.cv_splits, n_repeats=s.cv_repeats, random_state=random_state)
    rows, searches = [], {}
    min_train = len(y) - int(np.ceil(len(y) / s.cv_splits))  # smallest training fold
    for order, (name, (pipe, grid)) in enumerate(make_zoo(s.candidates, random_state=random_state).items()):
        t0 = time.perf_counter()
        grid = _fit_grid_to_folds(name, grid, min_train)
        # BLAS threads only hurt on 100 x 12 matrices (12x slower MLP on a busy 2-core box): one per process.
        with warnings.catch_warnings(record=True) as caught, threadpool_limits(limits=1):
            warnings.simplefilter("always", ConvergenceWarning)
            search = GridSearchCV(
                pipe, grid, scoring=s.metric, cv=outer, n_jobs=n_jobs, refit=True, error_score="raise"
            )
            if s.nested:
                inner = StratifiedKFold(n_splits=s.inner_splits, shuffle=True, random_state=random_state)
                nested = GridSearchCV(pipe, grid, scoring=s.metric, cv=inner, n_jobs=1, error_score="raise")
                scores = cross_validate(nested, X, y, scoring=s.metric, cv=outer, n_jobs=n_jobs)["test_score"]
                mean, sd = float(np.mean(scores)), float(np.std(scores))
            search.fit(X, y)
        n_conv = sum(issubclass(w.category, ConvergenceWarning) for w in caught)
        if n_conv:
            logger.warning("%s: %d convergence warning(s) during the search", name, n_conv)
        if not s.nested:
            i = search.best_index_
            mean = float(search.cv_results_["mean_test_score"][i])
            sd = float(search.cv_results_["std_test_score"][i])
        params = {k.removeprefix("clf__"): v for k, v in search.best_params_.items()}
        rows.append(
            {
                "model": name,
                "metric": s.metric,
                "cv_mean": mean,
                "cv_sd": sd,
                "best_params": json.dumps(params, sort_keys=True, default=str),
                "n_candidates": len(search.cv_results_["params"]),
                "n_fits": len(search.cv_results_["params"]) * outer.get_n_splits(),
                "nested": s.nested,
                "fit_time_s": time.perf_counter() - t0,
                "convergence_warnings": n_conv,
                "linear": name in LINEAR_NAMES,
                "_order": order,
            }
        )
        searches[name] = search
    table = pd.DataFrame(rows).sort_values(["cv_mean", "_order"], ascending=[False, True], kind="stable")
    best = str(table.iloc[0]["model"])
    note = f"highest mean CV {s.metric}"
    if s.prefer_linear_within > 0 and best not in LINEAR_NAMES:
        linear = table[table["linear"]]
        if len(linear) and table.iloc[0]["cv_mean"] - linear.iloc[0]["cv_mean"] <= s.prefer_linear_within:
            best = str(linear.iloc[0]["model"])
            note = f"best linear head within {s.prefer_linear_within} of the top mean CV {s.metric}"
    table["selected"] = table["model"] == best
    table = table.drop(columns="_order").reset_index(drop=True)
    logger.info("DFSigM: picked %s (%s)", best, note)
    return ZooResult(table=table, searches=searches, best_name=best, selection_note=note)


# ------------------------------------------------------------------------------------ SignatureModel


@dataclass
class SignatureModel:
    """The DFSigM head: pick ``feature_indices`` of the full deep-feature vector, scale, classify.

    ``pipeline`` is ``Pipeline(StandardScaler, classifier)`` fitted on the selected RAW features of the
    training cohort; the positive class is label 1.
    """

    feature_indices: np.ndarray
    feature_names: list[str]
    pipeline: Pipeline
    model_name: str
    n_input_features: int | None = None
    notes: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.feature_indices = np.asarray(self.feature_indices, dtype=np.int64)
        if len(self.feature_names) != self.feature_indices.size:
            raise ValueError("feature_names and feature_indices differ in length.")

    @property
    def _pos(self) -> int:
        return int(np.flatnonzero(self.pipeline.classes_ == 1)[0])

    def predict_proba_selected(self, X_selected: np.ndarray) -> np.ndarray:
        """P(label 1) from the already-selected raw features [N, k]."""
        X_selected = np.asarray(X_selected, dtype=np.float64)
        if X_selected.ndim != 2 or X_selected.shape[1] != self.feature_indices.size:
            raise InputError(
                f"expected selected features [N, {self.feature_indices.size}], got {X_selected.shape}",
                field="features",
            )
        return self.pipeline.predict_proba(X_selected)[:, self._pos]

    def predict_proba_full(self, X_full: np.ndarray) -> np.ndarray:
        """P(label 1) from the full deep-feature matrix [N, 2048] (the contract the export graph mirrors)."""
        X_full = np.asarray(X_full)
        expected = self.n_input_features
        if X_full.ndim != 2 or (expected is not None and X_full.shape[1] != expected):
            raise InputError(
                f"expected features [N, {expected or 'n_features'}], got {X_full.shape}", field="features"
            )
        if X_full.shape[1] <= int(self.feature_indices.max(initial=-1)):
            raise InputError(
                f"features have {X_full.shape[1]} columns; index {self.feature_indices.max()} needed"
            )
        return self.predict_proba_selected(X_full[:, self.feature_indices])

    @property
    def is_linear(self) -> bool:
        """True when logit(P) is an affine function of the scaled features: LR, or a linear SVM under one
        Platt sigmoid (``CalibratedClassifierCV(linear SVC | LinearSVC, "sigmoid", ensemble=False)``)."""
        return _linear_parts(self.pipeline[-1]) is not None

    @property
    def probability_link(self) -> str | None:
        """How probability follows from the linear score: ``P = sigmoid(x_scaled @ coef + intercept)``."""
        return "sigmoid" if self.is_linear else None

    def linear_coef(self, space: str = "scaled") -> tuple[np.ndarray, float]:
        """``(coef [k], intercept)`` with ``logit P(1) = x @ coef + intercept``.

        ``space="scaled"``: x = StandardScaler output (what SHAP/CAM weights mean); ``"raw"``: the scaler
        folded in, x = selected raw features. Linear SVC: Platt's sigmoid(A f + B) is folded into
        coef/intercept, so this is the exact probability, not the SVM margin.
        """
        parts = _linear_parts(self.pipeline[-1])
        if parts is None:
            raise TypeError(f"{self.model_name} ({type(self.pipeline[-1]).__name__}) is not a linear head.")
        coef, intercept = parts  # logit of P(classes_[1])
        if self._pos == 0:
            coef, intercept = -coef, -intercept
        if space == "scaled":
            return coef, intercept
        if space != "raw":
            raise ValueError(f"space must be 'scaled' or 'raw', got {space!r}.")
        scaler: StandardScaler = self.pipeline[0]
        raw = coef / scaler.scale_
        return raw, float(intercept - np.sum(raw * scaler.mean_))


def _linear_parts(clf: Any) -> tuple[np.ndarray, float] | None:
    """``(w, b)`` with logit P(classes_[1]) = x @ w + b, or None when the classifier is not of that form."""
    if isinstance(clf, LogisticRegression):
        return clf.coef_.ravel().copy(), float(clf.intercept_[0])
    if not (isinstance(clf, CalibratedClassifierCV) and clf.method == "sigmoid" and not clf.ensemble):
        return None
    inner = clf.calibrated_classifiers_[0]
    svm = inner.estimator
    if not (isinstance(svm, LinearSVC) or (isinstance(svm, SVC) and svm.kernel == "linear")):
        return None
    # _SigmoidCalibration: P(classes_[1]) = 1 / (1 + exp(a * f + b)), f = x @ coef_ + intercept_
    a, b = float(inner.calibrators[0].a_), float(inner.calibrators[0].b_)
    return -a * svm.coef_.ravel(), -(a * float(svm.intercept_[0]) + b)


def fit_signature_model(
    X_full: np.ndarray,
    y: np.ndarray,
    feature_indices: np.ndarray,
    feature_names: Sequence[str] | None = None,
    config: Any = None,
    *,
    random_state: int = 0,
    n_jobs: int = 1,
    **overrides: Any,
) -> tuple[SignatureModel, ZooResult]:
    """Compare the zoo on the TRAINING cohort's selected columns; wrap the refitted best as SignatureModel."""
    X_full = np.asarray(X_full)
    idx = np.asarray(feature_indices, dtype=np.int64)
    if idx.size == 0:
        raise InputError(
            "no features were selected; the signature model needs at least one", field="features"
        )
    names = list(feature_names) if feature_names is not None else [f"f{i}" for i in idx]
    result = compare_models(X_full[:, idx], y, config, random_state=random_state, n_jobs=n_jobs, **overrides)
    best = result.searches[result.best_name].best_estimator_
    model = SignatureModel(
        feature_indices=idx,
        feature_names=names,
        pipeline=best,
        model_name=result.best_name,
        n_input_features=int(X_full.shape[1]),
        notes={"selection": result.selection_note},
    )
    return model, result


def cv_select_and_classify(
    X_full: np.ndarray,
    y: np.ndarray,
    make_selector,
    model_name: str = "lr",
    *,
    cv_splits: int = 5,
    cv_repeats: int = 1,
    metric: str = "roc_auc",
    random_state: int = 0,
) -> np.ndarray:
    """Honest CV of the WHOLE chain (selection + fixed classifier re-fitted inside every fold).

    ``make_selector()`` returns a fresh unfitted selection pipeline. Use it to quantify how optimistic the
    zoo's CV numbers are; it is slower (selection runs once per fold).
    """
    pipe, _ = make_zoo([model_name], random_state=random_state)[model_name]
    chain = Pipeline([("select", make_selector()), ("model", clone(pipe))])
    cv = RepeatedStratifiedKFold(n_splits=cv_splits, n_repeats=cv_repeats, random_state=random_state)
    X, y = _check_xy(X_full, y)
    return cross_validate(chain, X, y, scoring=metric, cv=cv)["test_score"]


def out_of_fold_scores(
    model: SignatureModel, X_full: np.ndarray, y: np.ndarray, *, cv_splits: int = 5, random_state: int = 0
) -> np.ndarray:
    """Out-of-fold P(label 1) for the TRAINING cohort: the chosen pipeline (same hyperparameters) refitted
    per fold on the selected columns. Use these, not in-sample predictions, to fit the fusion model; the
    feature selection itself stays the one fitted on the whole training cohort (documented optimism)."""
    X = np.asarray(X_full, dtype=np.float64)[:, model.feature_indices]
    X, y = _check_xy(X, y)
    cv = StratifiedKFold(n_splits=cv_splits, shuffle=True, random_state=random_state)
    with threadpool_limits(limits=1):
        proba = cross_val_predict(clone(model.pipeline), X, y, cv=cv, method="predict_proba")
    return proba[:, 1]
