"""A small but REAL export for the service tests, made with the project's own code.

Random-weight ResNet-50 (core.network), a StandardScaler + LogisticRegression head fitted on features of
random slices, the single ONNX graph with its in-graph CAM (export.graph), the torch-path files
(extractor.pt, head.npz) and a manifest with SHA-256 of every file (core.manifest) - exactly what
`core.runtime.InferenceModel` loads in production. Only the training data is fake.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

N_SLICES = 3
N_FEATURES = 12


def build_small_export(out: Path, *, seed: int = 0, threshold: float = 0.5) -> Path:
    import torch
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    from core.manifest import HeadInfo, ModelManifest, VariantInfo, hash_files, write_manifest
    from core.network import PatientFeatureNet, build_extractor
    from core.preprocessing import PreprocessConfig
    from export.graph import build_graph, linear_logit_head, save_model

    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    extractor, weights = build_extractor("random", seed=seed)
    with torch.no_grad():
        x = torch.from_numpy(rng.normal(size=(8, N_SLICES, 3, 224, 224)).astype(np.float32))
        features = PatientFeatureNet(extractor).eval()(x).numpy().astype(np.float64)
    indices = np.sort(rng.choice(features.shape[1], size=N_FEATURES, replace=False))
    # Labels follow the selected features' total activity, so the fitted weights are mostly positive and
    # the CAM has positive regions (with random labels it can be negative everywhere: nothing to compare).
    score = features[:, indices].sum(axis=1)
    labels = (score > np.median(score)).astype(int)
    head = make_pipeline(StandardScaler(), LogisticRegression(C=0.5, max_iter=1000))
    head.fit(features[:, indices], labels)
    linear = linear_logit_head(head, features[:, indices])
    assert linear is not None, "an LR head must be linear"
    built = build_graph(extractor, indices, head, linear=linear, slices=N_SLICES)
    save_model(built.model, str(out / "model.fp32.onnx"))
    torch.save(extractor.state_dict(), out / "extractor.pt")
    np.savez(
        out / "head.npz",
        feature_indices=indices.astype(np.int64),
        linear_weight=linear.weight,
        linear_bias=np.float64(linear.bias),
    )
    files = ["model.fp32.onnx", "extractor.pt", "head.npz"]
    h, w = built.cam_shape[1:]
    manifest = ModelManifest(
        name="pdl1",
        version=f"test{seed}",
        training_run_id=f"service-test-{seed}",
        source_run="(tests/service/_export.py)",
        preprocess=PreprocessConfig(n_slices=N_SLICES).model_dump(mode="json"),
        input_shape=["N", N_SLICES, 3, 224, 224],
        outputs={"probability": ["N"], "cam": ["N", N_SLICES, h, w]},
        feature_names=[f"f{i}" for i in indices],
        feature_indices=[int(i) for i in indices],
        threshold=threshold,
        head=HeadInfo(model_name="lr", classifier="LogisticRegression", type="linear"),
        has_graph_cam=True,
        weights=weights.model_dump(mode="json"),
        exporter=built.exporter,
        files=hash_files(out, files),
        variants={
            "fp32": VariantInfo(
                file="model.fp32.onnx", published=True, precision="float32", target="CPU/CUDA"
            )
        },
        intended_use="tests only",
        limitations=["random weights; fake labels"],
        synthetic_data=True,
    )
    write_manifest(manifest, out)
    return out


def import_to_store(export_dir: Path, bentoml_home: Path) -> str:
    """Save the export in the BentoML model store at `bentoml_home`; returns NAME:VERSION."""
    from core.manifest import ModelManifest
    from export.store import save_to_store

    old = os.environ.get("BENTOML_HOME")
    os.environ["BENTOML_HOME"] = str(bentoml_home)
    try:
        return save_to_store(export_dir, ModelManifest.read(export_dir / "manifest.json"))
    finally:
        if old is None:
            os.environ.pop("BENTOML_HOME", None)
        else:
            os.environ["BENTOML_HOME"] = old
