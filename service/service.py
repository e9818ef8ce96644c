"""BentoML 1.4 services: `PDL1` (front: HTTP, OIP REST + gRPC, uploads, preprocessing, CAM) and `PDL1Graph`
(the verified ONNX Runtime session behind ONE batchable API).

Every prediction, whatever its protocol, reaches `PDL1Graph.predict` through the dependency client, i.e.
across a process boundary, where BentoML's adaptive batcher merges concurrent requests. Settings come
from `PDL1_*` environment variables (service/config.py). Serve with `pdl1 serve` or
`bentoml serve service.service:PDL1`.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Literal

import bentoml
import numpy as np
from pydantic import Field

from service import backend, http_api, routes
from service.auth import BearerAuthMiddleware
from service.config import settings
from service.grpc_server import GrpcFront
from service.oip.models import OipModels
from service.pipeline import Pipeline
from service.schemas import PredictResponse, PreprocessedResponse
from service.uploads import BodySizeLimitMiddleware

S = settings()
# BentoML configures handlers; without this our INFO lines (provider, gRPC port) would be dropped.
logging.getLogger("service").setLevel(logging.INFO)


@bentoml.service(name="PDL1Graph", **backend.graph_service_config(S))
class PDL1Graph:
    """One ONNX Runtime session (CUDA, else CPU), hash-verified and warmed up before the service is ready."""

    model_ref = backend.model_reference(S)  # None when serving PDL1_MODEL_DIR

    def __init__(self) -> None:
        self.model, self.tag = backend.load_model(S, self.model_ref)

    # PDL1_MAX_BATCH_SIZE=1 turns adaptive batching off (BentoML rejects max_batch_size=1 when batchable).
    @bentoml.api(
        batchable=S.max_batch_size > 1,
        batch_dim=0,
        max_batch_size=max(S.max_batch_size, 2),
        max_latency_ms=S.max_latency_ms,
    )
    def predict(self, slices: np.ndarray) -> list[dict[str, Any]]:
        """Slices [N,S,3,H,W] (concatenated across requests) -> per patient {probability, cam or None}."""
        return backend.predict_batch(self.model, slices)

    @bentoml.api
    def gradcam(self, slices: np.ndarray) -> np.ndarray:
        """Grad-CAM on the torch path (same weights) for heads without an in-graph CAM: [N,S,224,224],
        unnormalised (the front normalises both CAM sources the same way)."""
        return backend.gradcam(self.model, slices)

    @bentoml.api
    def describe(self) -> dict[str, Any]:
        return backend.describe(self.model, self.tag)


@bentoml.service(name="PDL1", **backend.front_service_config(S))
@bentoml.asgi_app(routes.build_app(), path="/")
class PDL1:
    """PD-L1 status from a DECT iodine map and its tumour mask. Research use only; not a medical device."""

    graph = bentoml.depends(PDL1Graph)

    def __init__(self) -> None:
        self.pipeline = Pipeline(lambda: self.graph.to_async, S)
        self.oip = OipModels(self.pipeline)
        self.grpc = GrpcFront(self.oip, S)

    @bentoml.on_startup
    async def start_grpc(self) -> None:
        if S.grpc_port:
            await self.grpc.start()

    @bentoml.on_shutdown
    async def stop_grpc(self) -> None:
        await self.grpc.stop()

    async def __is_ready__(self) -> bool:
        return await self.pipeline.ready()

    @bentoml.api(route="/predict")
    async def predict(
        self, image: Path, mask: Path, return_cam: bool = False, cam_format: Literal["nifti", "png"] = "nifti"
    ) -> PredictResponse:
        """Multipart upload: `image` (NIfTI, NRRD, MHA or zip of one DICOM series) and its tumour `mask`."""
        return await http_api.predict(
            self.pipeline, image, mask, return_cam=return_cam, cam_format=cam_format
        )

    @bentoml.api(route="/predict_preprocessed")
    async def predict_preprocessed(
        self,
        slices: list[Any] | None = None,
        # A list because BentoML 1.4 cannot make an optional file part (`Path | None` breaks its schema).
        npy: list[Path] = Field(default_factory=list, description="One .npy file (instead of `slices`)."),
    ) -> PreprocessedResponse:
        """The network input [S,3,H,W] (or [N,S,3,H,W]) as JSON `slices` or an uploaded `.npy` file."""
        return await http_api.predict_preprocessed(self.pipeline, slices, npy)


# Outermost first: refuse unauthenticated calls before reading any body, then cap the body size.
if S.api_token:
    PDL1.add_asgi_middleware(BearerAuthMiddleware, token=S.api_token)
PDL1.add_asgi_middleware(BodySizeLimitMiddleware, max_bytes=S.max_upload_bytes)
