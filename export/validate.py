"""Parity of each exported variant with the torch + scikit-learn reference pipeline, per validation cohort.

A variant is published only if, on every validation cohort, max |Δprobability| against the reference is
within its tolerance (fp32: 1e-4; fp16/int8: 2e-2) and, for reduced precision, |ΔAUC| <= 0.01. The table
(one row per variant x cohort) is written to ``validation.csv`` in the export directory.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch

from export.graph import INPUT, PROBABILITY

log = logging.getLogger(__name__)

# variant -> (max |Δprobability|, max |ΔAUC| or None)
TOLERANCES: dict[str, tuple[float, float | None]] = {
    "fp32": (1e-4, None),
    "fp16": (2e-2, 0.01),
    "int8": (2e-2, 0.01),
}


@dataclass(frozen=True)
class CohortSlices:
    """Network inputs of the patients a variant is checked (or calibrated) on."""

    ids: np.ndarray  # [N] str
    slices: np.ndarray  # [N,S,3,H,W] float32
    labels: np.ndarray  # [N] int
    cohorts: np.ndarray  # [N] str

    def __post_init__(self) -> None:
        n = len(self.ids)
        if not (self.slices.shape[0] == len(self.labels) == len(self.cohorts) == n):
            raise ValueError(
                f"ids {n}, slices {self.slices.shape[0]}, labels {len(self.labels)}, "
                f"cohorts {len(self.cohorts)}"
            )

    def subset(self, mask: np.ndarray) -> CohortSlices:
        return CohortSlices(self.ids[mask], self.slices[mask], self.labels[mask], self.cohorts[mask])


def reference_probabilities(
    extractor: torch.nn.Module,
    feature_indices: np.ndarray,
    pipeline: Any,
    slices: np.ndarray,
    *,
    batch_patients: int = 4,
) -> tuple[np.ndarray, np.ndarray]:
    """(P(class 1) [N], pooled features [N,2048]) from torch (fp32, eval) + scikit-learn (float64).

    The same computation the study used: per-slice GAP of layer4, mean over slices, select, scale, classify.
    """
    from core.network import PatientFeatureNet
    from export.graph import positive_class_index

    net = PatientFeatureNet(extractor.eval()).eval()
    feats = []
    with torch.no_grad():
        for i in range(0, len(slices), batch_patients):
            feats.append(net(torch.from_numpy(np.ascontiguousarray(slices[i : i + batch_patients]))).numpy())
    pooled = np.concatenate(feats).astype(np.float32)
    col = positive_class_index(pipeline.steps[-1][1] if hasattr(pipeline, "steps") else pipeline)
    selected = pooled[:, np.asarray(feature_indices, dtype=np.int64)].astype(np.float64)
    return pipeline.predict_proba(selected)[:, col], pooled


def run_graph(
    path: Path, slices: np.ndarray, *, providers: Sequence[Any] = ("CPUExecutionProvider",), batch: int = 4
) -> tuple[np.ndarray, str, float]:
    """(probabilities [N], provider used, seconds) of a graph file, through the runtime's session."""
    from core.runtime import make_session

    session = make_session(path, list(providers))
    t0 = time.perf_counter()
    probs = [
        session.run([PROBABILITY], {INPUT: np.ascontiguousarray(slices[i : i + batch], dtype=np.float32)})[0]
        for i in range(0, len(slices), batch)
    ]
    return np.concatenate(probs), session.get_providers()[0], time.perf_counter() - t0


def _auc(labels: np.ndarray, scores: np.ndarray) -> float:
    from sklearn.metrics import roc_auc_score

    if len(np.unique(labels)) < 2:
        return float("nan")
    return float(roc_auc_score(labels, scores))


def compare(
    variant: str,
    probabilities: np.ndarray,
    reference: np.ndarray,
    data: CohortSlices,
    *,
    provider: str = "",
    seconds: float = float("nan"),
) -> pd.DataFrame:
    """One row per cohort: max |Δp|, AUCs, |ΔAUC|, tolerances and the verdict."""
    tol_p, tol_auc = TOLERANCES[variant]
    rows = []
    for cohort in sorted(set(data.cohorts.tolist())):
        m = data.cohorts == cohort
        diff = float(np.max(np.abs(probabilities[m].astype(np.float64) - reference[m])))
        auc_ref, auc_var = _auc(data.labels[m], reference[m]), _auc(data.labels[m], probabilities[m])
        d_auc = abs(auc_var - auc_ref)
        ok_p = diff <= tol_p
        ok_auc = tol_auc is None or not np.isfinite(d_auc) or d_auc <= tol_auc
        rows.append(
            {
                "variant": variant,
                "cohort": cohort,
                "n": int(m.sum()),
                "max_abs_diff": diff,
                "tolerance_prob": tol_p,
                "auc_reference": auc_ref,
                "auc_variant": auc_var,
                "abs_delta_auc": d_auc,
                "tolerance_auc": tol_auc if tol_auc is not None else float("nan"),
                "passed": bool(ok_p and ok_auc),
                "provider": provider,
                "seconds": seconds,
            }
        )
    table = pd.DataFrame(rows)
    verdict = "passed" if table["passed"].all() else "FAILED"
    log.info("variant %s %s: max |Δp| %.2e on %s", variant, verdict, table["max_abs_diff"].max(), provider)
    return table


def summarise(table: pd.DataFrame) -> dict[str, Any]:
    """Worst case over cohorts, for the manifest."""
    return {
        "passed": bool(table["passed"].all()),
        "max_abs_diff": float(table["max_abs_diff"].max()),
        "max_abs_delta_auc": float(np.nanmax(table["abs_delta_auc"]))
        if table["abs_delta_auc"].notna().any()
        else None,
        "cohorts": table["cohort"].tolist(),
        "n": int(table["n"].sum()),
        "provider": str(table["provider"].iloc[0]),
    }


def write_validation_csv(tables: Sequence[pd.DataFrame], path: Path) -> Path:
    """Atomic write of the concatenated table."""
    from core.files import atomic_path

    frame = pd.concat(tables, ignore_index=True)
    with atomic_path(path, mode=0o644) as tmp:  # 0644: the service may run as another user
        frame.to_csv(tmp, index=False)
    return path
