"""ROC, calibration and decision curves: one panel per cohort, all models in each panel.

ROC points come from ``predictions.csv`` (``sklearn.metrics.roc_curve``); every number printed on a figure
(AUC and its DeLong CI, Hosmer–Lemeshow p) and the calibration / decision-curve data come from
``metrics.json`` as written by the study, so figures and tables cannot disagree.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
from matplotlib.axes import Axes
from sklearn.metrics import roc_curve

from training.figures.style import (
    REFERENCE_COLOR,
    figure_style,
    label_cohort,
    label_model,
    model_color,
    save_figure,
)

log = logging.getLogger(__name__)


def fmt_auc(entry: Mapping[str, Any]) -> str:
    """``0.812 (0.741–0.883)`` from a metrics.json model entry."""
    ci = entry.get("auc_ci") or [None, None]
    if entry.get("auc") is None:
        return "n/a"
    if ci[0] is None or ci[1] is None:
        return f"{entry['auc']:.3f}"
    return f"{entry['auc']:.3f} ({ci[0]:.3f}–{ci[1]:.3f})"


def _legend_below(ax: Axes, **kwargs: Any) -> None:
    """Legends under the panel: inside, they hide the curves of small cohorts."""
    ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.2), ncol=1, title_fontsize=7, **kwargs)


def _panels(n: int, height: float = 3.0) -> tuple[plt.Figure, list[Axes]]:
    fig, axes = plt.subplots(1, n, figsize=(3.1 * n, height), squeeze=False)
    return fig, list(axes[0])


def _models_of(cohort_metrics: Mapping[str, Any], models: Sequence[str] | None) -> list[str]:
    return [m for m in (models or cohort_metrics["models"].keys()) if m in cohort_metrics["models"]]


def roc_axes(ax: Axes, frame: pd.DataFrame, cohort: str, cohort_metrics: Mapping[str, Any], models) -> None:
    y = frame["label"].to_numpy(dtype=int)
    for i, m in enumerate(_models_of(cohort_metrics, models)):
        if m not in frame.columns:
            log.warning("ROC: no column %r in predictions.csv for cohort %s", m, cohort)
            continue
        fpr, tpr, _ = roc_curve(y, frame[m].to_numpy(dtype=float), drop_intermediate=False)
        label = f"{label_model(m)}: {fmt_auc(cohort_metrics['models'][m])}"
        # straight segments between the ROC points: steps, and diagonals across tied scores (as pROC draws)
        ax.plot(fpr, tpr, color=model_color(m, i), label=label)
    ax.plot([0, 1], [0, 1], ls="--", lw=0.8, color=REFERENCE_COLOR)
    ax.set(xlim=(-0.01, 1.01), ylim=(-0.01, 1.01), aspect="equal")
    ax.set_xlabel("1 − specificity")
    ax.set_ylabel("Sensitivity")
    n, events = cohort_metrics.get("n"), cohort_metrics.get("events")
    ax.set_title(f"{label_cohort(cohort)}\n(n={n}, {events} events)")
    _legend_below(ax, title="AUC (95% CI)")


def roc_figure(
    predictions: pd.DataFrame,
    metrics: Mapping[str, Any],
    out_stem: Path,
    *,
    cohorts: Sequence[str] | None = None,
    models: Sequence[str] | None = None,
) -> list[Path]:
    """ROC curves, one panel per cohort, every model per panel, "AUC (95% CI)" (DeLong) in the legend."""
    cohorts = list(cohorts or metrics["cohorts"])
    with figure_style():
        fig, axes = _panels(len(cohorts), 3.3)
        for ax, c in zip(axes, cohorts):
            roc_axes(ax, predictions[predictions["cohort"] == c], c, metrics["cohorts"][c], models)
        return save_figure(fig, out_stem)


def calibration_figure(
    metrics: Mapping[str, Any],
    out_stem: Path,
    *,
    cohorts: Sequence[str] | None = None,
    models: Sequence[str] | None = None,
) -> list[Path]:
    """Observed event rate (Wilson 95% CI) against mean predicted risk in the Hosmer–Lemeshow groups."""
    cohorts = list(cohorts or metrics["cohorts"])
    with figure_style():
        fig, axes = _panels(len(cohorts), 3.3)
        for ax, c in zip(axes, cohorts):
            cm = metrics["cohorts"][c]
            for i, m in enumerate(_models_of(cm, models)):
                cal = cm["models"][m].get("calibration") or {}
                bins = cal.get("curve") or []
                if not bins:
                    continue
                x = np.array([b["mean_predicted"] for b in bins])
                yv = np.array([b["observed"] for b in bins])
                err = np.array(
                    [[o - b["observed_ci_low"], b["observed_ci_high"] - o] for o, b in zip(yv, bins)]
                ).T
                hl = cal.get("hosmer_lemeshow") or {}
                p = hl.get("p_value")
                tag = f" (HL p={p:.3f})" if p is not None else ""
                color = model_color(m, i)
                ax.errorbar(
                    x,
                    yv,
                    yerr=err,
                    fmt="o-",
                    ms=3,
                    lw=1.0,
                    capsize=2,
                    color=color,
                    alpha=0.9,
                    label=f"{label_model(m)}{tag}",
                )
            ax.plot([0, 1], [0, 1], ls="--", lw=0.8, color=REFERENCE_COLOR, label="Ideal")
            ax.set(xlim=(0, 1), ylim=(-0.02, 1.02), aspect="equal")
            ax.set_xlabel("Predicted probability")
            ax.set_ylabel("Observed proportion")
            ax.set_title(label_cohort(c))
            _legend_below(ax)
        return save_figure(fig, out_stem)


def decision_figure(
    metrics: Mapping[str, Any],
    out_stem: Path,
    *,
    cohorts: Sequence[str] | None = None,
    models: Sequence[str] | None = None,
) -> list[Path]:
    """Net benefit of each model against treat-all and treat-none over the threshold probabilities."""
    cohorts = list(cohorts or metrics["cohorts"])
    with figure_style():
        fig, axes = _panels(len(cohorts), 3.0)
        for ax, c in zip(axes, cohorts):
            cm = metrics["cohorts"][c]
            top, treat_all = 0.0, None
            for i, m in enumerate(_models_of(cm, models)):
                dc = cm["models"][m].get("decision_curve")
                if not dc:
                    continue
                t = np.asarray(dc["thresholds"], dtype=float)
                nb = np.asarray([np.nan if v is None else v for v in dc["net_benefit"]], dtype=float)
                ax.plot(t, nb, color=model_color(m, i), label=label_model(m))
                top = max(top, float(np.nanmax(nb)))
                treat_all = (t, np.asarray(dc["treat_all"], dtype=float))
            if treat_all is not None:
                ax.plot(*treat_all, color=REFERENCE_COLOR, lw=0.9, label="Treat all")
                ax.axhline(0.0, color="black", lw=0.9, label="Treat none")
                top = max(top, float(np.nanmax(treat_all[1])))
            ax.set(xlim=(0, 1), ylim=(-0.05, max(top, 0.05) * 1.1 + 0.01))
            ax.set_xlabel("Threshold probability")
            ax.set_ylabel("Net benefit")
            ax.set_title(label_cohort(c))
            _legend_below(ax)
        return save_figure(fig, out_stem)
