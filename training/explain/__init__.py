"""Explainability of a finished study run: SHAP of the DFSigM head and Grad-CAM of the full pipeline.

:func:`run_explainability` is what the study calls after the models are fitted; it writes ``shap/`` and
``cam/`` into the run directory, which the report then embeds. A part that fails is logged and recorded
(``status: failed`` with the error) instead of aborting a long run; the report shows it as failed.
"""

from __future__ import annotations

import logging
import traceback
from pathlib import Path
from typing import Any

import joblib
import numpy as np
import pandas as pd

from core.errors import InputError
from training.artifacts import write_csv, write_json
from training.explain.gradcam_panels import cam_panels, safe_name, select_cam_patients
from training.explain.shap_values import ShapResult, compute_shap, shap_figures, shap_frame

__all__ = [
    "ShapResult",
    "cam_panels",
    "compute_shap",
    "run_explainability",
    "run_shap",
    "select_cam_patients",
]

log = logging.getLogger(__name__)

TRAINING = "training"


def _load(run_dir: Path) -> tuple[dict[str, np.ndarray], Any]:
    npz = run_dir / "features" / "features.npz"
    head = run_dir / "models" / "dfsig.joblib"
    for path in (npz, head):
        if not path.is_file():
            raise InputError("missing; the study's feature and model stages must run first", source=str(path))
    with np.load(npz, allow_pickle=False) as data:
        arrays = {k: data[k] for k in ("ids", "X", "cohort", "label")}
    return arrays, joblib.load(head)


def run_shap(run_dir: Path, *, seed: int = 0) -> dict[str, Any]:
    """SHAP for every patient (training cohort as background); CSV, JSON summary and figures in ``shap/``."""
    run_dir = Path(run_dir)
    data, model = _load(run_dir)
    cohorts = data["cohort"].astype(str)
    train = np.flatnonzero(cohorts == TRAINING)
    if train.size == 0:
        raise InputError(f"no {TRAINING!r} patients in features.npz", source=str(run_dir))
    result = compute_shap(model, data["X"][train], data["X"], seed=seed)
    out = run_dir / "shap"
    write_csv(out / "shap_values.csv", shap_frame(result, data["ids"], cohorts, data["label"]), index=False)
    valid = np.flatnonzero(cohorts != TRAINING)
    pool, pool_name = (valid, "validation") if valid.size else (train, "training")
    hi, lo = pool[np.argmax(result.output[pool])], pool[np.argmin(result.output[pool])]
    # ids go into file names: keep them file-system safe (the JSON keeps the real id)
    waterfalls = {
        f"highest_risk_{safe_name(data['ids'][hi])}": int(hi),
        f"lowest_risk_{safe_name(data['ids'][lo])}": int(lo),
    }
    X_scaled = model.pipeline[0].transform(data["X"][:, model.feature_indices])
    figures = shap_figures(result, X_scaled, train_rows=train, waterfall_rows=waterfalls, out_dir=out)
    mean_abs = np.abs(result.values[train]).mean(axis=0)
    summary = {
        "status": "ok",
        "explainer": result.explainer_name,
        "output_space": result.output_space,
        "base_value": result.base_value,
        "additivity_max_error": result.additivity_max_error,
        "model_name": model.model_name,
        "background": f"training cohort (n={train.size}), scaled by the model's StandardScaler",
        "n_explained": len(result.output),
        "mean_abs_shap_training": dict(zip(result.feature_names, map(float, mean_abs))),
        "waterfall_patients": {
            name: {
                "patient_id": str(data["ids"][r]),
                "cohort": str(cohorts[r]),
                "output": float(result.output[r]),
            }
            for name, r in waterfalls.items()
        },
        "waterfall_pool": pool_name,
        "figures": {stem: [p.name for p in paths] for stem, paths in figures.items()},
        "values_csv": "shap_values.csv",
    }
    write_json(out / "shap.json", summary)
    return summary


def _cam_patients(run_dir: Path, cohort_df: pd.DataFrame, per_group: int) -> list[dict[str, Any]]:
    data, model = _load(run_dir)
    missing = [c for c in ("patient_id", "image", "mask") if c not in cohort_df.columns]
    if missing:
        raise InputError(f"cohort table lacks column(s) {missing}", field=",".join(missing))
    scores = model.predict_proba_full(data["X"])
    rows = select_cam_patients(data["ids"].astype(str), data["cohort"], data["label"], scores, per_group)
    by_id = cohort_df.assign(patient_id=cohort_df["patient_id"].astype(str)).set_index("patient_id")
    patients = []
    for r in rows:
        pid = str(data["ids"][r])
        if pid not in by_id.index:
            raise InputError(
                f"patient {pid!r} of features.npz is not in the cohort table", field="patient_id"
            )
        entry = by_id.loc[pid]
        patients.append(
            {
                "patient_id": pid,
                "cohort": str(data["cohort"][r]),
                "label": int(data["label"][r]),
                "image": entry["image"],
                "mask": entry["mask"],
            }
        )
    return patients


def _guarded(name: str, out: Path, fn, *args: Any, **kwargs: Any) -> dict[str, Any]:
    try:
        return fn(*args, **kwargs)
    except Exception as exc:  # recorded and shown in the report; the fitted run stays usable
        log.exception("%s failed", name)
        status = {
            "status": "failed",
            "error": f"{type(exc).__name__}: {exc}",
            "trace": traceback.format_exc(),
        }
        write_json(out, status)
        return status


def _run_cam(
    run_dir: Path, cohort_df: pd.DataFrame, per_group: int, preprocess_config: Any
) -> dict[str, Any]:
    patients = _cam_patients(run_dir, cohort_df, per_group)
    paths = cam_panels(run_dir, patients, run_dir / "cam", preprocess_config=preprocess_config)
    return {"status": "ok", "n_patients": len(patients), "files": [p.name for p in paths]}


def run_explainability(run_dir: Path, *, cohort_df: pd.DataFrame, config: Any = None) -> dict[str, Any]:
    """SHAP (``shap/``) and Grad-CAM panels (``cam/``) for a run whose models are fitted.

    ``cohort_df`` is the study's cohort table (``patient_id``, ``image``, ``mask`` resolvable paths);
    ``config`` a :class:`training.config.StudyConfig` (``report.shap``, ``report.gradcam``,
    ``report.cam_patients_per_group``, ``seed``, ``preprocessing``); None means all defaults.
    """
    run_dir = Path(run_dir)
    report = getattr(config, "report", None)
    seed = int(getattr(config, "seed", 0))
    per_group = int(getattr(report, "cam_patients_per_group", 1))
    result: dict[str, Any] = {}
    if getattr(report, "shap", True):
        result["shap"] = _guarded("SHAP", run_dir / "shap" / "shap.json", run_shap, run_dir, seed=seed)
    else:
        result["shap"] = {"status": "disabled"}
    if getattr(report, "gradcam", True) and per_group > 0:
        result["cam"] = _guarded(
            "Grad-CAM",
            run_dir / "cam" / "cam.json",
            _run_cam,
            run_dir,
            cohort_df,
            per_group,
            getattr(config, "preprocessing", None),
        )
    else:
        result["cam"] = {"status": "disabled"}
    return result
