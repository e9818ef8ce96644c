"""SHAP values of the DFSigM head on its selected, scaled deep features.

The explainer follows the head: ``LinearExplainer`` for linear heads (LR, Platt-scaled linear SVM; exact,
log-odds), ``TreeExplainer`` for random forests (probability) and gradient boosting (log-odds), and a
bounded ``KernelExplainer`` (k-means background, fixed ``nsamples``, probability) for everything else.
Every result carries its output space and the largest additivity error |base + sum(values) - output|, so
a reader can see that the explanation adds up to what the model actually outputs.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from sklearn.ensemble import GradientBoostingClassifier, RandomForestClassifier

from core.errors import InputError
from training.models import SignatureModel

log = logging.getLogger(__name__)

LOG_ODDS = "log-odds"
PROBABILITY = "probability"


@dataclass(frozen=True)
class ShapResult:
    """SHAP values ``[N, k]`` over the selected features; unpacks as ``(values, base_value, explainer)``."""

    values: np.ndarray
    base_value: float
    explainer_name: str
    output_space: str  # LOG_ODDS or PROBABILITY
    feature_names: list[str]
    output: np.ndarray  # the model's output for each explained patient, in output_space
    additivity_max_error: float

    def __iter__(self) -> Iterator[Any]:
        yield from (self.values, self.base_value, self.explainer_name)


def _selected_scaled(model: SignatureModel, X_full: np.ndarray, what: str) -> np.ndarray:
    X_full = np.asarray(X_full, dtype=np.float64)
    if X_full.ndim != 2 or X_full.shape[1] <= int(model.feature_indices.max(initial=-1)):
        raise InputError(
            f"{what}: expected the full feature matrix [N, {model.n_input_features or 'n_features'}], "
            f"got {X_full.shape}",
            field="features",
        )
    if not np.isfinite(X_full[:, model.feature_indices]).all():
        raise InputError(f"{what}: selected features contain NaN or infinite values", field="features")
    return model.pipeline[0].transform(X_full[:, model.feature_indices])


def _logit(p: np.ndarray) -> np.ndarray:
    p = np.clip(p, 1e-15, 1 - 1e-15)
    return np.log(p / (1 - p))


def _linear(model: SignatureModel, Xb: np.ndarray, Xe: np.ndarray) -> tuple[np.ndarray, float, np.ndarray]:
    import shap

    coef, intercept = model.linear_coef("scaled")
    # All of the background (not shap's default 100-row subsample): the reference is then the exact
    # training mean, i.e. 0 on the scaled features, and values = coef * (x - mean).
    masker = shap.maskers.Independent(Xb, max_samples=Xb.shape[0])
    explainer = shap.LinearExplainer((coef, intercept), masker)
    values = np.asarray(explainer.shap_values(Xe), dtype=np.float64)
    base = float(np.ravel(explainer.expected_value)[0])
    return values, base, _logit(model.pipeline[-1].predict_proba(Xe)[:, model._pos])


def _tree(model: SignatureModel, Xe: np.ndarray) -> tuple[np.ndarray, float, np.ndarray, str]:
    import shap

    clf, pos = model.pipeline[-1], model._pos
    explainer = shap.TreeExplainer(clf)  # tree_path_dependent: the trees' own cover is the background
    values = np.asarray(explainer.shap_values(Xe), dtype=np.float64)
    expected = np.ravel(np.asarray(explainer.expected_value, dtype=np.float64))
    if values.ndim == 3:  # one set per class (random forest probabilities)
        values, base = values[..., pos], float(expected[pos])
    else:  # binary gradient boosting: log-odds of classes_[1]
        base = float(expected[0])
        if pos == 0:
            values, base = -values, -base
    if isinstance(clf, GradientBoostingClassifier):
        raw = clf.decision_function(Xe)
        return values, base, raw if pos == 1 else -raw, LOG_ODDS
    return values, base, clf.predict_proba(Xe)[:, pos], PROBABILITY


def _kernel(
    model: SignatureModel, Xb: np.ndarray, Xe: np.ndarray, *, n_background: int, nsamples: int, seed: int
) -> tuple[np.ndarray, float, np.ndarray]:
    import shap

    clf, pos = model.pipeline[-1], model._pos

    def f(X: np.ndarray) -> np.ndarray:
        return clf.predict_proba(X)[:, pos]

    k = min(n_background, Xb.shape[0])
    np.random.seed(seed)  # shap.kmeans and the coalition sampler use numpy's global RNG
    background = shap.kmeans(Xb, k)
    # identity link: k-NN and trees give probabilities of exactly 0 or 1, whose logit is infinite.
    explainer = shap.KernelExplainer(f, background, link="identity")
    values = np.asarray(explainer.shap_values(Xe, nsamples=nsamples, silent=True), dtype=np.float64)
    if values.ndim == 3:
        values = values[..., 0]
    return values, float(np.ravel(explainer.expected_value)[0]), f(Xe)


def compute_shap(
    model: SignatureModel,
    X_train_full: np.ndarray,
    X_explain_full: np.ndarray,
    *,
    n_background: int = 10,
    nsamples: int = 500,
    seed: int = 0,
) -> ShapResult:
    """SHAP values of ``model`` for the rows of ``X_explain_full`` (both are FULL feature vectors).

    The background is the training cohort (``X_train_full``), scaled by the model's own scaler. For the
    kernel explainer ``n_background`` k-means centres and ``nsamples`` coalitions per patient bound the cost.
    """
    Xb = _selected_scaled(model, X_train_full, "training features")
    Xe = _selected_scaled(model, X_explain_full, "features to explain")
    clf = model.pipeline[-1]
    if model.is_linear:
        values, base, output = _linear(model, Xb, Xe)
        name, space = "LinearExplainer", LOG_ODDS
    elif isinstance(clf, RandomForestClassifier | GradientBoostingClassifier):
        values, base, output, space = _tree(model, Xe)
        name = "TreeExplainer"
    else:
        values, base, output = _kernel(model, Xb, Xe, n_background=n_background, nsamples=nsamples, seed=seed)
        name = f"KernelExplainer (k-means background {min(n_background, len(Xb))}, nsamples {nsamples})"
        space = PROBABILITY
    err = float(np.max(np.abs(base + values.sum(axis=1) - output))) if len(output) else 0.0
    if err > 1e-6 * max(1.0, float(np.max(np.abs(output), initial=0.0))):
        log.warning("SHAP (%s): additivity error up to %.3g in %s", name, err, space)
    return ShapResult(
        values=values,
        base_value=base,
        explainer_name=name,
        output_space=space,
        feature_names=list(model.feature_names),
        output=np.asarray(output, dtype=np.float64),
        additivity_max_error=err,
    )


def shap_frame(result: ShapResult, ids: Any, cohorts: Any, labels: Any) -> pd.DataFrame:
    """One row per patient: id, cohort, label, base value, model output, then one SHAP column per feature."""
    frame = pd.DataFrame(
        {
            "patient_id": np.asarray(ids).astype(str),
            "cohort": np.asarray(cohorts).astype(str),
            "label": np.asarray(labels).astype(int),
            "base_value": result.base_value,
            f"output_{result.output_space}": result.output,
        }
    )
    values = pd.DataFrame(result.values, columns=[f"shap_{n}" for n in result.feature_names])
    return pd.concat([frame, values], axis=1)


# ------------------------------------------------------------------------------------------- figures


def _explanation(result: ShapResult, rows: np.ndarray, data: np.ndarray) -> Any:
    import shap

    return shap.Explanation(
        values=result.values[rows],
        base_values=np.full(len(rows), result.base_value),
        data=data[rows],
        feature_names=result.feature_names,
    )


def shap_figures(
    result: ShapResult,
    X_scaled: np.ndarray,
    *,
    train_rows: np.ndarray,
    waterfall_rows: dict[str, int],
    out_dir: Path,
) -> dict[str, list[Path]]:
    """Beeswarm and mean-|SHAP| bar over the training rows, one waterfall per ``{name: row}``.

    ``X_scaled`` are the z-scored selected features (the model's input), shown as the feature values.
    Returns ``{figure stem: [png, svg]}``.
    """
    import matplotlib.pyplot as plt
    import shap

    from training.figures.style import figure_style, save_figure

    out: dict[str, list[Path]] = {}
    k = len(result.feature_names)
    space = result.output_space
    with figure_style():
        fig = plt.figure(figsize=(6.5, 0.35 * k + 1.5))
        ax = fig.add_subplot()
        shap.plots.beeswarm(
            _explanation(result, train_rows, X_scaled),
            max_display=k,
            ax=ax,
            show=False,
            plot_size=None,
            color_bar_label="Feature value (z-score)",
        )
        ax.set_xlabel(f"SHAP value (impact on DFSigM {space})")
        ax.set_title(f"SHAP summary, training cohort (n={len(train_rows)}; {result.explainer_name})")
        out["shap_beeswarm"] = save_figure(fig, out_dir / "shap_beeswarm")

        mean_abs = np.abs(result.values[train_rows]).mean(axis=0)
        order = np.argsort(mean_abs)
        fig, ax = plt.subplots(figsize=(5.5, 0.3 * k + 1.2))
        ax.barh(np.arange(k), mean_abs[order], color="#0072B2")
        ax.set_yticks(np.arange(k), [result.feature_names[i] for i in order])
        ax.set_xlabel(f"mean |SHAP value| ({space})")
        ax.set_title("Feature importance, training cohort")
        out["shap_bar"] = save_figure(fig, out_dir / "shap_bar")

        for name, row in waterfall_rows.items():
            shap.plots.waterfall(
                _explanation(result, np.array([row]), X_scaled)[0], max_display=k, show=False
            )
            fig = plt.gcf()
            fig.suptitle(f"{name} (output in {space})", fontsize=9)
            out[f"shap_waterfall_{name}"] = save_figure(fig, out_dir / f"shap_waterfall_{name}")
    return out
