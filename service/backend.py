"""The graph service's work: find the export, load it verified, warm it up, run batches.

Kept out of service.py so the service file reads as a map (what runs where), and so the batch logic is
testable without a server.
"""

from __future__ import annotations

import logging
import os
import time
from pathlib import Path
from typing import Any

import numpy as np

from core.runtime import InferenceModel
from service.config import Settings

log = logging.getLogger(__name__)


def model_reference(settings: Settings) -> Any:
    """The BentoML model the graph service declares (so `bentoml build` packs it), or None when serving
    an export directory given by `PDL1_MODEL_DIR` (e.g. a volume mounted into the container)."""
    if settings.model_dir:
        return None
    from bentoml.models import BentoModel

    return BentoModel(settings.model_tag)


def resolve_export(settings: Settings, stored: Any | None) -> tuple[Path, str | None]:
    """(export directory, store tag or None) from PDL1_MODEL_DIR or the resolved BentoML model."""
    if settings.model_dir:
        path = Path(settings.model_dir)
        if not path.is_dir():
            raise FileNotFoundError(f"PDL1_MODEL_DIR={path} is not a directory")
        return path, None
    if stored is None:
        raise RuntimeError(f"model {settings.model_tag} could not be resolved from the BentoML model store")
    return Path(stored.path), str(stored.tag)


def graph_service_config(settings: Settings) -> dict[str, Any]:
    """`@bentoml.service` options for the graph service (workers, GPUs, timeout)."""
    config: dict[str, Any] = {"workers": settings.graph_workers, "traffic": {"timeout": settings.timeout_s}}
    if settings.graph_gpus > 0:
        config["resources"] = {"gpu": settings.graph_gpus}
    return config


def front_service_config(settings: Settings) -> dict[str, Any]:
    """`@bentoml.service` options for the front service."""
    return {"workers": settings.front_workers, "traffic": {"timeout": settings.timeout_s}}


def warmup_batch_sizes(provider: str, max_batch_size: int) -> tuple[int, ...]:
    """Batch sizes to run before ready: on CUDA each new size tunes cuDNN once (powers of two up to the
    batching cap, so live batches rarely pay it); on CPU one small batch is enough to allocate arenas."""
    if provider != "CUDAExecutionProvider":
        return (1,)
    sizes = [1]
    while sizes[-1] * 2 <= max_batch_size:
        sizes.append(sizes[-1] * 2)
    return tuple(sizes)


def load_cuda_libraries(providers: list[str] | None) -> None:
    """Make CUDA/cuDNN from pip wheels (nvidia-*-cu13) visible to ONNX Runtime before its session exists.

    Why: in an image without a CUDA base (the `bentoml containerize` route) those libraries live in
    site-packages, not on the loader path. A CUDA build of torch loads them when imported, which is the
    mechanism onnxruntime documents for a matching torch; with a CUDA base image it is harmless.
    """
    import onnxruntime as ort

    wanted = providers is None or "CUDAExecutionProvider" in providers
    if not wanted or "CUDAExecutionProvider" not in ort.get_available_providers():
        return
    try:
        import torch
    except ImportError:
        log.warning("torch is not installed: ONNX Runtime must find CUDA/cuDNN on the loader path itself")
        return
    if torch.version.cuda and torch.cuda.is_available():
        log.info(
            "CUDA %s / cuDNN %s loaded through torch for ONNX Runtime",
            torch.version.cuda,
            torch.backends.cudnn.version(),
        )


def load_model(settings: Settings, stored: Any | None) -> tuple[InferenceModel, str]:
    """Load (every file hash-verified by core.runtime), warm up, log the provider actually in use."""
    path, store_tag = resolve_export(settings, stored)
    load_cuda_libraries(settings.provider_list)
    t0 = time.perf_counter()
    model = InferenceModel.load(path, variant=settings.variant, providers=settings.provider_list)
    warm_s = model.warmup(warmup_batch_sizes(model.provider, settings.max_batch_size))
    tag = store_tag or model.tag
    log.info(
        "model %s ready in %.1f s (warm-up %.1f s): variant=%s provider=%s graph_cam=%s pid=%d",
        tag,
        time.perf_counter() - t0,
        warm_s,
        model.variant,
        model.provider,
        model.has_graph_cam,
        os.getpid(),
    )
    if model.provider != "CUDAExecutionProvider":
        log.warning(
            "serving on %s, not CUDAExecutionProvider (%s)", model.provider, model.fallback or "CPU only"
        )
    return model, tag


def predict_batch(model: InferenceModel, slices: np.ndarray) -> list[dict[str, Any]]:
    """Slices [N,S,3,H,W] from several requests -> one dict per patient (probability, cam or None).

    A list is returned (not a dict of arrays) because BentoML splits batch outputs per request by
    container type, and lists split element-wise.
    """
    out = model.predict(np.ascontiguousarray(slices, dtype=np.float32))
    probability = np.asarray(out["probability"], dtype=np.float32).reshape(-1)
    cam = out.get("cam")
    return [
        {"probability": float(probability[i]), "cam": None if cam is None else np.asarray(cam[i])}
        for i in range(len(probability))
    ]


def gradcam(model: InferenceModel, slices: np.ndarray) -> np.ndarray:
    """Torch-path Grad-CAM [N,S,size,size], NOT normalised: the front applies the same normalisation
    (ReLU, divide by the patient's maximum) to this and to the in-graph CAM, so the two read alike."""
    return model.gradcam(np.ascontiguousarray(slices, dtype=np.float32), normalize="none")


def describe(model: InferenceModel, tag: str) -> dict[str, Any]:
    """Everything the front and the /model endpoint report about the served model (JSON-ready)."""
    m = model.manifest
    return {
        "tag": tag,
        "name": m.name,
        "version": m.version,
        "threshold": float(model.threshold),
        "threshold_method": m.threshold_method,
        "variant": model.variant,
        "published_variants": m.published_variants,
        "provider": model.provider,
        "provider_fallback": model.fallback,
        "has_graph_cam": bool(model.has_graph_cam),
        "cam_method": "in-graph CAM" if model.has_graph_cam else model.gradcam_method,
        "preprocess": model.preprocess_config.model_dump(mode="json"),
        "input_shape": list(m.input_shape),
        "head": m.head.model_dump(mode="json"),
        "feature_names": list(m.feature_names),
        "cohort_auc": dict(m.cohort_auc),
        "training_run_id": m.training_run_id,
        "synthetic_data": m.synthetic_data,
        "intended_use": m.intended_use,
        "limitations": list(m.limitations),
        "created": m.created,
    }
