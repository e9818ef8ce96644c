"""Helpers for the export tests (tiny inputs, a stand-in extractor, a run directory writer)."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import joblib
import numpy as np
import torch
from sklearn.pipeline import Pipeline

from bench.common import synthetic_slices
from core.preprocessing import PreprocessConfig

S = 2
N_TRAIN, N_VAL = 8, 4
FEATURES = np.array([3, 77, 150, 301, 512, 640, 777, 1024, 1200, 1500, 1800, 2047])


# Structured [n,s,3,size,size] inputs (Gaussian blobs + noise), shared with the benchmarks: patients then
# differ in texture the way images do, so the head has signal to fit.
blob_slices = synthetic_slices


@dataclass
class Trained:
    extractor: torch.nn.Module
    pipeline: Pipeline
    indices: np.ndarray
    slices: np.ndarray  # [N,S,3,224,224]
    pooled: np.ndarray  # [N,2048]
    labels: np.ndarray
    cohorts: np.ndarray


def write_run(run_dir: Path, t: Trained) -> Path:
    """A training run directory with the files `pdl1 export` reads (architecture.md), slices kept."""
    from training.models import SignatureModel

    (run_dir / "models").mkdir(parents=True)
    (run_dir / "features" / "slices").mkdir(parents=True)
    ids = np.array([f"P{i:03d}" for i in range(len(t.labels))])
    torch.save(t.extractor.state_dict(), run_dir / "models" / "extractor.pt")
    config = PreprocessConfig(n_slices=S).model_dump(mode="json")
    weights = {"kind": "random", "spec": "random", "seed": 0, "bn_recalibrated": True}
    info = {"weights": weights, "preprocessing": config}
    (run_dir / "models" / "extractor.json").write_text(json.dumps(info))
    model = SignatureModel(
        feature_indices=t.indices,
        feature_names=[f"deep_{i}" for i in t.indices],
        pipeline=t.pipeline,
        model_name="lr",
        n_input_features=2048,
    )
    joblib.dump(model, run_dir / "models" / "dfsig.joblib")
    with open(run_dir / "features" / "features.npz", "wb") as fh:
        np.savez(fh, ids=ids, X=t.pooled.astype(np.float32), cohort=t.cohorts, label=t.labels)
    for pid, arr in zip(ids, t.slices):
        np.save(run_dir / "features" / "slices" / f"{pid}.npy", arr)
    run_info = {"run_id": "test-run-1", "synthetic": True, "manifest": None}
    (run_dir / "run.json").write_text(json.dumps(run_info))
    (run_dir / "metrics.json").write_text(json.dumps({"synthetic": True, "cutoffs": {"dfsig": 0.5}}))
    return run_dir


class TinyExtractor(torch.nn.Module):
    """A cheap stand-in with ResNet50Extractor's interface (feature_maps -> [B,2048,7,7]) for tests of
    graph mechanics that do not need ResNet-50 itself."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.body = torch.nn.Sequential(
            torch.nn.Conv2d(3, 16, 7, stride=8, padding=3),
            torch.nn.BatchNorm2d(16),
            torch.nn.ReLU(),
            torch.nn.AvgPool2d(4),
            torch.nn.Conv2d(16, 2048, 1),
            torch.nn.ReLU(),
        )

    def feature_maps(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.feature_maps(x).mean(dim=(2, 3))
