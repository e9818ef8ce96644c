"""Bodies of the HTTP API methods: uploads in, `Pipeline` call, JSON (or a JSON error with a 4xx status) out.

Errors are returned as Starlette responses, not raised: BentoML turns raised 4xx exceptions into a
JSON *list*, and we want `{"error": ...}` with the status that fits (400/413/415/422).
"""

from __future__ import annotations

import asyncio
import io
import time
from pathlib import Path
from typing import Any

import numpy as np
from starlette.responses import JSONResponse

from core.errors import InputError
from service.errors import PayloadTooLarge, RequestError, error_body, http_status, log_rejection
from service.pipeline import ModelInfo, Pipeline, b64
from service.schemas import ModelRef, PredictResponse, PreprocessedResponse
from service.uploads import neutral_name

LABEL_NAMES = {0: "PD-L1 low", 1: "PD-L1 high"}  # as `pdl1 predict` and the study (CPS >= 1)


def error_response(exc: InputError, channel: str = "http") -> JSONResponse:
    status = http_status(exc)
    log_rejection(channel, exc, status)
    return JSONResponse(error_body(exc), status_code=status)


def model_ref(info: ModelInfo) -> ModelRef:
    return ModelRef(
        tag=info.tag, name=info.name, version=info.version, variant=info.variant, provider=info.provider
    )


async def _read(path: Path | None, field: str, limit: int) -> bytes:
    if path is None:
        raise RequestError("file part is missing", field=field)
    size = path.stat().st_size
    if size > limit:
        raise PayloadTooLarge(
            f"upload is {size / 1e6:.1f} MB, above the {limit / 2**20:g} MiB limit", field=field
        )
    return await asyncio.to_thread(path.read_bytes)


async def predict(
    pipeline: Pipeline, image: Path, mask: Path, *, return_cam: bool, cam_format: str
) -> PredictResponse | JSONResponse:
    """POST /predict."""
    limit = pipeline.settings.max_upload_bytes
    try:
        image_bytes = await _read(image, "image", limit)
        mask_bytes = await _read(mask, "mask", limit)
        pred = await pipeline.predict_upload(
            image_bytes,
            neutral_name("image", image.name),
            mask_bytes,
            neutral_name("mask", mask.name),
            return_cam=return_cam,
            cam_format=cam_format,  # type: ignore[arg-type]
        )
    except InputError as exc:
        return error_response(exc)
    info = await pipeline.info()
    cam: dict[str, Any] = {}
    if return_cam:
        data = pred.cam_png if cam_format == "png" else await asyncio.to_thread(pred.cam_nifti_bytes)
        cam = {
            "cam": b64(data or b""),
            "cam_format": cam_format,
            "cam_source": pred.cam_source,
            "cam_normalisation": "ReLU, then divided by the patient's maximum (0..1)",
        }
    return PredictResponse(
        probability=pred.probability,
        label=pred.label,
        label_name=LABEL_NAMES[pred.label],
        threshold=pred.threshold,
        model=model_ref(info),
        timings_ms=pred.timings_ms,
        **cam,
    )


async def predict_preprocessed(
    pipeline: Pipeline, slices: list[Any] | None, npy: list[Path]
) -> PreprocessedResponse | JSONResponse:
    """POST /predict_preprocessed: JSON `slices` or ONE uploaded .npy, [S,3,H,W] or [N,S,3,H,W]."""
    t0 = time.perf_counter()
    try:
        if (slices is None) == (not npy) or len(npy) > 1:
            raise RequestError("send exactly one of 'slices' (JSON) or one 'npy' file", field="slices")
        if npy:
            array = _load_npy(await _read(npy[0], "npy", pipeline.settings.max_upload_bytes))
        else:
            array = slices
        probability = await pipeline.predict_slices(array, field_name="npy" if npy else "slices")
    except InputError as exc:
        return error_response(exc)
    info = await pipeline.info()
    return PreprocessedResponse(
        probability=[float(p) for p in probability],
        label=[int(p >= info.threshold) for p in probability],
        threshold=info.threshold,
        model=model_ref(info),
        timings_ms={"total": round((time.perf_counter() - t0) * 1000, 2)},
    )


def _load_npy(data: bytes) -> np.ndarray:
    """A .npy file, refusing pickled object arrays (allow_pickle=False: arbitrary code otherwise)."""
    try:
        return np.load(io.BytesIO(data), allow_pickle=False)
    except (ValueError, OSError, EOFError) as exc:
        raise RequestError(f"not a readable .npy array ({exc.__class__.__name__})", field="npy") from exc
