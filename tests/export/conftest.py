"""Shared, session-scoped fixtures for the export tests: a random-weight ResNet-50 (BN statistics
re-estimated on a few structured slices, as the study does for random weights), a head fitted on its
features, and a minimal training run directory in the layout of docs/architecture.md.

Kept tiny (S=2 slices, a dozen patients): ResNet-50 at 224x224 costs ~0.1-0.3 s per slice on this CPU.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from export_fixtures import FEATURES, N_TRAIN, N_VAL, S, TinyExtractor, Trained, blob_slices, write_run
from sklearn.linear_model import LogisticRegression
from sklearn.pipeline import Pipeline
from sklearn.preprocessing import StandardScaler

from core.network import PatientFeatureNet, build_extractor, recalibrate_batchnorm


@pytest.fixture(scope="session")
def trained() -> Trained:
    torch.manual_seed(0)
    extractor, _ = build_extractor("random", seed=0)
    recalibrate_batchnorm(extractor, [torch.from_numpy(blob_slices(2, S, seed=99).reshape(-1, 3, 224, 224))])
    slices = blob_slices(N_TRAIN + N_VAL, S, seed=1)
    with torch.no_grad():
        pooled = PatientFeatureNet(extractor).eval()(torch.from_numpy(slices)).numpy()
    labels = np.array([0, 1] * ((N_TRAIN + N_VAL) // 2))
    cohorts = np.array(["training"] * N_TRAIN + ["internal_validation"] * N_VAL)
    pipe = Pipeline([("scaler", StandardScaler()), ("clf", LogisticRegression(C=0.5, max_iter=5000))])
    pipe.fit(pooled[:N_TRAIN][:, FEATURES], labels[:N_TRAIN])
    return Trained(extractor.eval(), pipe, FEATURES, slices, pooled, labels, cohorts)


@pytest.fixture(scope="session")
def built_lr(trained: Trained):
    from export.graph import build_graph, linear_logit_head

    linear = linear_logit_head(trained.pipeline, trained.pooled[:, trained.indices])
    return build_graph(trained.extractor, trained.indices, trained.pipeline, linear=linear, slices=S)


@pytest.fixture(scope="session")
def run_dir(tmp_path_factory: pytest.TempPathFactory, trained: Trained) -> Path:
    return write_run(tmp_path_factory.mktemp("run"), trained)


@pytest.fixture(scope="session")
def export_dir(tmp_path_factory: pytest.TempPathFactory, run_dir: Path) -> Path:
    """An fp32 + fp16 export of the run (no store); int8 is covered by a slow test."""
    from export.build import build_export

    out = tmp_path_factory.mktemp("export")
    build_export(run_dir, out, variants=("fp32", "fp16"), store=False)
    return out


@pytest.fixture(scope="session")
def tiny() -> TinyExtractor:
    return TinyExtractor().eval()
