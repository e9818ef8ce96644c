"""SHAP of the DFSigM head: exact values for linear heads, additivity for every explainer, run outputs."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image
from report_fake_run import make_fake_run
from sklearn.calibration import CalibratedClassifierCV
from sklearn.ensemble import GradientBoostingClassifier, RandomForestClassifier
from sklearn.linear_model import LogisticRegression
from sklearn.neighbors import KNeighborsClassifier
from sklearn.pipeline import Pipeline
from sklearn.preprocessing import StandardScaler
from sklearn.svm import SVC

from core.errors import InputError
from training.explain import compute_shap, run_shap
from training.models import SignatureModel

N_FULL = 30
IDX = np.array([3, 7, 11, 20])


@pytest.fixture(scope="module")
def data() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    rng = np.random.default_rng(0)
    X = rng.normal(size=(90, N_FULL)) * rng.uniform(0.5, 5, N_FULL) + rng.normal(0, 3, N_FULL)
    z = (X - X.mean(axis=0)) / X.std(axis=0)
    y = (1.5 * z[:, 3] - 1.5 * z[:, 7] + rng.normal(0, 1, 90) > 0).astype(int)  # signal in features 0 and 1
    return X[:60], y[:60], X[60:]


def signature(clf, X: np.ndarray, y: np.ndarray, name: str) -> SignatureModel:
    pipe = Pipeline([("scaler", StandardScaler()), ("clf", clf)]).fit(X[:, IDX], y)
    return SignatureModel(IDX, [f"f{i}" for i in IDX], pipe, name, n_input_features=N_FULL)


def _logit(p: np.ndarray) -> np.ndarray:
    return np.log(p / (1 - p))


@pytest.mark.parametrize(
    "clf",
    [
        LogisticRegression(C=0.5),
        CalibratedClassifierCV(SVC(kernel="linear"), method="sigmoid", ensemble=False, cv=3),
    ],
    ids=["lr", "linear_svm"],
)
def test_linear_shap_is_coef_times_centred_scaled_feature(data, clf) -> None:
    X_train, y, X_new = data
    model = signature(clf, X_train, y, "linear")
    values, base, name = compute_shap(model, X_train, X_new)
    coef, intercept = model.linear_coef("scaled")
    scaler = model.pipeline[0]
    z_new = scaler.transform(X_new[:, IDX])
    z_train = scaler.transform(X_train[:, IDX])
    assert name == "LinearExplainer"
    np.testing.assert_allclose(values, coef * (z_new - z_train.mean(axis=0)), rtol=1e-9, atol=1e-9)
    # additivity in the link (log-odds) space: base + sum = the model's own logit of P(label 1)
    np.testing.assert_allclose(base + values.sum(axis=1), _logit(model.predict_proba_full(X_new)), atol=1e-8)
    np.testing.assert_allclose(base, intercept + coef @ z_train.mean(axis=0), atol=1e-9)
    # the two features that carry the signal dominate, with the signs they were generated with
    mean_abs = np.abs(values).mean(axis=0)
    assert set(np.argsort(-mean_abs)[:2]) == {0, 1}
    assert np.corrcoef(values[:, 0], z_new[:, 0])[0, 1] > 0.99
    assert np.corrcoef(values[:, 1], z_new[:, 1])[0, 1] < -0.99


@pytest.mark.parametrize(
    ("clf", "space"),
    [
        (RandomForestClassifier(n_estimators=20, max_depth=3, random_state=0), "probability"),
        (GradientBoostingClassifier(n_estimators=20, max_depth=2, random_state=0), "log-odds"),
    ],
    ids=["random_forest", "gradient_boosting"],
)
def test_tree_shap_adds_up_to_the_model_output(data, clf, space: str) -> None:
    X_train, y, X_new = data
    model = signature(clf, X_train, y, "tree")
    result = compute_shap(model, X_train, X_new)
    p = model.predict_proba_full(X_new)
    expected = p if space == "probability" else _logit(p)
    assert result.explainer_name == "TreeExplainer" and result.output_space == space
    assert result.values.shape == (len(X_new), IDX.size)
    np.testing.assert_allclose(result.base_value + result.values.sum(axis=1), expected, atol=1e-6)
    assert result.additivity_max_error < 1e-6


def test_kernel_shap_for_other_heads_is_bounded_and_additive(data) -> None:
    X_train, y, X_new = data
    model = signature(KNeighborsClassifier(n_neighbors=7), X_train, y, "knn")
    result = compute_shap(model, X_train, X_new[:5], n_background=5, nsamples=64)
    assert result.explainer_name.startswith("KernelExplainer") and "nsamples 64" in result.explainer_name
    assert result.output_space == "probability"
    np.testing.assert_allclose(result.output, model.predict_proba_full(X_new[:5]))
    np.testing.assert_allclose(result.base_value + result.values.sum(axis=1), result.output, atol=1e-6)


def test_compute_shap_rejects_selected_only_features(data) -> None:
    X_train, y, X_new = data
    model = signature(LogisticRegression(), X_train, y, "lr")
    with pytest.raises(InputError, match="full feature matrix"):
        compute_shap(model, X_train, X_new[:, IDX])


def test_run_shap_writes_values_summary_and_figures(tmp_path: Path) -> None:
    run = make_fake_run(tmp_path)
    summary = run_shap(run)
    out = run / "shap"
    table = pd.read_csv(out / "shap_values.csv")
    features = np.load(run / "features" / "features.npz")
    assert len(table) == len(features["ids"])
    shap_cols = [c for c in table.columns if c.startswith("shap_")]
    assert len(shap_cols) == len(summary["mean_abs_shap_training"])
    # the CSV holds the model output (= base + sum): DFSigM probability of predictions.csv, or its logit
    preds = pd.read_csv(run / "predictions.csv").set_index("patient_id").loc[table["patient_id"]]
    out_col = f"output_{summary['output_space']}"
    expected = preds["dfsig"] if summary["output_space"] == "probability" else _logit(preds["dfsig"])
    np.testing.assert_allclose(table[out_col], expected, atol=1e-6)
    np.testing.assert_allclose(table["base_value"] + table[shap_cols].sum(axis=1), table[out_col], atol=1e-6)
    train = table["cohort"] == "training"
    np.testing.assert_allclose(
        [summary["mean_abs_shap_training"][c.removeprefix("shap_")] for c in shap_cols],
        table.loc[train, shap_cols].abs().mean().to_numpy(),
    )
    # waterfalls are the highest- and lowest-risk validation patients
    valid = table[~train]
    names = {v["patient_id"] for v in summary["waterfall_patients"].values()}
    assert names == {
        valid.loc[valid[out_col].idxmax(), "patient_id"],
        valid.loc[valid[out_col].idxmin(), "patient_id"],
    }
    for stem, files in summary["figures"].items():
        assert stem.startswith("shap_") and len(files) == 2
        for f in files:
            assert (out / f).stat().st_size > 1000
        with Image.open(out / files[0]) as img:
            img.verify()
    assert json.loads((out / "shap.json").read_text())["status"] == "ok"


def test_run_explainability_records_a_failed_part_and_keeps_the_other(tmp_path: Path) -> None:
    from training.config import StudyConfig
    from training.explain import run_explainability
    from training.report import build_report

    run = make_fake_run(tmp_path)
    cohort = pd.read_csv(run / "predictions.csv")[["patient_id", "cohort", "label"]]  # no image/mask paths
    result = run_explainability(run, cohort_df=cohort, config=StudyConfig())
    assert result["shap"]["status"] == "ok"
    assert result["cam"]["status"] == "failed" and "image" in result["cam"]["error"]
    assert json.loads((run / "cam" / "cam.json").read_text())["status"] == "failed"
    html = build_report(run).read_text()
    assert "Grad-CAM: failed" in html and "SHAP summary" in html
    off = StudyConfig.model_validate({"report": {"shap": False, "gradcam": False}})
    assert run_explainability(run, cohort_df=cohort, config=off) == {
        "shap": {"status": "disabled"},
        "cam": {"status": "disabled"},
    }
