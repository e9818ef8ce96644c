"""The two Open Inference Protocol models, independent of the wire (gRPC or REST JSON).

- `pdl1`: image and mask file contents (BYTES) -> probability (FP32), label (INT32), cam (BYTES, NIfTI of
  the normalised CAM on the input grid, only with parameter `return_cam`).
- `pdl1-graph`: the network input slices (FP32 [N,S,3,H,W]) -> probability (FP32 [N]).

Both run through `Pipeline`, i.e. the same validation and the same batched graph service as HTTP.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

from service.errors import RequestError
from service.pipeline import Pipeline
from service.uploads import neutral_name

SERVER_NAME = "pdl1"
FILE_MODEL = "pdl1"
GRAPH_MODEL = "pdl1-graph"
PLATFORM = "onnxruntime_onnx"


class ModelNotFound(LookupError):
    """Unknown model name or version (gRPC NOT_FOUND, HTTP 404)."""


@dataclass(frozen=True)
class TensorSpec:
    name: str
    datatype: str
    shape: list[int]

    def as_dict(self) -> dict[str, Any]:
        return {"name": self.name, "datatype": self.datatype, "shape": self.shape}


@dataclass(frozen=True)
class OutputTensor:
    name: str
    datatype: str
    data: np.ndarray


def server_version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("pdl1-dect")
    except PackageNotFoundError:  # running from a source tree that was not pip-installed
        return "0+unknown"


def truthy(value: Any, name: str) -> bool:
    """A boolean parameter given as bool, int or string ('true'/'false'/'1'/'0')."""
    if isinstance(value, bool | np.bool_):
        return bool(value)
    if isinstance(value, int) and value in (0, 1):
        return bool(value)
    if isinstance(value, str) and value.strip().lower() in ("true", "1", "yes", "false", "0", "no"):
        return value.strip().lower() in ("true", "1", "yes")
    raise RequestError(f"expected a boolean, got {value!r}", field=name)


class OipModels:
    """Metadata, readiness and inference for the protocol's models over a `Pipeline`."""

    def __init__(self, pipeline: Pipeline) -> None:
        self.pipeline = pipeline

    @property
    def names(self) -> tuple[str, ...]:
        return (FILE_MODEL, GRAPH_MODEL)

    async def server_ready(self) -> bool:
        return await self.pipeline.ready()

    async def _check(self, name: str, version: str | None) -> None:
        if name not in self.names:
            raise ModelNotFound(f"unknown model {name!r}; models: {', '.join(self.names)}")
        if version:
            info = await self.pipeline.info()
            if version != info.version:
                raise ModelNotFound(f"model {name!r} has no version {version!r}; served: {info.version!r}")

    async def model_ready(self, name: str, version: str | None = None) -> bool:
        if name not in self.names:
            raise ModelNotFound(f"unknown model {name!r}; models: {', '.join(self.names)}")
        if not await self.pipeline.ready():
            return False
        await self._check(name, version)
        return True

    async def metadata(self, name: str, version: str | None = None) -> dict[str, Any]:
        await self._check(name, version)
        info = await self.pipeline.info()
        if name == FILE_MODEL:
            inputs = [TensorSpec("image", "BYTES", [-1]), TensorSpec("mask", "BYTES", [-1])]
            outputs = [
                TensorSpec("probability", "FP32", [-1]),
                TensorSpec("label", "INT32", [-1]),
                TensorSpec("cam", "BYTES", [-1]),
            ]
        else:
            inputs = [TensorSpec("slices", "FP32", [-1, *info.input_shape])]
            outputs = [TensorSpec("probability", "FP32", [-1])]
        return {
            "name": name,
            "versions": [info.version],
            "platform": PLATFORM,
            "inputs": [t.as_dict() for t in inputs],
            "outputs": [t.as_dict() for t in outputs],
            "parameters": {"tag": info.tag, "threshold": info.threshold, "provider": info.provider},
        }

    async def infer(
        self,
        name: str,
        version: str | None,
        inputs: dict[str, tuple[str, np.ndarray]],
        parameters: dict[str, Any],
        requested: list[str] | None,
        *,
        bytes_decoder: Callable[[Any, str], bytes] | None = None,
    ) -> list[OutputTensor]:
        """Run model `name`; `inputs` maps tensor name -> (datatype, array). Unknown names -> InputError."""
        await self._check(name, version)
        if name == GRAPH_MODEL:
            outputs = await self._infer_graph(inputs)
        else:
            want_cam = truthy(parameters.get("return_cam", False), "return_cam") or (
                requested is not None and "cam" in requested
            )
            outputs = await self._infer_files(inputs, want_cam, parameters, bytes_decoder)
        if requested is None:
            return outputs
        by_name = {o.name: o for o in outputs}
        unknown = [r for r in requested if r not in by_name]
        if unknown:
            raise RequestError(f"unknown output(s) {unknown}; available: {sorted(by_name)}", field="outputs")
        return [by_name[r] for r in requested]

    async def _infer_graph(self, inputs: dict[str, tuple[str, np.ndarray]]) -> list[OutputTensor]:
        _expect_inputs(inputs, {"slices"})
        datatype, slices = inputs["slices"]
        if datatype != "FP32":
            raise RequestError(f"datatype must be FP32, got {datatype}", field="slices")
        if slices.ndim != 5:
            raise RequestError(f"shape must be [N,S,3,H,W], got {list(slices.shape)}", field="slices")
        probability = await self.pipeline.predict_slices(slices)
        return [OutputTensor("probability", "FP32", probability)]

    async def _infer_files(
        self,
        inputs: dict[str, tuple[str, np.ndarray]],
        want_cam: bool,
        parameters: dict[str, Any],
        bytes_decoder: Callable[[Any, str], bytes] | None,
    ) -> list[OutputTensor]:
        _expect_inputs(inputs, {"image", "mask"})
        arrays = {}
        for key in ("image", "mask"):
            datatype, arr = inputs[key]
            if datatype != "BYTES":
                raise RequestError(f"datatype must be BYTES (the file contents), got {datatype}", field=key)
            arrays[key] = arr.reshape(-1)
        if arrays["image"].size != arrays["mask"].size or arrays["image"].size == 0:
            raise RequestError(
                f"image and mask need the same, non-zero number of elements "
                f"(got {arrays['image'].size} and {arrays['mask'].size})",
                field="mask",
            )
        decode = bytes_decoder or (lambda item, _name: bytes(item))
        hints = {
            k: neutral_name(k, str(parameters.get(f"{k}_format", "")) or None) for k in ("image", "mask")
        }

        async def one(i: int) -> Any:
            image = decode(arrays["image"][i], "image")
            mask = decode(arrays["mask"][i], "mask")
            return await self.pipeline.predict_upload(
                image, hints["image"], mask, hints["mask"], return_cam=want_cam, cam_format="nifti"
            )

        preds = await asyncio.gather(*(one(i) for i in range(arrays["image"].size)))
        outputs = [
            OutputTensor("probability", "FP32", np.asarray([p.probability for p in preds], dtype=np.float32)),
            OutputTensor("label", "INT32", np.asarray([p.label for p in preds], dtype=np.int32)),
        ]
        if want_cam:
            cams = np.empty(len(preds), dtype=np.object_)
            cams[:] = [p.cam_nifti_bytes() for p in preds]
            outputs.append(OutputTensor("cam", "BYTES", cams))
        return outputs


def _expect_inputs(inputs: dict[str, Any], expected: set[str]) -> None:
    missing = sorted(expected - set(inputs))
    extra = sorted(set(inputs) - expected)
    if missing or extra:
        parts = []
        if missing:
            parts.append(f"missing input(s) {missing}")
        if extra:
            parts.append(f"unexpected input(s) {extra}")
        raise RequestError("; ".join(parts) + f"; expected {sorted(expected)}", field="inputs")
