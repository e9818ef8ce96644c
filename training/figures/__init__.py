"""Publication figures of a study run, rebuilt from the run's files only (no model is refitted).

:func:`build_figures` writes ``figures/<name>.png`` (300 dpi) and ``.svg`` for every figure whose inputs
exist, and says for each missing one why it was skipped (logged and returned, shown by the report).
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd

from training.figures.curves import calibration_figure, decision_figure, fmt_auc, roc_figure
from training.figures.nomogram import NomogramTerm, nomogram_figure
from training.figures.selection import lasso_path_figure, model_comparison_figure
from training.figures.style import COHORT_ORDER, figure_style, save_figure

__all__ = [
    "FigureSet",
    "NomogramTerm",
    "build_figures",
    "calibration_figure",
    "decision_figure",
    "figure_style",
    "fmt_auc",
    "lasso_path_figure",
    "model_comparison_figure",
    "nomogram_figure",
    "roc_figure",
    "save_figure",
]

log = logging.getLogger(__name__)


@dataclass
class FigureSet:
    """``files[name] = [png, svg]`` for the figures made, ``skipped[name] = reason`` for the others."""

    files: dict[str, list[Path]] = field(default_factory=dict)
    skipped: dict[str, str] = field(default_factory=dict)


def _cohorts(metrics: dict) -> list[str]:
    present = list(metrics["cohorts"])
    return [c for c in COHORT_ORDER if c in present] + [c for c in present if c not in COHORT_ORDER]


def build_figures(run_dir: Path, *, nomogram_terms: Callable[[Path], tuple] | None = None) -> FigureSet:
    """All figures of ``run_dir`` into ``run_dir/figures``.

    ``nomogram_terms(run_dir) -> (terms, intercept)`` supplies the fusion nomogram (default:
    :func:`training.report.runfiles.fusion_nomogram_terms`).
    """
    run_dir = Path(run_dir)
    out = run_dir / "figures"
    result = FigureSet()

    def skip(name: str, reason: str) -> None:
        result.skipped[name] = reason
        log.warning("figure %s skipped: %s", name, reason)
        for stale in (out / f"{name}.png", out / f"{name}.svg"):  # from an earlier build of this run
            stale.unlink(missing_ok=True)

    def attempt(name: str, needs: list[Path], make: Callable[[], list[Path]]) -> None:
        missing = [p.relative_to(run_dir).as_posix() for p in needs if not p.is_file()]
        if missing:
            skip(name, f"missing {', '.join(missing)}")
            return
        try:
            result.files[name] = make()
        except (KeyError, ValueError, TypeError, IndexError, AttributeError) as exc:
            skip(name, f"{type(exc).__name__}: {exc}")

    metrics_path, pred_path = run_dir / "metrics.json", run_dir / "predictions.csv"
    metrics = json.loads(metrics_path.read_text()) if metrics_path.is_file() else {"cohorts": {}}
    cohorts = _cohorts(metrics)
    attempt(
        "roc",
        [metrics_path, pred_path],
        lambda: roc_figure(pd.read_csv(pred_path), metrics, out / "roc", cohorts=cohorts),
    )
    for c in cohorts:
        attempt(
            f"roc_{c}",
            [metrics_path, pred_path],
            lambda c=c: roc_figure(pd.read_csv(pred_path), metrics, out / f"roc_{c}", cohorts=[c]),
        )
    attempt(
        "calibration",
        [metrics_path],
        lambda: calibration_figure(metrics, out / "calibration", cohorts=cohorts),
    )
    attempt(
        "decision_curve",
        [metrics_path],
        lambda: decision_figure(metrics, out / "decision_curve", cohorts=cohorts),
    )
    comparison = run_dir / "tables" / "model_comparison.csv"
    attempt(
        "model_comparison",
        [comparison],
        lambda: model_comparison_figure(pd.read_csv(comparison), out / "model_comparison"),
    )
    selection = run_dir / "selection.json"

    def lasso() -> list[Path]:
        sel = json.loads(selection.read_text())
        if "lasso" not in sel:
            raise KeyError("selection.json has no LASSO step")
        return lasso_path_figure(sel, out / "lasso_path")

    attempt("lasso_path", [selection], lasso)

    def nomogram() -> list[Path]:
        if nomogram_terms is None:
            from training.report.runfiles import fusion_nomogram_terms as loader
        else:
            loader = nomogram_terms
        terms, intercept = loader(run_dir)
        return nomogram_figure(terms, intercept, out / "nomogram")

    fusion_model = run_dir / "models" / "fusion.joblib"
    attempt(
        "nomogram",
        [fusion_model if fusion_model.is_file() else run_dir / "tables" / "fusion_coefficients.csv"],
        nomogram,
    )
    return result
