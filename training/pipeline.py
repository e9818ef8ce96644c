"""After feature extraction: selection -> DFSigM -> clinical -> fusion -> predictions -> statistics.

Works on a feature matrix and the cohort table, so it is testable (and leakage-testable) without images.
Every fit sees the TRAINING cohort only; validation cohorts are only ever transformed and scored.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from training import artifacts
from training.cohort import COHORTS, clinical_columns
from training.config import StudyConfig

log = logging.getLogger(__name__)

MODEL_KEYS = ("clinical", "dfsig", "fusion")
MODEL_NAMES = {"clinical": "Clinical model", "dfsig": "DFSigM", "fusion": "Fusion model"}
FEATURE_PREFIX = "dl_"


@dataclass(frozen=True)
class StudyData:
    """The cohort table (one row per patient) aligned with its deep-feature matrix."""

    table: pd.DataFrame
    features: np.ndarray  # [N, 2048]

    @classmethod
    def from_cohort(cls, cohort: pd.DataFrame, features: np.ndarray) -> StudyData:
        if len(cohort) != len(features):
            raise ValueError(f"{len(cohort)} patients but {len(features)} feature rows")
        return cls(cohort.reset_index(drop=True), np.asarray(features, dtype=np.float64))

    @property
    def feature_names(self) -> list[str]:
        return [f"{FEATURE_PREFIX}{i:04d}" for i in range(self.features.shape[1])]

    def mask(self, cohort: str) -> np.ndarray:
        return (self.table["cohort"] == cohort).to_numpy()

    @property
    def y(self) -> np.ndarray:
        return self.table["label"].to_numpy(dtype=np.int64)


class _NullTimer:
    def __call__(self, name: str):
        from contextlib import nullcontext

        return nullcontext()


def fit_and_evaluate(
    data: StudyData, config: StudyConfig, run_dir: Path, *, timer=None, synthetic: bool = False
) -> dict:
    """Fit every model on the training cohort, score all cohorts, evaluate; writes the run's model, table,
    prediction and metrics files. Returns metrics.json's content."""
    from training.clinical import fit_clinical
    from training.fusion import fit_fusion
    from training.models import fit_signature_model, out_of_fold_scores
    from training.selection import fit_selection, selected_indices, selection_summary
    from training.stats.evaluate import evaluate_models
    from training.stats.thresholds import youden_cutoff

    timer = timer or _NullTimer()
    run_dir = Path(run_dir)
    train = data.mask("training")
    if not train.any():
        raise ValueError("the manifest has no 'training' cohort rows")
    y, X = data.y, data.features
    names = data.feature_names

    with timer("selection"):
        selector = fit_selection(X[train], y[train], config.selection, random_state=config.seed)
        idx = selected_indices(selector, X.shape[1])
        summary = selection_summary(selector, names)
        artifacts.write_json(run_dir / "selection.json", summary)
        log.info("selected %d deep features: %s", idx.size, ", ".join(names[i] for i in idx))

    with timer("DFSigM model zoo"):
        dfsig, zoo = fit_signature_model(
            X[train],
            y[train],
            idx,
            [names[i] for i in idx],
            config.models,
            random_state=config.seed,
        )
        artifacts.write_joblib(run_dir / "models" / "dfsig.joblib", dfsig)
        artifacts.write_csv(run_dir / "tables" / "model_comparison.csv", zoo.table, index=False)
        coef = _selected_feature_table(dfsig, summary)
        artifacts.write_csv(run_dir / "tables" / "selected_features.csv", coef, index=False)
        dfsig_scores = dfsig.predict_proba_full(X)

    with timer("clinical model"):
        kinds = clinical_columns(data.table)
        variables = list(config.clinical.variables or kinds)
        categorical = [v for v in variables if kinds.get(v) == "categorical"]
        clinical = fit_clinical(
            data.table.loc[train, variables],
            y[train],
            config.clinical,
            variables=variables,
            categorical=categorical,
        )
        artifacts.write_joblib(run_dir / "models" / "clinical.joblib", clinical.model)
        tables = run_dir / "tables"
        artifacts.write_csv(tables / "clinical_univariable.csv", clinical.univariable, index=False)
        artifacts.write_csv(tables / "clinical_multivariable.csv", clinical.multivariable, index=False)
        artifacts.write_csv(tables / "clinical_final.csv", clinical.final, index=False)
        artifacts.write_json(
            tables / "clinical_selection.json",
            {
                "entered": clinical.entered,
                "predictors": clinical.predictors,
                "steps": clinical.steps,
                "notes": clinical.notes,
            },
        )
        clinical_scores = clinical.model.predict_proba(data.table)

    with timer("fusion model"):
        # out-of-fold signature scores: fusion must not learn from in-sample (optimistic) DFSigM scores
        oof = out_of_fold_scores(dfsig, X[train], y[train], random_state=config.seed)
        fusion = fit_fusion(
            data.table.loc[train].assign(score_dfsig=oof),
            y[train],
            clinical_predictors=clinical.predictors,
            score_col="score_dfsig",
            categorical=[v for v in clinical.predictors if kinds.get(v) == "categorical"],
        )
        artifacts.write_joblib(run_dir / "models" / "fusion.joblib", fusion.model)
        artifacts.write_csv(tables / "fusion_coefficients.csv", fusion.table, index=False)
        fusion_scores = fusion.model.predict_proba(data.table.assign(score_dfsig=dfsig_scores))

    scores = {"clinical": clinical_scores, "dfsig": dfsig_scores, "fusion": fusion_scores}
    predictions = _predictions_table(data.table, scores)
    artifacts.write_csv(run_dir / "predictions.csv", predictions, index=False)

    with timer("statistics"):
        cutoffs = {k: float(youden_cutoff(y[train], s[train]).cutoff) for k, s in scores.items()}
        cohorts = {}
        for name in COHORTS:
            m = data.mask(name)
            if not m.any():
                continue
            cohorts[name] = evaluate_models(
                y[m],
                {k: s[m] for k, s in scores.items()},
                cutoffs=cutoffs,
                cutoff_source="training cohort (Youden)",
                n_boot=config.evaluation.n_bootstrap,
                seed=config.seed,
                hl_groups=config.evaluation.hl_groups,
                source=name,
            )
        metrics = {
            "synthetic": synthetic,
            "cutoffs": cutoffs,
            "cutoff_source": "training",
            "model_names": MODEL_NAMES,
            "dfsig_model": dfsig.model_name,
            "cohorts": cohorts,
        }
        artifacts.write_json(run_dir / "metrics.json", metrics)
        artifacts.write_csv(run_dir / "tables" / "performance.csv", performance_table(metrics), index=False)
        artifacts.write_csv(run_dir / "tables" / "delong.csv", delong_table(metrics), index=False)
    _log_headline(metrics)
    return metrics


def _selected_feature_table(dfsig, summary: dict) -> pd.DataFrame:
    table = pd.DataFrame(
        {
            "feature": dfsig.feature_names,
            "index": dfsig.feature_indices,
            "lasso_coef_scaled": summary["final"]["lasso_coef_scaled"],
        }
    )
    if dfsig.is_linear:
        table["model_coef_scaled"] = dfsig.linear_coef("scaled")[0]
    return table


def _predictions_table(table: pd.DataFrame, scores: dict[str, np.ndarray]) -> pd.DataFrame:
    keep = ["patient_id", "centre", "cohort", "label"]
    out = table[[c for c in keep if c in table.columns]].copy()
    for key in MODEL_KEYS:
        out[key] = scores[key]
    for col in clinical_columns(table):
        out[col] = table[col]
    return out


def performance_table(metrics: dict) -> pd.DataFrame:
    """AUC (95% CI), ACC, SEN, SPE, PPV, NPV, F1 per model and cohort (values straight from metrics.json)."""
    rows = []
    for cohort, result in metrics["cohorts"].items():
        for key, m in result["models"].items():
            row = {"cohort": cohort, "model": key, "auc": m["auc"], "auc_ci_low": m["auc_ci"][0]}
            row["auc_ci_high"] = m["auc_ci"][1]
            for name in ("accuracy", "sensitivity", "specificity", "ppv", "npv", "f1"):
                metric = m["threshold"]["metrics"][name]
                row[name] = metric["value"]
                row[f"{name}_ci_low"], row[f"{name}_ci_high"] = metric["ci"]
            row["cutoff"] = m["threshold"]["cutoff"]
            rows.append(row)
    return pd.DataFrame(rows)


def delong_table(metrics: dict) -> pd.DataFrame:
    rows = []
    for cohort, result in metrics["cohorts"].items():
        for test in result["pairwise_delong"]:
            rows.append({"cohort": cohort, **test})
    return pd.DataFrame(rows)


def _log_headline(metrics: dict) -> None:
    for cohort, result in metrics["cohorts"].items():
        aucs = ", ".join(f"{MODEL_NAMES[k]} {m['auc']:.3f}" for k, m in result["models"].items())
        log.info("%s (n=%d): %s", cohort, result["n"], aucs)
