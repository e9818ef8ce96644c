"""The front service's work, shared by HTTP, Open Inference Protocol REST and gRPC.

upload bytes -> checks (size, format) -> core.io -> core.preprocessing -> graph service (batched ONNX) ->
label at the model's threshold -> optional CAM mapped back onto the input grid. Every protocol calls the
same methods, so validation, batching and answers cannot differ between them.
"""

from __future__ import annotations

import asyncio
import base64
import io
import logging
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import SimpleITK as sitk

from core.errors import InputError
from core.io import SUPPORTED_FORMATS, read_image_bytes, read_mask_bytes, sniff_kind
from core.preprocessing import PreprocessConfig, Preprocessed, preprocess
from service.config import Settings
from service.errors import PayloadTooLarge, RequestError, UnsupportedFormat
from service.uploads import KNOWN_SUFFIXES

log = logging.getLogger(__name__)
# Tries of one graph call when its pooled connection was closed (see Pipeline._call), and the pause unit.
GRAPH_CALL_ATTEMPTS = 4
RETRY_PAUSE_S = 0.05

CamFormat = Literal["nifti", "png"]
CAM_SOURCE_GRAPH = "graph"
CAM_SOURCE_TORCH = "torch-gradcam"
CAM_SOURCE_ABLATION = "torch-ablation-cam"  # non-differentiable heads (trees, k-NN): forward-only


@dataclass(frozen=True)
class ModelInfo:
    """What the front needs to know about the served model (sent once by the graph service)."""

    tag: str
    name: str
    version: str
    threshold: float
    variant: str
    provider: str
    has_graph_cam: bool
    preprocess: PreprocessConfig
    summary: dict[str, Any]

    @classmethod
    def from_describe(cls, d: dict[str, Any]) -> ModelInfo:
        return cls(
            tag=str(d["tag"]),
            name=str(d["name"]),
            version=str(d["version"]),
            threshold=float(d["threshold"]),
            variant=str(d["variant"]),
            provider=str(d["provider"]),
            has_graph_cam=bool(d["has_graph_cam"]),
            preprocess=PreprocessConfig.model_validate(d["preprocess"]),
            summary=dict(d),
        )

    @property
    def cam_source(self) -> str:
        """Where a CAM for this model comes from: the graph (linear heads) or the torch path."""
        return CAM_SOURCE_GRAPH if self.has_graph_cam else self.torch_cam_source

    @property
    def torch_cam_source(self) -> str:
        """The torch path's method: Grad-CAM, or forward-only Ablation-CAM for non-differentiable heads."""
        ablation = "Ablation" in str(self.summary.get("cam_method", ""))
        return CAM_SOURCE_ABLATION if ablation else CAM_SOURCE_TORCH

    @property
    def input_shape(self) -> tuple[int, int, int, int]:
        """One patient's network input [S, 3, size, size]."""
        c = self.preprocess
        return (c.n_slices, c.channels, c.size, c.size)


@dataclass
class Prediction:
    """One patient's answer; the CAM (when asked) is an image on the input grid or a PNG overlay."""

    probability: float
    label: int
    threshold: float
    timings_ms: dict[str, float]
    cam_source: str | None = None
    cam_image: sitk.Image | None = None
    cam_png: bytes | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    def cam_nifti_bytes(self) -> bytes:
        if self.cam_image is None:
            raise ValueError("no CAM image in this prediction")
        return image_to_nifti_bytes(self.cam_image)


class Pipeline:
    """Validation, preprocessing and calls to the graph service; `graph()` returns its async client.

    The graph service's `describe()` is fetched lazily (and cached) because dependency clients are only
    usable once the front has started; until it answers, the front reports not ready.
    """

    def __init__(self, graph: Callable[[], Any], settings: Settings) -> None:
        self._graph = graph
        self.settings = settings
        self._info: ModelInfo | None = None
        self._lock = asyncio.Lock()

    # ------------------------------------------------------------------------------------------ model

    async def info(self) -> ModelInfo:
        if self._info is None:
            async with self._lock:
                if self._info is None:
                    self._info = ModelInfo.from_describe(await self._call("describe"))
                    log.info(
                        "serving %s (variant %s, provider %s)",
                        self._info.tag,
                        self._info.variant,
                        self._info.provider,
                    )
        return self._info

    async def ready(self) -> bool:
        try:
            await asyncio.wait_for(self.info(), timeout=5)
        except Exception:  # the graph service is still starting (or down): not ready, never an error
            return False
        return True

    async def _call(self, method: str, *args: Any) -> Any:
        """Call the graph service, trying at most GRAPH_CALL_ATTEMPTS times when the pooled connection
        turns out to be closed.

        Why: BentoML's dependency client (aiohttp over a Unix socket) keeps idle connections for 15 s, while
        the graph worker's uvicorn closes them after 5 s (BentoML passes no keep-alive option to dependency
        workers). Under load the front's event loop has often not yet seen those closes, so several calls
        in a row can pick dead connections (64 concurrent clients on 2 CPUs gave HTTP 500s with a single
        retry). Waiting a moment between tries lets aiohttp drop them. Every graph method is idempotent,
        each retry is logged, and the last failure propagates.
        """
        import aiohttp

        for attempt in range(1, GRAPH_CALL_ATTEMPTS):
            try:
                return await getattr(self._graph(), method)(*args)
            except aiohttp.ClientConnectionError as exc:  # includes ServerDisconnectedError
                log.warning(
                    "graph call %s failed on a closed connection (%s); retry %d of %d",
                    method,
                    type(exc).__name__,
                    attempt,
                    GRAPH_CALL_ATTEMPTS - 1,
                )
                await asyncio.sleep(RETRY_PAUSE_S * attempt)
        return await getattr(self._graph(), method)(*args)  # the last try: its failure propagates

    # ----------------------------------------------------------------------------------------- predict

    async def predict_upload(
        self,
        image: bytes,
        image_name: str,
        mask: bytes,
        mask_name: str,
        *,
        return_cam: bool = False,
        cam_format: CamFormat = "nifti",
    ) -> Prediction:
        """Image + mask file contents (names are neutral hints, e.g. 'image.nii.gz') -> `Prediction`."""
        if cam_format not in ("nifti", "png"):
            raise RequestError(f"cam_format must be 'nifti' or 'png', got {cam_format!r}", field="cam_format")
        t0 = time.perf_counter()
        self._check_upload(image, image_name, "image")
        self._check_upload(mask, mask_name, "mask")
        info = await self.info()
        prep = await asyncio.to_thread(self._preprocess, image, image_name, mask, mask_name, info.preprocess)
        t1 = time.perf_counter()
        out = (await self._call("predict", prep.slices[None]))[0]
        t2 = time.perf_counter()
        probability = float(out["probability"])
        pred = Prediction(
            probability=probability,
            label=int(probability >= info.threshold),
            threshold=info.threshold,
            timings_ms={},
        )
        if return_cam:
            await self._add_cam(pred, prep, out, cam_format)
        t3 = time.perf_counter()
        pred.timings_ms = {
            "read_preprocess": _ms(t1 - t0),
            "inference": _ms(t2 - t1),
            "cam": _ms(t3 - t2),
            "total": _ms(t3 - t0),
        }
        return pred

    async def predict_slices(self, slices: Any, *, field_name: str = "slices") -> np.ndarray:
        """Network input [N,S,3,H,W] (or one patient [S,3,H,W]) -> probabilities [N], through the batcher."""
        info = await self.info()
        batch = self.check_slices(slices, info, field_name=field_name)
        outs = await self._call("predict", batch)
        return np.asarray([float(o["probability"]) for o in outs], dtype=np.float32)

    def check_slices(self, slices: Any, info: ModelInfo, *, field_name: str = "slices") -> np.ndarray:
        """Validate and convert a client-made network input; the error names the expected shape."""
        try:
            arr = np.asarray(slices, dtype=np.float32)
        except (TypeError, ValueError) as exc:
            raise RequestError(f"not a numeric array ({exc.__class__.__name__})", field=field_name) from exc
        expected = info.input_shape
        if arr.ndim == 4:
            arr = arr[None]
        if arr.ndim != 5 or tuple(arr.shape[1:]) != expected or arr.shape[0] < 1:
            want = "[" + ",".join(map(str, expected)) + "] or [N," + ",".join(map(str, expected)) + "]"
            raise RequestError(f"shape {list(arr.shape)} does not match {want}", field=field_name)
        if not np.isfinite(arr).all():
            raise InputError("contains NaN or Inf", field=field_name)
        return np.ascontiguousarray(arr)

    # ----------------------------------------------------------------------------------------- helpers

    def _check_upload(self, data: bytes, name: str, field_name: str) -> None:
        if not data:
            raise RequestError("upload is empty", field=field_name)
        if len(data) > self.settings.max_upload_bytes:
            raise PayloadTooLarge(
                f"upload is {len(data) / 1e6:.1f} MB, above the {self.settings.max_upload_mb:g} MiB limit",
                field=field_name,
            )
        known_suffix = any(name.lower().endswith(s) for s in KNOWN_SUFFIXES if s != ".npy")
        if sniff_kind(data[:512]) is None and not known_suffix:
            raise UnsupportedFormat(f"unrecognised format; supported: {SUPPORTED_FORMATS}", field=field_name)

    def _preprocess(
        self, image: bytes, image_name: str, mask: bytes, mask_name: str, config: PreprocessConfig
    ) -> Preprocessed:
        max_voxels = self.settings.max_voxels
        img = _with_field(lambda: read_image_bytes(image, image_name, max_voxels=max_voxels), "image")
        msk = _with_field(lambda: read_mask_bytes(mask, mask_name, img, max_voxels=max_voxels), "mask")
        return preprocess(img, msk, config)

    async def _add_cam(
        self, pred: Prediction, prep: Preprocessed, out: dict[str, Any], fmt: CamFormat
    ) -> None:
        size = prep.slices.shape[-1]
        if out.get("cam") is not None:
            pred.cam_source = CAM_SOURCE_GRAPH
            maps = await asyncio.to_thread(upsample_cam, np.asarray(out["cam"], dtype=np.float32), size)
        else:
            maps = np.asarray(await self._call("gradcam", prep.slices[None]), dtype=np.float32)[0]
            pred.cam_source = (await self.info()).torch_cam_source
        maps = normalise_cam(maps)
        if fmt == "png":
            pred.cam_png = await asyncio.to_thread(overlay_png, prep, maps)
        else:
            pred.cam_image = await asyncio.to_thread(prep.map_to_image, maps)


def _with_field(read: Callable[[], sitk.Image], field_name: str) -> sitk.Image:
    """Run a reader; tag its InputError with the multipart field so the client knows which part failed."""
    try:
        return read()
    except InputError as exc:
        if exc.field is None:
            exc.field = field_name
        raise


def _ms(seconds: float) -> float:
    return round(seconds * 1000.0, 2)


def upsample_cam(maps: np.ndarray, size: int) -> np.ndarray:
    """Layer4 maps [S,7,7] -> [S,size,size] with core.cam's receptive-field ("stride") alignment, as the
    torch Grad-CAM path does, so both sources land on the image grid identically (torch is imported
    here, on the first CAM request, not at start-up)."""
    from core.cam import upsample_maps

    return upsample_maps(maps, (size, size)).numpy().astype(np.float32)


def normalise_cam(maps: np.ndarray) -> np.ndarray:
    """ReLU, then divide by the patient's maximum: [0, 1], slices keep their relative strength.

    Applied to the in-graph CAM (logit units) and the torch Grad-CAM alike, so both read the same.
    """
    maps = np.maximum(np.asarray(maps, dtype=np.float32), 0.0)
    peak = float(maps.max()) if maps.size else 0.0
    return maps / peak if peak > 0 else maps


def image_to_nifti_bytes(image: sitk.Image) -> bytes:
    """Gzipped NIfTI bytes of `image` (SimpleITK writes files only, hence the temporary folder)."""
    with tempfile.TemporaryDirectory(prefix="pdl1_cam_") as tmp:
        path = Path(tmp) / "cam.nii.gz"
        sitk.WriteImage(image, str(path), useCompression=True)
        return path.read_bytes()


def overlay_png(prep: Preprocessed, maps: np.ndarray) -> bytes:
    """The S network-input slices side by side (grey), the CAM ([S,size,size], 0..1) as a translucent
    heat map, the VOI outline in white."""
    from matplotlib import colormaps
    from PIL import Image
    from scipy import ndimage

    tiles = []
    for s in range(prep.windowed.shape[0]):
        grey = np.repeat(prep.windowed[s][..., None], 3, axis=2)
        cam = maps[s]  # already at the slice size
        heat = colormaps["jet"](np.clip(cam, 0, 1))[..., :3]
        alpha = 0.45 * np.clip(cam, 0, 1)[..., None]
        rgb = (1 - alpha) * grey + alpha * heat
        voi = prep.mask_slices[s] > 0
        rgb[voi & ~ndimage.binary_erosion(voi)] = 1.0
        tiles.append(rgb)
    montage = (np.clip(np.concatenate(tiles, axis=1), 0, 1) * 255).astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(montage).save(buf, format="PNG")
    return buf.getvalue()


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")
