"""``pdl1 predict``: one patient through an exported model, with the shared preprocessing.

The CAM written with ``--cam`` is the graph's in-graph CAM for linear heads (ReLU, upsampled to the slice
size with stride alignment, normalised per patient, as the torch Grad-CAM path does) or, for other heads,
the torch path's Ablation-CAM; either is mapped back onto the input image's grid
(``Preprocessed.map_to_image``) and written as NIfTI/any SimpleITK format.
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any

import numpy as np

LABEL_NAMES = {0: "PD-L1 low", 1: "PD-L1 high"}


def _timed(timings: dict[str, float], key: str, t0: float) -> float:
    now = time.perf_counter()
    timings[key] = round(now - t0, 4)
    return now


def predict_files(
    model: str | os.PathLike[str],
    image: str | os.PathLike[str],
    mask: str | os.PathLike[str],
    *,
    variant: str | None = None,
    cam_out: str | os.PathLike[str] | None = None,
    mask_label: int | None = None,
) -> dict[str, Any]:
    """Predict one patient; returns the JSON-ready result (see ``pdl1 predict --help``)."""
    import SimpleITK as sitk

    from core.cam import CAM_LABEL, postprocess
    from core.preprocessing import preprocess_files
    from core.runtime import InferenceModel
    from export.store import resolve_model

    timings: dict[str, float] = {}
    t = time.perf_counter()
    root, tag = resolve_model(model)
    runtime = InferenceModel.load(root, variant=variant)
    t = _timed(timings, "load_s", t)
    pre = preprocess_files(image, mask, runtime.preprocess_config, label=mask_label)
    t = _timed(timings, "preprocess_s", t)
    out = runtime.predict(pre.slices[None].astype(np.float32, copy=False))
    t = _timed(timings, "inference_s", t)
    probability = float(out["probability"][0])
    label = int(probability >= runtime.threshold)
    result: dict[str, Any] = {
        "model": tag,
        "variant": runtime.variant,
        "provider": runtime.provider,
        "probability": probability,
        "label": label,
        "label_name": LABEL_NAMES[label],
        "threshold": runtime.threshold,
        "synthetic_model": runtime.manifest.synthetic_data,
    }
    if runtime.fallback:
        result["provider_fallback"] = runtime.fallback
    if cam_out is not None:
        import torch

        size = (runtime.preprocess_config.size, runtime.preprocess_config.size)
        if "cam" in out:
            maps = postprocess(torch.relu(torch.from_numpy(out["cam"])), size=size, normalize="patient")
            method = CAM_LABEL + " (in graph)"
        else:
            maps = runtime.gradcam(pre.slices[None].astype(np.float32, copy=False))
            method = runtime.gradcam_method
        cam_image = pre.map_to_image(maps[0])
        cam_path = Path(cam_out)
        cam_path.parent.mkdir(parents=True, exist_ok=True)
        sitk.WriteImage(cam_image, str(cam_path))
        result["cam"] = {"path": str(cam_path), "method": method}
        t = _timed(timings, "cam_s", t)
    result["geometry"] = pre.geometry_dict()
    result["timings_s"] = timings
    return result
