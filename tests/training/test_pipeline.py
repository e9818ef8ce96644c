"""The post-extraction study pipeline on a synthetic feature matrix: real fits, real statistics, no images."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest

from training.config import StudyConfig
from training.pipeline import StudyData, fit_and_evaluate

N_FEATURES = 64


def _cohort(seed: int, n: int = 150) -> tuple[pd.DataFrame, np.ndarray]:
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 2, n)
    X = rng.normal(size=(n, N_FEATURES))
    X[:, :4] += 1.2 * y[:, None]  # four informative deep features
    cohort = np.array(["training"] * 80 + ["internal_validation"] * 35 + ["external_validation"] * 35)
    table = pd.DataFrame(
        {
            "patient_id": [f"P{i:03d}" for i in range(n)],
            "centre": np.where(cohort == "external_validation", "B", "A"),
            "cohort": cohort,
            "label": y,
            "age": rng.normal(62, 10, n).round(),
            "sex": rng.choice(["M", "F"], n),
            "cea": np.exp(rng.normal(1 + 0.6 * y, 1.0)),
        }
    )
    return table, X


def _config(**models) -> StudyConfig:
    return StudyConfig.model_validate(
        {
            "models": {"candidates": ["lr", "random_forest"], "cv_splits": 3, "cv_repeats": 1, **models},
            "evaluation": {"n_bootstrap": 50},
        }
    )


def test_fit_and_evaluate_writes_consistent_run_files(tmp_path):
    table, X = _cohort(0)
    metrics = fit_and_evaluate(StudyData.from_cohort(table, X), _config(), tmp_path)

    on_disk = json.loads((tmp_path / "metrics.json").read_text())
    assert on_disk["cohorts"].keys() == {"training", "internal_validation", "external_validation"}
    preds = pd.read_csv(tmp_path / "predictions.csv")
    assert list(preds["patient_id"]) == list(table["patient_id"])
    for cohort, result in metrics["cohorts"].items():
        sub = preds[preds["cohort"] == cohort]
        assert result["n"] == len(sub)
        from sklearn.metrics import roc_auc_score

        assert result["models"]["dfsig"]["auc"] == pytest.approx(roc_auc_score(sub["label"], sub["dfsig"]))
    # the planted signal is found and survives to validation
    assert metrics["cohorts"]["internal_validation"]["models"]["dfsig"]["auc"] > 0.75
    selected = pd.read_csv(tmp_path / "tables" / "selected_features.csv")
    assert 1 <= len(selected) <= 12
    assert set(range(4)) & set(selected["index"])
    perf = pd.read_csv(tmp_path / "tables" / "performance.csv")
    row = perf[(perf.cohort == "training") & (perf.model == "fusion")].iloc[0]
    assert row["auc"] == pytest.approx(metrics["cohorts"]["training"]["models"]["fusion"]["auc"])
    # the cut-off used everywhere is the training cohort's
    cut = metrics["cutoffs"]["dfsig"]
    assert metrics["cohorts"]["external_validation"]["models"]["dfsig"]["threshold"]["cutoff"] == cut


def test_same_seed_same_metrics(tmp_path):
    table, X = _cohort(1)
    a = fit_and_evaluate(StudyData.from_cohort(table, X), _config(), tmp_path / "a")
    b = fit_and_evaluate(StudyData.from_cohort(table, X), _config(), tmp_path / "b")
    assert json.dumps(a, sort_keys=True) == json.dumps(b, sort_keys=True)


@pytest.mark.slow
def test_permuted_training_labels_give_chance_validation_auc(tmp_path):
    """Leakage check over the whole chain: with training labels permuted, nothing can be learned."""
    aucs = []
    for seed in range(4):
        table, X = _cohort(10 + seed)
        train = table["cohort"] == "training"
        rng = np.random.default_rng(seed)
        table.loc[train, "label"] = rng.permutation(table.loc[train, "label"].to_numpy())
        metrics = fit_and_evaluate(StudyData.from_cohort(table, X), _config(), tmp_path / str(seed))
        for cohort in ("internal_validation", "external_validation"):
            aucs.append(metrics["cohorts"][cohort]["models"]["dfsig"]["auc"])
    assert abs(float(np.mean(aucs)) - 0.5) < 0.1, aucs
