"""Publication figures from a small real run: 300 dpi PNG + SVG, numbers taken from the run files."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
import pytest
from PIL import Image
from report_fake_run import COHORT_SIZES, make_fake_run
from sklearn.metrics import roc_curve

from training.figures import build_figures
from training.figures.curves import fmt_auc, roc_axes
from training.figures.nomogram import NomogramTerm, nomogram_scales, term_points
from training.report.runfiles import fusion_nomogram_terms

EXPECTED = {
    "roc",
    *(f"roc_{c}" for c in COHORT_SIZES),
    "calibration",
    "decision_curve",
    "model_comparison",
    "lasso_path",
    "nomogram",
}


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_fake_run(tmp_path_factory.mktemp("figures"))


def test_every_figure_is_written_as_png_and_svg(run: Path) -> None:
    figs = build_figures(run)
    assert figs.skipped == {}
    assert set(figs.files) == EXPECTED
    for name, files in figs.files.items():
        assert [f.suffix for f in files] == [".png", ".svg"], name
        assert all(f.parent == run / "figures" and f.stat().st_size > 2000 for f in files), name
        with Image.open(files[0]) as img:
            img.verify()
        with Image.open(files[0]) as img:
            assert img.info["dpi"][0] == pytest.approx(300, abs=1)
        assert files[1].read_text().lstrip().startswith("<?xml") and "<svg" in files[1].read_text()[:2000]


def test_roc_legend_shows_auc_and_ci_from_metrics_and_curves_from_predictions(run: Path) -> None:
    metrics = json.loads((run / "metrics.json").read_text())
    preds = pd.read_csv(run / "predictions.csv")
    cohort = "external_validation"
    frame = preds[preds["cohort"] == cohort]
    fig, ax = plt.subplots()
    try:
        roc_axes(ax, frame, cohort, metrics["cohorts"][cohort], None)
        legend = [t.get_text() for t in ax.get_legend().get_texts()]
        lines = {ln.get_label(): ln for ln in ax.get_lines()}
    finally:
        plt.close(fig)
    entry = metrics["cohorts"][cohort]["models"]["dfsig"]
    text = f"DFSigM: {entry['auc']:.3f} ({entry['auc_ci'][0]:.3f}–{entry['auc_ci'][1]:.3f})"
    assert text in legend and fmt_auc(entry) in text
    fpr, tpr, _ = roc_curve(frame["label"], frame["dfsig"], drop_intermediate=False)
    np.testing.assert_allclose(lines[text].get_xdata(), fpr)
    np.testing.assert_allclose(lines[text].get_ydata(), tpr)


def test_nomogram_points_map_back_to_the_fusion_probability(run: Path) -> None:
    """Total points of a patient -> probability axis must equal the fusion model's prediction."""
    terms, intercept = fusion_nomogram_terms(run)
    coefs = pd.read_csv(run / "tables" / "fusion_coefficients.csv")
    assert [t.name.split(" (")[0] for t in terms] == coefs["term"].tolist()
    preds = pd.read_csv(run / "predictions.csv")
    train = preds[preds["cohort"] == "training"]
    for t in terms[1:]:  # clinical predictors: the training cohort's observed range
        assert (t.low, t.high) == pytest.approx((train[t.name].min(), train[t.name].max()))
    train = train.dropna()
    sc = nomogram_scales(terms, intercept)
    ppl = sc["points_per_lp"]
    for _, row in train.head(5).iterrows():
        x = {t.name: row[t.name] for t in terms[1:]}
        x[terms[0].name] = math.log(row["dfsig"] / (1 - row["dfsig"]))
        total = sum(float(term_points(t, x[t.name], ppl)) for t in terms)
        lp = sc["lp_at_zero"] + total / ppl
        assert 1 / (1 + math.exp(-lp)) == pytest.approx(row["fusion"], rel=1e-6)
    spans = [abs(float(term_points(t, t.high, ppl) - term_points(t, t.low, ppl))) for t in terms]
    assert max(spans) == pytest.approx(100.0)  # the widest predictor spans the 0-100 points scale


def test_nomogram_categorical_levels_get_their_points() -> None:
    term = NomogramTerm("poor differentiation", coef=-0.8, levels={"no": 0.0, "yes": 1.0})
    sc = nomogram_scales([term, NomogramTerm("x", 0.4, 0, 10)], intercept=-1.0)
    pts = term_points(term, np.array([0.0, 1.0]), sc["points_per_lp"])
    assert pts[0] == pytest.approx(0.8 / 4.0 * 100) and pts[1] == pytest.approx(0.0)


def test_missing_inputs_are_skipped_with_a_reason(run: Path, tmp_path: Path) -> None:
    partial = tmp_path / "partial"
    shutil.copytree(run, partial)
    (partial / "tables" / "model_comparison.csv").unlink()
    (partial / "models" / "fusion.joblib").unlink()  # the table alone has no intercept
    figs = build_figures(partial)
    assert figs.skipped == {
        "model_comparison": "missing tables/model_comparison.csv",
        "nomogram": "ValueError: fusion_coefficients.csv has no intercept row and models/fusion.joblib "
        "is missing",
    }
    assert "roc" in figs.files and not (partial / "figures" / "model_comparison.png").exists()
