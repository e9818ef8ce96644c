"""A small but real run directory for the explain, figure and report tests.

The model, table, prediction and metrics files are written by the study's own post-extraction stage
(``training.pipeline.fit_and_evaluate``) on random "deep features" and a random clinical table; only the
files of the extraction stage (features.npz, run.json, extractor.json) are written here, as
``training.study`` writes them. Nothing is hard-coded: tests read expected numbers from the files.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd

from training.config import StudyConfig
from training.pipeline import StudyData, fit_and_evaluate

COHORT_SIZES = {"training": 60, "internal_validation": 30, "external_validation": 30}
N_FEATURES = 40

CONFIG = StudyConfig.model_validate(
    {
        "selection": {"max_features": 5},
        "models": {"candidates": ["lr", "linear_svm"], "cv_repeats": 1},
        "evaluation": {"n_bootstrap": 40},
        "clinical": {"p_enter": 0.2, "p_keep": 0.2},
    }
)


def cohort_table(rng: np.random.Generator) -> pd.DataFrame:
    cohorts = np.concatenate([[c] * n for c, n in COHORT_SIZES.items()])
    n = cohorts.size
    y = rng.integers(0, 2, n)
    y[:4] = [0, 1, 0, 1]
    table = pd.DataFrame(
        {
            "patient_id": [f"P{i:03d}" for i in range(n)],
            "centre": np.where(cohorts == "external_validation", "C", "A"),
            "cohort": cohorts,
            "label": y,
            "age": np.round(rng.normal(62, 9, n)),
            "sex": rng.choice(["M", "F"], n, p=[0.7, 0.3]),
            "differentiation": np.where(rng.random(n) < 0.3 + 0.3 * y, "poor", "moderate"),
            "cea": np.round(np.exp(rng.normal(1.2 + 0.6 * y, 0.8)), 2),
            "nic": np.round(rng.normal(0.3 + 0.05 * y, 0.06, n), 3),
        }
    )
    table.loc[rng.random(n) < 0.08, "cea"] = np.nan
    table.loc[rng.random(n) < 0.05, "differentiation"] = np.nan
    return table


def make_fake_run(root: Path, *, seed: int = 0, synthetic: bool = True, random_weights: bool = True) -> Path:
    rng = np.random.default_rng(seed)
    run = Path(root) / "run"
    (run / "models").mkdir(parents=True)
    (run / "features").mkdir()
    table = cohort_table(rng)
    y = table["label"].to_numpy()
    X = rng.normal(size=(len(table), N_FEATURES)).astype(np.float32)
    X[:, :5] += 0.9 * y[:, None]  # five informative deep features
    np.savez(
        run / "features" / "features.npz",
        ids=table["patient_id"].to_numpy(dtype=str),
        X=X,
        cohort=table["cohort"].to_numpy(dtype=str),
        label=y.astype(np.int64),
    )
    fit_and_evaluate(StudyData.from_cohort(table, X), CONFIG, run, synthetic=synthetic)
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
        "data_hashes": {"manifest": "0" * 64, **{f"P00{i}/image": "1" * 64 for i in range(3)}},
        "timings_s": {"features": 1.5, "models": 2.0},
        "config_sha256": "f" * 64,
    }
    (run / "run.json").write_text(json.dumps(run_info, indent=1))
    (run / "models" / "extractor.json").write_text(json.dumps({"weights": weights}))
    return run
