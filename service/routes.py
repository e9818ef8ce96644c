"""Starlette routes mounted beside the BentoML APIs: `GET /model` and the Open Inference Protocol REST API.

Why Starlette: BentoML API methods are POST-only and fix their own routes; the protocol needs GET
endpoints with path parameters. Handlers reach the running front service via
`bentoml.get_current_service()`, so they share its `Pipeline` (and thus its graph client and batching).
"""

from __future__ import annotations

import json
import logging
from typing import Any

import bentoml
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from core.errors import InputError
from service.errors import RequestError, error_body, http_status, log_rejection
from service.oip.models import SERVER_NAME, ModelNotFound, OipModels, server_version
from service.oip.tensors import decode_json_bytes, json_input_to_numpy, numpy_to_json_output

log = logging.getLogger(__name__)


def _front() -> Any:
    svc = bentoml.get_current_service()
    if svc is None:  # only between start-up and the service's initialisation
        raise RuntimeError("front service not initialised")
    return svc


def _oip() -> OipModels:
    return _front().oip


async def model_summary(request: Request) -> JSONResponse:
    """GET /model: the served model's tag, version, threshold, preprocessing, provider and variant."""
    front = _front()
    info = await front.pipeline.info()
    settings = front.pipeline.settings
    body = {
        **info.summary,
        "batching": {"max_batch_size": settings.max_batch_size, "max_latency_ms": settings.max_latency_ms},
        "cam_source": info.cam_source,
    }
    return JSONResponse(body)


async def server_metadata(request: Request) -> JSONResponse:
    return JSONResponse({"name": SERVER_NAME, "version": server_version(), "extensions": []})


async def server_live(request: Request) -> JSONResponse:
    return JSONResponse({"live": True})


async def server_ready(request: Request) -> JSONResponse:
    ready = await _oip().server_ready()
    return JSONResponse({"ready": ready}, status_code=200 if ready else 400)


async def model_metadata(request: Request) -> JSONResponse:
    p = request.path_params
    try:
        return JSONResponse(await _oip().metadata(p["name"], p.get("version")))
    except ModelNotFound as exc:
        return JSONResponse({"error": str(exc)}, status_code=404)


async def model_ready(request: Request) -> JSONResponse:
    p = request.path_params
    try:
        ready = await _oip().model_ready(p["name"], p.get("version"))
    except ModelNotFound as exc:
        return JSONResponse({"error": str(exc)}, status_code=404)
    return JSONResponse({"name": p["name"], "ready": ready}, status_code=200 if ready else 400)


async def model_infer(request: Request) -> JSONResponse:
    """POST /v2/models/{name}[/versions/{version}]/infer with JSON tensors."""
    p = request.path_params
    oip = _oip()
    try:
        if "inference-header-content-length" in request.headers:
            raise RequestError(
                "binary tensor data is not supported over REST; send JSON 'data' (or use gRPC)"
            )
        try:
            body = json.loads(await request.body())
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise RequestError(f"body is not valid JSON ({exc.__class__.__name__})") from exc
        if not isinstance(body, dict) or not isinstance(body.get("inputs"), list):
            raise RequestError("body must be a JSON object with an 'inputs' list", field="inputs")
        max_elements = oip.pipeline.settings.max_upload_bytes // 4
        inputs: dict[str, tuple[str, Any]] = {}
        for tensor in body["inputs"]:
            if not isinstance(tensor, dict):
                raise RequestError("each input must be a JSON object", field="inputs")
            name = str(tensor.get("name", ""))
            if name in inputs:
                raise RequestError("input given twice", field=name)
            inputs[name] = (
                str(tensor.get("datatype", "")).upper(),
                json_input_to_numpy(tensor, max_elements=max_elements),
            )
        parameters = body.get("parameters") or {}
        if not isinstance(parameters, dict):
            raise RequestError("'parameters' must be a JSON object", field="parameters")
        requested = [str(o.get("name")) for o in body.get("outputs") or [] if isinstance(o, dict)] or None
        outputs = await oip.infer(
            p["name"], p.get("version"), inputs, parameters, requested, bytes_decoder=decode_json_bytes
        )
    except ModelNotFound as exc:
        return JSONResponse({"error": str(exc)}, status_code=404)
    except InputError as exc:
        status = http_status(exc)
        log_rejection("oip-rest", exc, status)
        return JSONResponse(error_body(exc), status_code=status)
    except Exception:
        log.exception("OIP REST inference failed")
        return JSONResponse({"error": "internal error; see the server log"}, status_code=500)
    info = await oip.pipeline.info()
    response: dict[str, Any] = {
        "model_name": p["name"],
        "model_version": info.version,
        "outputs": [numpy_to_json_output(o.name, o.datatype, o.data) for o in outputs],
    }
    if "id" in body:
        response["id"] = body["id"]
    return JSONResponse(response)


def build_app() -> Starlette:
    """The mounted app (mount it at '/': BentoML's PassiveMount lets unmatched paths fall through)."""
    v = "/v2/models/{name}"
    vv = "/v2/models/{name}/versions/{version}"
    return Starlette(
        routes=[
            Route("/model", model_summary, methods=["GET"]),
            Route("/v2", server_metadata, methods=["GET"]),
            Route("/v2/health/live", server_live, methods=["GET"]),
            Route("/v2/health/ready", server_ready, methods=["GET"]),
            Route(v, model_metadata, methods=["GET"]),
            Route(vv, model_metadata, methods=["GET"]),
            Route(v + "/ready", model_ready, methods=["GET"]),
            Route(vv + "/ready", model_ready, methods=["GET"]),
            Route(v + "/infer", model_infer, methods=["POST"]),
            Route(vv + "/infer", model_infer, methods=["POST"]),
        ]
    )
