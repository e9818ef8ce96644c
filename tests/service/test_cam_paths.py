"""The front's two CAM sources agree: the exported graph's own CAM and Grad-CAM on the torch path.

Runs the service's `Pipeline` in-process over a small real export, with the graph service replaced by
direct calls into the same `core.runtime.InferenceModel` (what PDL1Graph does behind its API).
"""

from __future__ import annotations

import asyncio
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from core.runtime import InferenceModel
from service import backend
from service.config import load_settings
from service.pipeline import CAM_SOURCE_GRAPH, CAM_SOURCE_TORCH, Pipeline
from tests.service.service_helpers import Patient

pytestmark = pytest.mark.slow


class DirectGraph:
    """The graph service's three APIs as direct calls; `with_graph_cam=False` hides the in-graph CAM."""

    def __init__(self, model: InferenceModel, *, with_graph_cam: bool) -> None:
        self.model = model
        self.with_graph_cam = with_graph_cam

    async def predict(self, slices: np.ndarray) -> list[dict]:
        out = backend.predict_batch(self.model, slices)
        if not self.with_graph_cam:
            for item in out:
                item["cam"] = None
        return out

    async def gradcam(self, slices: np.ndarray) -> np.ndarray:
        return backend.gradcam(self.model, slices)

    async def describe(self) -> dict:
        return backend.describe(self.model, self.model.tag)


def _predict(model: InferenceModel, patient: Patient, *, with_graph_cam: bool):
    graph = DirectGraph(model, with_graph_cam=with_graph_cam)
    pipeline = Pipeline(lambda: graph, load_settings({}))
    image = patient.files["image_nii"]
    mask = patient.files["mask_nii"]
    return asyncio.run(
        pipeline.predict_upload(
            image.read_bytes(), "image.nii.gz", mask.read_bytes(), "mask.nii.gz", return_cam=True
        )
    )


def test_in_graph_cam_and_torch_gradcam_agree(small_export: Path, patient: Patient) -> None:
    model = InferenceModel.load(small_export, providers=["CPUExecutionProvider"])
    graph = _predict(model, patient, with_graph_cam=True)
    torch_path = _predict(model, patient, with_graph_cam=False)
    assert (graph.cam_source, torch_path.cam_source) == (CAM_SOURCE_GRAPH, CAM_SOURCE_TORCH)
    assert graph.probability == torch_path.probability
    a = sitk.GetArrayFromImage(graph.cam_image)
    b = sitk.GetArrayFromImage(torch_path.cam_image)
    assert a.shape == b.shape and a.max() > 0.5 and b.max() > 0.5  # both maps are non-trivial
    inside = (a > 0) | (b > 0)
    r = np.corrcoef(a[inside], b[inside])[0, 1]
    assert r > 0.99, f"CAM sources disagree (Pearson r={r:.4f})"
    assert np.abs(a - b).max() < 0.05
