"""Bearer-token auth on a real server started by `pdl1 serve --model-dir` (PDL1_API_TOKEN set).

Probes (/livez, /readyz, /metrics, OIP health, gRPC health/ServerLive) stay open; everything else needs
the token, over HTTP and gRPC alike. Auth off is covered by test_served.py (no token configured there).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import grpc
import httpx
import numpy as np
import pytest

from tests.service.service_helpers import Patient, Server

pytestmark = [pytest.mark.service, pytest.mark.slow]

TOKEN = "t0k3n-for-tests"
AUTH = {"authorization": f"Bearer {TOKEN}"}


@pytest.fixture(scope="module")
def server(server_factory, small_export: Path) -> Server:
    # Started through `pdl1 serve --model-dir ...`, so the CLI wrapper is exercised too.
    return server_factory({"PDL1_API_TOKEN": TOKEN, "PDL1_MODEL_DIR": str(small_export)}, via_cli=True)


def _files(patient: Patient) -> dict:
    return {
        "image": ("image.nii.gz", patient.files["image_nii"].read_bytes()),
        "mask": ("mask.nii.gz", patient.files["mask_nii"].read_bytes()),
    }


def test_probes_stay_open(server: Server) -> None:
    for path in ("/livez", "/readyz", "/metrics", "/v2/health/live", "/v2/health/ready"):
        assert httpx.get(server.http + path, timeout=30).status_code == 200, path


@pytest.mark.parametrize("headers", [{}, {"authorization": "Bearer wrong"}, {"authorization": TOKEN}])
def test_http_needs_the_token(server: Server, patient: Patient, headers: dict) -> None:
    r = httpx.post(server.http + "/predict", files=_files(patient), headers=headers, timeout=120)
    assert r.status_code == 401 and "token" in r.json()["error"]
    for path in ("/model", "/v2/models/pdl1", "/docs.json"):
        assert httpx.get(server.http + path, headers=headers, timeout=30).status_code == 401, path


def test_http_with_the_token(server: Server, patient: Patient, small_export: Path) -> None:
    model = httpx.get(server.http + "/model", headers=AUTH, timeout=30).json()
    manifest = json.loads((small_export / "manifest.json").read_text())
    assert model["tag"] == f"{manifest['name']}:{manifest['version']}"  # served from PDL1_MODEL_DIR
    r = httpx.post(server.http + "/predict", files=_files(patient), headers=AUTH, timeout=600)
    assert r.status_code == 200 and 0.0 <= r.json()["probability"] <= 1.0


def test_grpc_needs_the_token(server: Server, patient: Patient) -> None:
    import tritonclient.grpc as tg
    from grpc_health.v1 import health_pb2, health_pb2_grpc
    from tritonclient.utils import InferenceServerException

    client = tg.InferenceServerClient(server.grpc)
    assert client.is_server_live() and client.is_server_ready()  # probes are open
    with grpc.insecure_channel(server.grpc) as channel:
        status = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=30)
        assert status.status == health_pb2.HealthCheckResponse.SERVING
    with pytest.raises(InferenceServerException) as info:
        client.get_model_metadata("pdl1")
    assert info.value.status() == "StatusCode.UNAUTHENTICATED"
    x = np.zeros((1, 3, 3, 224, 224), np.float32)
    tensor = tg.InferInput("slices", list(x.shape), "FP32")
    tensor.set_data_from_numpy(x)
    with pytest.raises(InferenceServerException) as info:
        client.infer("pdl1-graph", [tensor], headers={"authorization": "Bearer wrong"})
    assert info.value.status() == "StatusCode.UNAUTHENTICATED"
    result = client.infer("pdl1-graph", [tensor], headers=AUTH)
    assert result.as_numpy("probability").shape == (1,)


def test_client_cli_reads_the_token_from_the_environment(server: Server, patient: Patient) -> None:
    cmd = [sys.executable, "-m", "cli.main", "client", "--url", server.http]
    cmd += ["--image", str(patient.files["image_nii"]), "--mask", str(patient.files["mask_nii"])]
    root = Path(__file__).parents[2]
    env = {k: v for k, v in os.environ.items() if k != "PDL1_API_TOKEN"}
    refused = subprocess.run(cmd, capture_output=True, text=True, timeout=600, cwd=root, env=env)
    assert refused.returncode == 2 and "401" in refused.stderr
    done = subprocess.run(
        cmd, capture_output=True, text=True, timeout=600, cwd=root, env={**env, "PDL1_API_TOKEN": TOKEN}
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert 0.0 <= json.loads(done.stdout)["probability"] <= 1.0
