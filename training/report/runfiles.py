"""Read a finished run directory (see docs/architecture.md, "Training run directory") for the report.

Only reading happens here: absent optional files are ``None`` and listed in ``missing``, so every report
section can say "not available (file missing)" instead of failing or silently dropping content.
"""

from __future__ import annotations

import json
import logging
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from core.errors import InputError
from training.figures.nomogram import NomogramTerm

log = logging.getLogger(__name__)

TABLES = (
    "clinical_univariable",
    "clinical_multivariable",
    "fusion_coefficients",
    "model_comparison",
    "selected_features",
    "performance",
    "delong",
)
#: predictions.csv columns that are not clinical characteristics.
NON_CLINICAL = {"patient_id", "centre", "cohort", "label", "clinical", "dfsig", "fusion", "image", "mask"}


@dataclass
class RunFiles:
    run_dir: Path
    run: dict[str, Any] | None = None
    metrics: dict[str, Any] | None = None
    predictions: pd.DataFrame | None = None
    selection: dict[str, Any] | None = None
    config_text: str | None = None
    extractor: dict[str, Any] | None = None
    tables: dict[str, pd.DataFrame] = field(default_factory=dict)
    shap: dict[str, Any] | None = None
    cam: dict[str, Any] | None = None
    missing: list[str] = field(default_factory=list)

    @property
    def synthetic(self) -> bool:
        return bool((self.run or {}).get("synthetic") or (self.metrics or {}).get("synthetic"))

    @property
    def weights(self) -> dict[str, Any]:
        return (self.run or {}).get("weights") or (self.extractor or {}).get("weights") or {}

    @property
    def random_weights(self) -> bool:
        return self.weights.get("kind") == "random"

    def clinical_columns(self) -> list[str]:
        if self.predictions is None:
            return []
        return [c for c in self.predictions.columns if c not in NON_CLINICAL]


def _json(path: Path, missing: list[str], run_dir: Path) -> dict[str, Any] | None:
    if not path.is_file():
        missing.append(path.relative_to(run_dir).as_posix())
        return None
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise InputError(f"not valid JSON ({exc})", source=str(path)) from exc


def load_run(run_dir: Path) -> RunFiles:
    """Everything the report reads; raises only when the directory itself or metrics.json is unusable."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise InputError("run directory not found", source=str(run_dir))
    rf = RunFiles(run_dir=run_dir)
    m = rf.missing
    rf.run = _json(run_dir / "run.json", m, run_dir)
    rf.metrics = _json(run_dir / "metrics.json", m, run_dir)
    rf.selection = _json(run_dir / "selection.json", m, run_dir)
    rf.extractor = _json(run_dir / "models" / "extractor.json", m, run_dir)
    rf.shap = _json(run_dir / "shap" / "shap.json", m, run_dir)
    rf.cam = _json(run_dir / "cam" / "cam.json", m, run_dir)
    pred = run_dir / "predictions.csv"
    if pred.is_file():
        rf.predictions = pd.read_csv(pred, dtype={"patient_id": str})
    else:
        m.append("predictions.csv")
    cfg = run_dir / "config.yaml"
    rf.config_text = cfg.read_text() if cfg.is_file() else None
    for name in TABLES:
        path = run_dir / "tables" / f"{name}.csv"
        if path.is_file():
            rf.tables[name] = pd.read_csv(path)
        else:
            m.append(f"tables/{name}.csv")
    if rf.metrics is not None and "cohorts" not in rf.metrics:
        raise InputError("metrics.json has no 'cohorts'", source=str(run_dir / "metrics.json"))
    if m:
        log.info("report: not in the run: %s", ", ".join(m))
    return rf


# -------------------------------------------------------------------------------------------- nomogram

_NAME_COLS = ("term", "variable", "predictor", "name", "feature")
_COEF_COLS = ("coef", "coefficient", "beta", "estimate", "log_odds")
_INTERCEPT = {"intercept", "const", "(intercept)", "constant"}


def _pick(columns: list[str], wanted: tuple[str, ...]) -> str | None:
    lower = {c.lower(): c for c in columns}
    return next((lower[w] for w in wanted if w in lower), None)


def fusion_nomogram_terms(run_dir: Path) -> tuple[list[NomogramTerm], float]:
    """Nomogram terms and intercept of the run's fusion model.

    ``models/fusion.joblib`` (a :class:`training.fusion.FusionModel`) through :func:`training.fusion.nomogram`
    when present (training-cohort ranges, categorical levels, missing indicators); otherwise
    :func:`nomogram_terms_from_table`.
    """
    path = Path(run_dir) / "models" / "fusion.joblib"
    if not path.is_file():
        return nomogram_terms_from_table(run_dir)
    import joblib

    from training.fusion import nomogram

    model = joblib.load(path)
    nom = nomogram(model)
    score_term = getattr(model, "score_term", None)
    transform = getattr(model, "score_transform", None)
    terms, lowest = [], 0.0
    for v in nom.variables:
        contrib = np.asarray(v["coef_contribution"], dtype=float)
        lowest += float(contrib.min())
        name = str(v["name"])
        if name == score_term and transform:
            name = f"{name} (DFSigM {'log-odds' if transform == 'logit' else 'probability'})"
        if v["kind"] == "continuous":
            values = np.asarray(v["values"], dtype=float)
            span = float(values[-1] - values[0])
            slope = float(contrib[-1] - contrib[0]) / span if span else 0.0
            terms.append(NomogramTerm(name=name, coef=slope, low=float(values[0]), high=float(values[-1])))
        else:
            terms.append(NomogramTerm(name=name, coef=1.0, levels=dict(zip(map(str, v["labels"]), contrib))))
    return terms, float(nom.lp_at_zero) - lowest


def nomogram_terms_from_table(run_dir: Path) -> tuple[list[NomogramTerm], float]:
    """Nomogram terms of the fusion model from ``tables/fusion_coefficients.csv`` (needs an intercept row).

    Ranges of numeric predictors are the training cohort's observed range in ``predictions.csv`` (the
    column of that name, or ``logit(dfsig)`` for a DFSigM log-odds term); 0/1 terms (dummies) become
    two-level categories.
    """
    run_dir = Path(run_dir)
    table = pd.read_csv(run_dir / "tables" / "fusion_coefficients.csv")
    cols = list(table.columns)
    name_col = _pick(cols, _NAME_COLS) or cols[0]
    coef_col = _pick(cols, _COEF_COLS)
    if coef_col is None:
        raise KeyError(f"fusion_coefficients.csv has no coefficient column among {cols}")
    pred = run_dir / "predictions.csv"
    train = None
    if pred.is_file():
        frame = pd.read_csv(pred)
        train = frame[frame["cohort"] == "training"] if "cohort" in frame else frame
    intercept, terms = None, []
    for name, coef in zip(table[name_col].astype(str), table[coef_col].astype(float)):
        if name.strip().lower() in _INTERCEPT:
            intercept = float(coef)
            continue
        if not math.isfinite(coef):
            raise ValueError(f"fusion coefficient of {name!r} is not finite")
        values = _training_values(name, train)
        if values is None or set(np.unique(values)) <= {0.0, 1.0}:
            terms.append(NomogramTerm(name=name, coef=float(coef), levels={"no": 0.0, "yes": 1.0}))
        else:
            terms.append(
                NomogramTerm(name=name, coef=float(coef), low=float(values.min()), high=float(values.max()))
            )
    if not terms:
        raise ValueError("fusion_coefficients.csv lists no predictors")
    if intercept is None:
        raise ValueError("fusion_coefficients.csv has no intercept row and models/fusion.joblib is missing")
    return terms, intercept


def _training_values(name: str, train: pd.DataFrame | None) -> np.ndarray | None:
    if train is None:
        return None
    if name in train.columns and pd.api.types.is_numeric_dtype(train[name]):
        v = train[name].dropna().to_numpy(dtype=float)
        return v if v.size else None
    if re.search(r"dfsig|rad.?score|signature", name, re.I) and "dfsig" in train.columns:
        p = np.clip(train["dfsig"].to_numpy(dtype=float), 1e-6, 1 - 1e-6)
        return np.log(p / (1 - p)) if re.search(r"logit|log.?odds|score", name, re.I) else p
    return None
