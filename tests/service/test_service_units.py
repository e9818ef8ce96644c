"""Fast, in-process tests of the service's building blocks (no BentoML server, no model)."""

from __future__ import annotations

import asyncio
import struct

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route
from starlette.testclient import TestClient

from core.errors import InputError
from service.auth import BearerAuthInterceptor, BearerAuthMiddleware, token_matches
from service.config import load_settings
from service.errors import PayloadTooLarge, RequestError, UnsupportedFormat, error_body, http_status
from service.oip import grpc_predict_v2_pb2 as pb
from service.oip.tensors import (
    decode_json_bytes,
    decode_raw_bytes,
    encode_raw_bytes,
    grpc_input_to_numpy,
    json_input_to_numpy,
    numpy_to_grpc_output,
    numpy_to_json_output,
)
from service.pipeline import normalise_cam
from service.uploads import BodySizeLimitMiddleware, neutral_name

# ----------------------------------------------------------------------------------------------- settings


def test_settings_read_prefixed_environment_and_name_bad_variables() -> None:
    s = load_settings(
        {"PDL1_MAX_BATCH_SIZE": "8", "PDL1_GRPC_PORT": "0", "PDL1_PROVIDERS": "A, B", "PDL1_MODEL_DIR": ""}
    )
    assert (s.max_batch_size, s.grpc_port, s.provider_list, s.model_dir) == (8, 0, ["A", "B"], None)
    assert load_settings({}).model_tag == "pdl1:latest"
    with pytest.raises(ValueError, match="PDL1_MAX_BATCH_SIZE"):
        load_settings({"PDL1_MAX_BATCH_SIZE": "0"})


# ------------------------------------------------------------------------------------------------- errors


@pytest.mark.parametrize(
    ("exc", "status"),
    [
        (RequestError("bad option", field="cam_format"), 400),
        (PayloadTooLarge("too big", field="image"), 413),
        (UnsupportedFormat("what is this", field="image"), 415),
        (InputError("image has 9 voxels, above the 8 limit", source="/tmp/p.nii"), 413),
        (InputError("unrecognised upload format; supported: x", source="a"), 415),
        (InputError("mask is empty", field="mask"), 422),
    ],
)
def test_input_errors_map_to_http_status(exc: InputError, status: int) -> None:
    assert http_status(exc) == status


def test_error_body_never_contains_the_source_path() -> None:
    exc = InputError("file is truncated", source="/uploads/DOE_JOHN_123.nii.gz", field="image")
    body = error_body(exc)
    assert "DOE_JOHN" not in str(body) and body == {
        "error": "field 'image': file is truncated",
        "field": "image",
    }


def test_neutral_name_keeps_the_format_only() -> None:
    assert neutral_name("image", "/tmp/abcDOE_JOHN.nii.gz") == "image.nii.gz"
    assert neutral_name("mask", "Smith.MHA") == "mask.mha"
    assert neutral_name("image", "noextension") == "image"
    assert neutral_name("image", None) == "image"


def test_normalise_cam_is_relu_over_patient_max() -> None:
    maps = np.array([[[-1.0, 2.0]], [[4.0, 0.0]]], dtype=np.float32)
    np.testing.assert_allclose(normalise_cam(maps), [[[0.0, 0.5]], [[1.0, 0.0]]])
    assert not normalise_cam(-np.ones((2, 2, 2))).any()


# ---------------------------------------------------------------------------------------- HTTP middleware


def _echo_app(token: str | None, max_bytes: int) -> Starlette:
    async def echo(request: Request) -> JSONResponse:
        return JSONResponse({"n": len(await request.body())})

    routes = [Route(p, echo, methods=["GET", "POST"]) for p in ("/predict", "/livez", "/metrics")]
    app: object = Starlette(routes=routes)
    app = BodySizeLimitMiddleware(app, max_bytes=max_bytes)
    if token:
        app = BearerAuthMiddleware(app, token=token)
    return app  # type: ignore[return-value]


def test_token_matches_bearer_scheme_only() -> None:
    assert token_matches("Bearer s3cret", "s3cret")
    assert token_matches("bearer  s3cret ", "s3cret")
    assert not token_matches("Bearer s3cre", "s3cret")
    assert not token_matches("Basic s3cret", "s3cret")
    assert not token_matches(None, "s3cret")
    assert not token_matches("", "s3cret")


def test_auth_middleware_401_without_token_and_open_probes() -> None:
    client = TestClient(_echo_app("s3cret", 1000))
    missing = client.post("/predict", content=b"x")
    assert missing.status_code == 401 and "token" in missing.json()["error"]
    assert client.post("/predict", content=b"x", headers={"authorization": "Bearer wrong"}).status_code == 401
    ok = client.post("/predict", content=b"x", headers={"authorization": "Bearer s3cret"})
    assert ok.status_code == 200 and ok.json() == {"n": 1}
    assert client.get("/livez").status_code == 200
    assert client.get("/metrics").status_code == 200


def test_body_limit_rejects_declared_and_streamed_bodies() -> None:
    client = TestClient(_echo_app(None, 1000))
    assert client.post("/predict", content=b"x" * 1000).json() == {"n": 1000}
    declared = client.post("/predict", content=b"x" * 1001)
    assert declared.status_code == 413 and "limit" in declared.json()["error"]

    def chunks():  # no Content-Length: the middleware must count
        for _ in range(5):
            yield b"y" * 300

    streamed = client.post("/predict", content=chunks())
    assert streamed.status_code == 413


# --------------------------------------------------------------------------------------- tensor codecs


def test_raw_bytes_roundtrip_and_truncation() -> None:
    items = [b"", b"abc", bytes(range(256))]
    raw = encode_raw_bytes(items)
    assert raw[:4] == struct.pack("<I", 0)
    assert decode_raw_bytes(raw, "x") == items
    with pytest.raises(RequestError, match="longer than"):
        decode_raw_bytes(raw[:-1], "x")
    with pytest.raises(RequestError, match="length prefix"):
        decode_raw_bytes(b"\x01\x00", "x")


def test_grpc_tensor_raw_and_typed_contents() -> None:
    x = np.arange(6, dtype=np.float32).reshape(2, 3)
    t = pb.ModelInferRequest.InferInputTensor(name="slices", datatype="FP32", shape=[2, 3])
    np.testing.assert_array_equal(grpc_input_to_numpy(t, x.tobytes(), max_elements=100), x)
    t.contents.fp32_contents.extend(x.ravel().tolist())
    np.testing.assert_array_equal(grpc_input_to_numpy(t, None, max_elements=100), x)
    with pytest.raises(RequestError, match="needs 24"):
        grpc_input_to_numpy(t, x.tobytes()[:-4], max_elements=100)
    with pytest.raises(PayloadTooLarge):
        grpc_input_to_numpy(t, x.tobytes(), max_elements=5)
    bad = pb.ModelInferRequest.InferInputTensor(name="s", datatype="COMPLEX", shape=[1])
    with pytest.raises(RequestError, match="unsupported datatype"):
        grpc_input_to_numpy(bad, b"", max_elements=10)
    out, raw = numpy_to_grpc_output("p", "FP32", np.array([0.25], np.float32), raw=True)
    assert list(out.shape) == [1] and np.frombuffer(raw, "<f4")[0] == 0.25
    out, raw = numpy_to_grpc_output("l", "INT32", np.array([1, 0], np.int32), raw=False)
    assert raw is None and list(out.contents.int_contents) == [1, 0]


def test_json_tensors() -> None:
    x = json_input_to_numpy(
        {"name": "s", "datatype": "FP32", "shape": [2, 2], "data": [1, 2, 3, 4]}, max_elements=10
    )
    assert x.shape == (2, 2) and x.dtype == np.float32
    with pytest.raises(RequestError, match="needs 4"):
        json_input_to_numpy(
            {"name": "s", "datatype": "FP32", "shape": [2, 2], "data": [1, 2]}, max_elements=10
        )
    with pytest.raises(RequestError, match="shape"):
        json_input_to_numpy({"name": "s", "datatype": "FP32", "shape": "2", "data": [1]}, max_elements=10)
    assert numpy_to_json_output("c", "BYTES", np.array([b"hi"], dtype=object))["data"] == ["aGk="]
    assert decode_json_bytes("aGk=", "c") == b"hi"
    with pytest.raises(RequestError, match="base64"):
        decode_json_bytes("not base64!", "c")


# ------------------------------------------------------------------------------------- gRPC interceptor


def test_grpc_interceptor_protects_all_but_probes() -> None:
    async def scenario() -> tuple[object, ...]:
        server = grpc.aio.server(interceptors=[BearerAuthInterceptor("s3cret")])
        servicer = health.aio.HealthServicer()
        health_pb2_grpc.add_HealthServicer_to_server(servicer, server)
        from service.oip import grpc_predict_v2_pb2_grpc as pb_grpc

        class Live(pb_grpc.GRPCInferenceServiceServicer):
            async def ServerLive(self, request, context):
                return pb.ServerLiveResponse(live=True)

            async def ServerMetadata(self, request, context):
                return pb.ServerMetadataResponse(name="pdl1")

        pb_grpc.add_GRPCInferenceServiceServicer_to_server(Live(), server)
        port = server.add_insecure_port("127.0.0.1:0")
        await server.start()
        try:
            async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
                stub = pb_grpc.GRPCInferenceServiceStub(channel)
                live = await stub.ServerLive(pb.ServerLiveRequest())
                checked = await health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest())
                try:
                    await stub.ServerMetadata(pb.ServerMetadataRequest())
                    denied = None
                except grpc.aio.AioRpcError as exc:
                    denied = exc.code()
                allowed = await stub.ServerMetadata(
                    pb.ServerMetadataRequest(), metadata=(("authorization", "Bearer s3cret"),)
                )
        finally:
            await server.stop(0)
        return live.live, checked.status, denied, allowed.name

    live, status, denied, name = asyncio.run(scenario())
    assert live is True and status == health_pb2.HealthCheckResponse.SERVING
    assert denied == grpc.StatusCode.UNAUTHENTICATED
    assert name == "pdl1"


# ------------------------------------------------------------------------------------ graph client retry


def test_graph_call_is_retried_on_closed_connections_then_fails(monkeypatch) -> None:
    import aiohttp

    from service import pipeline
    from service.pipeline import GRAPH_CALL_ATTEMPTS, Pipeline

    monkeypatch.setattr(pipeline, "RETRY_PAUSE_S", 0.0)

    class FlakyGraph:
        def __init__(self, failures: int) -> None:
            self.failures = failures
            self.calls = 0

        async def describe(self) -> dict:
            self.calls += 1
            if self.calls <= self.failures:
                raise aiohttp.ServerDisconnectedError()
            return {"ok": True}

    assert GRAPH_CALL_ATTEMPTS >= 3  # one retry was not enough under load (64 clients, 2 CPUs)
    recovers = FlakyGraph(failures=GRAPH_CALL_ATTEMPTS - 1)
    assert asyncio.run(Pipeline(lambda: recovers, load_settings({}))._call("describe")) == {"ok": True}
    assert recovers.calls == GRAPH_CALL_ATTEMPTS
    down = FlakyGraph(failures=GRAPH_CALL_ATTEMPTS)
    with pytest.raises(aiohttp.ServerDisconnectedError):
        asyncio.run(Pipeline(lambda: down, load_settings({}))._call("describe"))
    assert down.calls == GRAPH_CALL_ATTEMPTS


def test_load_bench_reads_the_batch_histogram_and_refuses_remote_hosts() -> None:
    from bench.load import _check_loopback, batch_histogram

    text = "\n".join(
        [
            "# HELP bentoml_service_adaptive_batch_size Service adaptive batch size",
            'bentoml_service_adaptive_batch_size_sum{service_name="PDL1Graph",worker_index="1"} 40.0',
            'bentoml_service_adaptive_batch_size_count{service_name="PDL1Graph",worker_index="1"} 4.0',
            'bentoml_service_adaptive_batch_size_count{service_name="Other",worker_index="1"} 9.0',
        ]
    )
    assert batch_histogram(text) == (40.0, 4.0)
    _check_loopback("127.0.0.1")
    with pytest.raises(SystemExit, match="loopback"):
        _check_loopback("10.0.0.5")


def test_cam_source_names_the_method_actually_used() -> None:
    from core.cam import ABLATION_CAM_LABEL, GRADCAM_LABEL
    from core.preprocessing import PreprocessConfig
    from service.pipeline import CAM_SOURCE_ABLATION, CAM_SOURCE_GRAPH, CAM_SOURCE_TORCH, ModelInfo

    def info(has_graph_cam: bool, method: str) -> ModelInfo:
        return ModelInfo(
            "m:1",
            "m",
            "1",
            0.5,
            "fp32",
            "CPUExecutionProvider",
            has_graph_cam,
            PreprocessConfig(),
            {"cam_method": method},
        )

    assert info(True, "in-graph CAM").cam_source == CAM_SOURCE_GRAPH
    assert info(True, "in-graph CAM").torch_cam_source == CAM_SOURCE_TORCH
    assert info(False, GRADCAM_LABEL).cam_source == CAM_SOURCE_TORCH
    assert info(False, ABLATION_CAM_LABEL).cam_source == CAM_SOURCE_ABLATION
