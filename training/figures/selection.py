"""Model-selection figures: the DFSigM zoo comparison and the LASSO coefficient path."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd

from training.figures.style import MODEL_COLORS, REFERENCE_COLOR, figure_style, save_figure

ZOO_LABELS = {
    "lr": "Logistic regression",
    "linear_svm": "Linear SVM",
    "rbf_svm": "RBF SVM",
    "random_forest": "Random forest",
    "gradient_boosting": "Gradient boosting",
    "knn": "k-nearest neighbours",
    "mlp": "Multilayer perceptron",
}
SCORER_LABELS = {"roc_auc": "AUC", "neg_log_loss": "log-loss"}


def label_zoo(name: str) -> str:
    return ZOO_LABELS.get(name, name)


def model_comparison_figure(table: pd.DataFrame, out_stem: Path) -> list[Path]:
    """Mean CV score ± SD of every candidate (``tables/model_comparison.csv``); the pick in colour."""
    t = table.sort_values("cv_mean", ascending=True, kind="stable").reset_index(drop=True)
    selected = t["selected"].astype(str).str.lower().isin({"true", "1"}) if "selected" in t else None
    metric = str(t["metric"].iloc[0]) if "metric" in t and len(t) else "score"
    colors = [
        MODEL_COLORS["dfsig"] if selected is not None and selected[i] else REFERENCE_COLOR
        for i in range(len(t))
    ]
    with figure_style():
        fig, ax = plt.subplots(figsize=(5.0, 0.35 * len(t) + 1.0))
        y = np.arange(len(t))
        ax.barh(y, t["cv_mean"], xerr=t.get("cv_sd"), color=colors, capsize=2, error_kw={"lw": 0.8})
        for yi, (mean, sd) in enumerate(zip(t["cv_mean"], t.get("cv_sd", [np.nan] * len(t)))):
            txt = f"{mean:.3f}" + (f" ± {sd:.3f}" if pd.notna(sd) else "")
            ax.text(0.01, yi, txt, va="center", ha="left", fontsize=6.5, color="white")
        ax.set_yticks(y, [label_zoo(str(m)) for m in t["model"]])
        ax.set_xlabel(
            f"Repeated stratified CV {SCORER_LABELS.get(metric, metric)} (mean ± SD), training cohort"
        )
        low = float(np.nanmin(t["cv_mean"] - t.get("cv_sd", 0))) if len(t) else 0.0
        ax.set_xlim(0 if metric == "roc_auc" and low < 0.4 else None, 1.0 if metric == "roc_auc" else None)
        ax.set_title("DFSigM candidate classifiers")
        return save_figure(fig, out_stem)


def lasso_path_figure(selection: Mapping[str, Any], out_stem: Path) -> list[Path]:
    """Cross-validated score ± SD (top) and coefficient paths (bottom) against log10(C); chosen C marked.

    The paths are over the features that reached the LASSO step; the finally selected ones are coloured and
    named, the others grey.
    """
    lasso = selection["lasso"]
    path = lasso["path"]
    logc = np.log10(np.asarray(path["Cs"], dtype=float))
    coefs = np.asarray(path["coefs"], dtype=float)  # [n_Cs, n_in]
    mean = np.asarray([np.nan if v is None else v for v in path["cv_mean"]], dtype=float)
    sd = np.asarray([np.nan if v is None else v for v in path["cv_sd"]], dtype=float)
    scoring = path.get("scoring", "score")
    if scoring.startswith("neg_"):  # show the loss itself (lower is better), as glmnet's deviance plot does
        mean, scoring = -mean, scoring.removeprefix("neg_")
    names = _lasso_input_names(selection, coefs.shape[1])
    i_used = int(np.argmin(np.abs(np.asarray(path["Cs"]) - lasso["C"])))
    final = np.flatnonzero(coefs[i_used] != 0)
    with figure_style():
        fig, (top, bottom) = plt.subplots(2, 1, figsize=(5.5, 5.2), sharex=True, height_ratios=(1, 1.5))
        top.errorbar(logc, mean, yerr=sd, fmt="o", ms=3, color="#D55E00", capsize=2, lw=0.8)
        top.set_ylabel(f"CV {SCORER_LABELS.get(scoring, scoring.replace('_', ' '))}")
        nnz = path.get("n_nonzero")
        if nnz:
            sec = top.secondary_xaxis("top")
            ticks = logc[:: max(1, len(logc) // 8)]
            sec.set_xticks(ticks, [str(nnz[list(logc).index(t)]) for t in ticks])
            sec.set_xlabel("Non-zero coefficients")
        for j in range(coefs.shape[1]):
            if j not in final:
                bottom.plot(logc, coefs[:, j], color=REFERENCE_COLOR, lw=0.5, alpha=0.6)
        palette = plt.get_cmap("tab20")(np.linspace(0, 1, max(len(final), 2)))
        for n, j in enumerate(final):
            bottom.plot(logc, coefs[:, j], lw=1.2, color=palette[n], label=names[j])
        bottom.axhline(0, color="black", lw=0.6)
        bottom.set_xlabel("log10(C)  (C = 1/λ; larger C = weaker penalty)")
        bottom.set_ylabel("Coefficient (scaled features)")
        for ax in (top, bottom):
            ax.axvline(np.log10(lasso["C"]), color="black", lw=0.9, label=None)
            if lasso.get("C_cv") is not None and not np.isclose(lasso["C_cv"], lasso["C"]):
                ax.axvline(np.log10(lasso["C_cv"]), color="black", lw=0.9, ls="--")
        top.set_title("LASSO (L1 logistic) path: solid = C used, dashed = CV-optimal C (when different)")
        if len(final):
            bottom.legend(loc="center left", bbox_to_anchor=(1.01, 0.5), fontsize=6)
        return save_figure(fig, out_stem)


def _lasso_input_names(selection: Mapping[str, Any], n_in: int) -> list[str]:
    """Names of the LASSO step's input columns: the previous step's kept indices, named as in ``final``."""
    steps = selection.get("steps", [])
    final = selection.get("final", {})
    lookup = dict(zip(final.get("indices", []), final.get("names", [])))
    for i, step in enumerate(steps):
        if step.get("step") == "lasso" and i > 0:
            for prev in reversed(steps[:i]):
                kept = prev.get("kept_indices")
                if kept is not None and len(kept) == n_in:
                    return [lookup.get(k, f"f{k}") for k in kept]
    return [f"input {j}" for j in range(n_in)]
