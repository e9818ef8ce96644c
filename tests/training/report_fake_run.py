"""A small but real run directory for the figure and report tests.

Every file is produced by the project's own code on random data (selection, model zoo, statistics), in
the layout of docs/architecture.md; nothing is hard-coded, so tests read expected numbers from the files.
"""

from __future__ import annotations

import json
from pathlib import Path

import joblib
import numpy as np
import pandas as pd
import statsmodels.api as sm
from sklearn.linear_model import LogisticRegression

from training.models import fit_signature_model
from training.selection import fit_selection, selected_indices, selection_summary
from training.stats import evaluate_models, youden_cutoff

COHORT_SIZES = {"training": 60, "internal_validation": 30, "external_validation": 30}
N_FEATURES = 40


def _clinical(rng: np.random.Generator, y: np.ndarray) -> pd.DataFrame:
    n = y.size
    frame = pd.DataFrame(
        {
            "age": np.round(rng.normal(62, 9, n)),
            "sex": rng.choice(["male", "female"], n, p=[0.7, 0.3]),
            "differentiation": np.where(rng.random(n) < 0.4 + 0.2 * y, "poor", "well/moderate"),
            "cea": np.round(np.exp(rng.normal(1.2 + 0.4 * y, 0.8)), 2),
            "ct_stage": rng.integers(1, 5, n),
        }
    )
    frame.loc[rng.random(n) < 0.08, "cea"] = np.nan
    frame.loc[rng.random(n) < 0.05, "differentiation"] = np.nan
    return frame


def _logit_table(X: pd.DataFrame, y: np.ndarray) -> pd.DataFrame:
    fit = sm.Logit(y, sm.add_constant(X, has_constant="add")).fit(disp=0)
    ci = np.exp(fit.conf_int())
    return pd.DataFrame(
        {
            "variable": fit.params.index,
            "OR": np.exp(fit.params.values),
            "ci_low": ci[0].values,
            "ci_high": ci[1].values,
            "p_value": fit.pvalues.values,
        }
    )


def make_fake_run(root: Path, *, seed: int = 0, synthetic: bool = True, random_weights: bool = True) -> Path:
    rng = np.random.default_rng(seed)
    run = Path(root) / "run"
    (run / "tables").mkdir(parents=True)
    (run / "models").mkdir()
    (run / "features").mkdir()
    cohorts = np.concatenate([[c] * n for c, n in COHORT_SIZES.items()])
    n = cohorts.size
    y = rng.integers(0, 2, n)
    y[:4] = [0, 1, 0, 1]
    X = rng.normal(size=(n, N_FEATURES)).astype(np.float32)
    X[:, :5] += 0.9 * y[:, None]  # five informative deep features
    ids = np.array([f"P{i:03d}" for i in range(n)])
    train = cohorts == "training"
    names = [f"df_{i:04d}" for i in range(N_FEATURES)]

    selector = fit_selection(X[train], y[train], {"max_features": 5, "lasso_Cs": 8}, random_state=seed)
    idx = selected_indices(selector, N_FEATURES)
    (run / "selection.json").write_text(json.dumps(selection_summary(selector, names), indent=1))
    model, zoo = fit_signature_model(
        X[train], y[train], idx, [names[i] for i in idx], {"candidates": ["lr", "knn"], "cv_repeats": 1}
    )
    zoo.table.to_csv(run / "tables" / "model_comparison.csv", index=False)
    pd.DataFrame({"feature": model.feature_names, "index": model.feature_indices}).to_csv(
        run / "tables" / "selected_features.csv", index=False
    )
    joblib.dump(model, run / "models" / "dfsig.joblib")
    np.savez(run / "features" / "features.npz", ids=ids, X=X, cohort=cohorts, label=y)

    clin = _clinical(rng, y)
    design = pd.DataFrame({"age": clin["age"], "cea": clin["cea"].fillna(clin["cea"][train].median())})
    clinical = LogisticRegression().fit(design[train], y[train])
    dfsig = model.predict_proba_full(X)
    p_clin = clinical.predict_proba(design)[:, 1]
    fusion_x = pd.DataFrame({"dfsig_logit": np.log(dfsig / (1 - dfsig)), "age": design["age"]})
    fusion = LogisticRegression().fit(fusion_x[train], y[train])
    p_fusion = fusion.predict_proba(fusion_x)[:, 1]
    _logit_table(design[train].iloc[:, :1], y[train]).to_csv(
        run / "tables" / "clinical_univariable.csv", index=False
    )
    _logit_table(design[train], y[train]).to_csv(run / "tables" / "clinical_multivariable.csv", index=False)
    pd.DataFrame(
        {"term": ["Intercept", "dfsig_logit", "age"], "coef": [fusion.intercept_[0], *fusion.coef_[0]]}
    ).to_csv(run / "tables" / "fusion_coefficients.csv", index=False)

    preds = pd.DataFrame(
        {"patient_id": ids, "centre": np.where(cohorts == "external_validation", "C", "A"), "cohort": cohorts,
         "label": y, "clinical": p_clin, "dfsig": dfsig, "fusion": p_fusion}
    )  # fmt: skip
    preds = pd.concat([preds, clin], axis=1)
    preds.to_csv(run / "predictions.csv", index=False)
    scores = {"clinical": p_clin, "dfsig": dfsig, "fusion": p_fusion}
    cutoffs = {m: youden_cutoff(y[train], s[train]).cutoff for m, s in scores.items()}
    metrics = {
        "synthetic": synthetic,
        "cutoffs": cutoffs,
        "cutoff_source": "training",
        "cohorts": {
            c: evaluate_models(
                y[cohorts == c],
                {m: s[cohorts == c] for m, s in scores.items()},
                cutoffs=cutoffs,
                cutoff_source="training",
                n_boot=40,
                seed=seed,
            )
            for c in COHORT_SIZES
        },
    }
    (run / "metrics.json").write_text(json.dumps(metrics, indent=1))
    weights = (
        {"kind": "random", "spec": "random", "seed": 0, "bn_recalibrated": True}
        if random_weights
        else {"kind": "imagenet", "spec": "imagenet", "sha256": "ab" * 32}
    )
    run_info = {
        "run_id": "20250101T000000Z-fake",
        "started": "2025-01-01T00:00:00+00:00",
        "finished": "2025-01-01T00:05:00+00:00",
        "seed": seed,
        "manifest": "/data/manifest.csv",
        "synthetic": synthetic,
        "weights": weights,
        "versions": {"python": "3.11", "numpy": np.__version__, "pandas": pd.__version__},
        "data_hashes": {"manifest": "0" * 64, **{f"{i}/image": "1" * 64 for i in ids[:3]}},
        "timings_s": {"features": 1.5, "models": 2.0},
        "config_sha256": "f" * 64,
    }
    (run / "run.json").write_text(json.dumps(run_info, indent=1))
    (run / "models" / "extractor.json").write_text(json.dumps({"weights": weights}))
    return run
