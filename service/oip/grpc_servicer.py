"""`inference.GRPCInferenceService` over `OipModels` (grpc.aio).

Responses mirror the request's encoding: raw_input_contents in -> raw_output_contents out (what
tritonclient expects), typed contents in -> typed contents out.
"""

from __future__ import annotations

import logging
from typing import Any

import grpc

from core.errors import InputError
from service.errors import RequestError, grpc_code, log_rejection
from service.oip import grpc_predict_v2_pb2 as pb
from service.oip import grpc_predict_v2_pb2_grpc as pb_grpc
from service.oip.models import SERVER_NAME, ModelNotFound, OipModels, server_version
from service.oip.tensors import grpc_input_to_numpy, numpy_to_grpc_output, param_value

log = logging.getLogger(__name__)


class InferenceServicer(pb_grpc.GRPCInferenceServiceServicer):
    def __init__(self, models: OipModels, *, max_elements: int) -> None:
        self.models = models
        self.max_elements = max_elements

    async def ServerLive(self, request: pb.ServerLiveRequest, context: Any) -> pb.ServerLiveResponse:
        return pb.ServerLiveResponse(live=True)

    async def ServerReady(self, request: pb.ServerReadyRequest, context: Any) -> pb.ServerReadyResponse:
        return pb.ServerReadyResponse(ready=await self.models.server_ready())

    async def ModelReady(self, request: pb.ModelReadyRequest, context: Any) -> pb.ModelReadyResponse:
        try:
            return pb.ModelReadyResponse(ready=await self.models.model_ready(request.name, request.version))
        except ModelNotFound as exc:
            await context.abort(grpc.StatusCode.NOT_FOUND, str(exc))
            raise  # unreachable: abort raises

    async def ServerMetadata(
        self, request: pb.ServerMetadataRequest, context: Any
    ) -> pb.ServerMetadataResponse:
        return pb.ServerMetadataResponse(name=SERVER_NAME, version=server_version(), extensions=[])

    async def ModelMetadata(self, request: pb.ModelMetadataRequest, context: Any) -> pb.ModelMetadataResponse:
        try:
            meta = await self.models.metadata(request.name, request.version)
        except ModelNotFound as exc:
            await context.abort(grpc.StatusCode.NOT_FOUND, str(exc))
            raise
        tensor = pb.ModelMetadataResponse.TensorMetadata
        return pb.ModelMetadataResponse(
            name=meta["name"],
            versions=meta["versions"],
            platform=meta["platform"],
            inputs=[tensor(**t) for t in meta["inputs"]],
            outputs=[tensor(**t) for t in meta["outputs"]],
        )

    async def ModelInfer(self, request: pb.ModelInferRequest, context: Any) -> pb.ModelInferResponse:
        try:
            return await self._infer(request)
        except ModelNotFound as exc:
            await context.abort(grpc.StatusCode.NOT_FOUND, str(exc))
        except InputError as exc:
            code = grpc_code(exc)
            log_rejection("grpc", exc, code.name)
            await context.abort(code, exc.public_message())
        except Exception:
            log.exception("ModelInfer failed")
            await context.abort(grpc.StatusCode.INTERNAL, "internal error; see the server log")
        raise AssertionError("unreachable")  # pragma: no cover

    async def _infer(self, request: pb.ModelInferRequest) -> pb.ModelInferResponse:
        raw = list(request.raw_input_contents)
        if raw and len(raw) != len(request.inputs):
            raise RequestError(
                f"raw_input_contents has {len(raw)} entries for {len(request.inputs)} inputs", field="inputs"
            )
        inputs = {}
        for i, tensor in enumerate(request.inputs):
            if tensor.name in inputs:
                raise RequestError("input given twice", field=tensor.name)
            array = grpc_input_to_numpy(tensor, raw[i] if raw else None, max_elements=self.max_elements)
            inputs[tensor.name] = (tensor.datatype.upper(), array)
        parameters = {k: param_value(v) for k, v in request.parameters.items()}
        requested = [o.name for o in request.outputs] or None
        outputs = await self.models.infer(
            request.model_name, request.model_version or None, inputs, parameters, requested
        )
        info = await self.models.pipeline.info()
        response = pb.ModelInferResponse(
            model_name=request.model_name, model_version=info.version, id=request.id
        )
        use_raw = bool(raw)
        for out in outputs:
            tensor, content = numpy_to_grpc_output(out.name, out.datatype, out.data, raw=use_raw)
            response.outputs.append(tensor)
            if content is not None:
                response.raw_output_contents.append(content)
        return response
