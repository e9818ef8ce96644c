"""A real `bentoml serve` on loopback (model from the BentoML store), called over HTTP, OIP REST and gRPC.

Reference answers come from `core` in this process on the same files (core.io -> core.preprocessing ->
core.runtime.InferenceModel), i.e. what `pdl1 predict` computes.
"""

from __future__ import annotations

import asyncio
import base64
import io
import json
import subprocess
import sys
import zipfile
from pathlib import Path

import grpc
import httpx
import numpy as np
import pytest
import SimpleITK as sitk

from core.io import read_image, read_mask
from core.preprocessing import preprocess
from core.runtime import InferenceModel
from service.pipeline import normalise_cam, upsample_cam
from tests.service.service_helpers import SECRET_NAME, Patient, Server, nifti_bytes_to_image, png_size

pytestmark = [pytest.mark.service, pytest.mark.slow]

MAX_UPLOAD_MB = 16  # above a JSON-encoded network input (~9 MB), below what the limit test sends
MAX_VOXELS = 200_000


@pytest.fixture(scope="module")
def server(server_factory, bentoml_home) -> Server:
    home, tag = bentoml_home
    return server_factory(
        {
            "BENTOML_HOME": str(home),
            "PDL1_MODEL_TAG": tag,
            "PDL1_MAX_UPLOAD_MB": str(MAX_UPLOAD_MB),
            "PDL1_MAX_VOXELS": str(MAX_VOXELS),
            "PDL1_MAX_BATCH_SIZE": "32",
            "PDL1_MAX_LATENCY_MS": "120000",
            "PDL1_GRPC_REFLECTION": "1",
        }
    )


@pytest.fixture(scope="module")
def model(small_export: Path) -> InferenceModel:
    return InferenceModel.load(small_export, providers=["CPUExecutionProvider"])


@pytest.fixture(scope="module")
def reference(model: InferenceModel, patient: Patient) -> dict:
    """probability, preprocessed input and in-graph CAM of the NIfTI pair, computed in-process."""
    image = read_image(patient.files["image_nii"])
    prep = preprocess(image, read_mask(patient.files["mask_nii"], image), model.preprocess_config)
    out = model.predict(prep.slices[None])
    return {"probability": float(out["probability"][0]), "prep": prep, "cam": out["cam"][0]}


def post_predict(server: Server, image: Path | tuple, mask: Path | tuple, **data) -> httpx.Response:
    def part(p):
        return p if isinstance(p, tuple) else (p.name, p.read_bytes())

    files = {"image": part(image), "mask": part(mask)}
    return httpx.post(server.http + "/predict", files=files, data=data, timeout=600)


# -------------------------------------------------------------------------------------------- operations


def test_operational_endpoints(server: Server) -> None:
    for path in ("/livez", "/readyz", "/metrics"):
        assert httpx.get(server.http + path, timeout=30).status_code == 200, path
    spec = httpx.get(server.http + "/docs.json", timeout=30).json()
    assert {"/predict", "/predict_preprocessed"} <= set(spec["paths"])


def test_model_summary(server: Server, bentoml_home, model: InferenceModel) -> None:
    body = httpx.get(server.http + "/model", timeout=30).json()
    assert body["tag"] == bentoml_home[1]
    assert body["version"] == model.manifest.version
    assert body["threshold"] == pytest.approx(model.threshold)
    assert body["provider"] == "CPUExecutionProvider" and body["variant"] == "fp32"
    assert body["preprocess"] == model.preprocess_config.model_dump(mode="json")
    assert body["has_graph_cam"] is True and body["batching"]["max_batch_size"] == 32


# ------------------------------------------------------------------------------------------------ predict


def test_predict_matches_in_process_inference(server: Server, patient: Patient, reference: dict) -> None:
    r = post_predict(server, patient.files["image_nii"], patient.files["mask_nii"])
    assert r.status_code == 200, r.text
    body = r.json()
    assert abs(body["probability"] - reference["probability"]) <= 1e-5
    assert body["label"] == int(body["probability"] >= body["threshold"])
    assert body["model"]["provider"] == "CPUExecutionProvider"
    assert {"read_preprocess", "inference", "total"} <= set(body["timings_ms"])
    assert body.get("cam") is None


@pytest.mark.parametrize(("image_key", "mask_key"), [("image_nrrd", "mask_mha"), ("image_zip", "mask_nii")])
def test_predict_other_formats(
    server: Server, patient: Patient, model: InferenceModel, image_key, mask_key
) -> None:
    image = read_image(patient.files[image_key])
    prep = preprocess(image, read_mask(patient.files[mask_key], image), model.preprocess_config)
    expected = float(model.predict(prep.slices[None])["probability"][0])
    r = post_predict(server, patient.files[image_key], patient.files[mask_key])
    assert r.status_code == 200, r.text
    assert abs(r.json()["probability"] - expected) <= 1e-5


def test_cam_nifti_is_on_the_input_grid(server: Server, patient: Patient, reference: dict) -> None:
    r = post_predict(server, patient.files["image_nii"], patient.files["mask_nii"], return_cam="true")
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["cam_source"] == "graph" and body["cam_format"] == "nifti"
    cam = nifti_bytes_to_image(base64.b64decode(body["cam"]))
    img = patient.image
    assert cam.GetSize() == img.GetSize()
    np.testing.assert_allclose(cam.GetOrigin(), img.GetOrigin(), atol=1e-4)
    np.testing.assert_allclose(cam.GetSpacing(), img.GetSpacing(), atol=1e-6)
    np.testing.assert_allclose(cam.GetDirection(), img.GetDirection(), atol=1e-6)
    values = sitk.GetArrayFromImage(cam)
    maps = normalise_cam(upsample_cam(reference["cam"], 224))
    expected = sitk.GetArrayFromImage(reference["prep"].map_to_image(maps))
    np.testing.assert_allclose(values, expected, atol=1e-5)
    assert 0.5 < values.max() <= 1.0  # normalised (the peak lies between voxel centres), not empty
    mask = sitk.GetArrayFromImage(patient.mask) > 0
    assert values[mask].mean() > 0  # the map covers the tumour's slices


def test_cam_png_overlay(server: Server, patient: Patient) -> None:
    r = post_predict(
        server, patient.files["image_nii"], patient.files["mask_nii"], return_cam="true", cam_format="png"
    )
    assert r.status_code == 200, r.text
    assert png_size(base64.b64decode(r.json()["cam"])) == (3 * 224, 224)


def test_predict_preprocessed_json_and_npy(server: Server, reference: dict) -> None:
    slices = reference["prep"].slices
    as_json = httpx.post(server.http + "/predict_preprocessed", json={"slices": slices.tolist()}, timeout=600)
    assert as_json.status_code == 200, as_json.text
    buf = io.BytesIO()
    np.save(buf, slices)
    as_npy = httpx.post(
        server.http + "/predict_preprocessed", files={"npy": ("x.npy", buf.getvalue())}, timeout=600
    )
    assert as_npy.status_code == 200, as_npy.text
    for r in (as_json, as_npy):
        assert abs(r.json()["probability"][0] - reference["probability"]) <= 1e-5


# ---------------------------------------------------------------------------------------------- bad input


def _nifti(tmp: Path, name: str, img: sitk.Image) -> Path:
    path = tmp / name
    sitk.WriteImage(img, str(path))
    return path


def _zip(tmp: Path, name: str, members: dict[str, bytes]) -> Path:
    path = tmp / name
    with zipfile.ZipFile(path, "w") as zf:
        for member, data in members.items():
            zf.writestr(member, data)
    return path


@pytest.fixture(scope="module")
def bad_cases(tmp_path_factory, patient: Patient) -> list[tuple[str, dict, dict, set[int], str]]:
    """(case, files, form data, allowed statuses, text the error must contain)."""
    tmp = tmp_path_factory.mktemp("bad")
    img, msk = patient.files["image_nii"], patient.files["mask_nii"]
    raw_nii = _nifti(tmp, f"{SECRET_NAME}_raw.nii", patient.image)
    truncated = (f"{SECRET_NAME}_t.nii", raw_nii.read_bytes()[: raw_nii.stat().st_size // 2])
    gz_truncated = (f"{SECRET_NAME}_t.nii.gz", img.read_bytes()[:300])
    flat = sitk.GetImageFromArray(np.ones((40, 40), np.float32))
    nan_arr = sitk.GetArrayFromImage(patient.image)
    nan_arr[5, 5, 5] = np.nan
    nan_img = sitk.GetImageFromArray(nan_arr)
    nan_img.CopyInformation(patient.image)
    empty_mask = sitk.Image(patient.mask)
    empty_mask = empty_mask * 0
    far_mask = sitk.Image(patient.mask)
    far_mask.SetOrigin((500.0, 500.0, 500.0))
    big = sitk.GetImageFromArray(np.zeros((30, 100, 100), np.float32))
    series = zipfile.ZipFile(patient.files["image_zip"])
    members = {n: series.read(n) for n in series.namelist()}
    traversal = _zip(tmp, "t.zip", {"../../evil.dcm": next(iter(members.values()))})
    two_series = _zip(tmp, "two.zip", {**members, **{f"b/{k}": _reuid(v) for k, v in members.items()}})
    big_upload = (f"{SECRET_NAME}_big.nii", b"\0" * (MAX_UPLOAD_MB * 1024 * 1024 + 1))
    text = (f"{SECRET_NAME}.txt", b"hello, not an image")
    return [
        ("missing mask", {"image": img}, {}, {400}, "mask"),
        ("empty file", {"image": (f"{SECRET_NAME}.nii.gz", b""), "mask": msk}, {}, {400}, "empty"),
        ("unsupported format", {"image": text, "mask": msk}, {}, {415}, "format"),
        ("truncated nifti", {"image": truncated, "mask": msk}, {}, {422}, "truncated"),
        ("truncated gzip", {"image": gz_truncated, "mask": msk}, {}, {400, 422}, "image"),
        ("2-D image", {"image": _nifti(tmp, "flat.nii.gz", flat), "mask": msk}, {}, {422}, "3-D"),
        # MetaImage, not NIfTI: ITK's NIfTI reader turns NaN/Inf into 0 before core.io can see them.
        ("NaN voxel", {"image": _nifti(tmp, "nan.mha", nan_img), "mask": msk}, {}, {422}, "NaN"),
        ("empty mask", {"image": img, "mask": _nifti(tmp, "e.nii.gz", empty_mask)}, {}, {422}, "empty"),
        ("mask misses image", {"image": img, "mask": _nifti(tmp, "far.nii.gz", far_mask)}, {}, {422}, "mask"),
        ("too many voxels", {"image": _nifti(tmp, "big.nii.gz", big), "mask": msk}, {}, {413}, "limit"),
        ("upload too large", {"image": big_upload, "mask": msk}, {}, {413}, "limit"),
        ("zip path traversal", {"image": traversal, "mask": msk}, {}, {422}, "unsafe"),
        ("zip with two series", {"image": two_series, "mask": msk}, {}, {422}, "series"),
        (
            "bad cam_format",
            {"image": img, "mask": msk},
            {"return_cam": "true", "cam_format": "jpeg"},
            {400},
            "",
        ),
    ]


def _reuid(dicom_bytes: bytes) -> bytes:
    """The same slice in another series (new SeriesInstanceUID / SOPInstanceUID)."""
    import pydicom
    from pydicom.uid import generate_uid

    ds = pydicom.dcmread(io.BytesIO(dicom_bytes))
    if not hasattr(_reuid, "uid"):
        _reuid.uid = generate_uid()  # type: ignore[attr-defined]
    ds.SeriesInstanceUID = _reuid.uid  # type: ignore[attr-defined]
    ds.SOPInstanceUID = generate_uid()
    out = io.BytesIO()
    ds.save_as(out, enforce_file_format=True)
    return out.getvalue()


def test_bad_uploads_get_4xx_json_and_the_server_keeps_serving(
    server: Server, bad_cases, patient: Patient
) -> None:
    failures = []
    for case, files, data, statuses, needle in bad_cases:
        parts = {k: (v if isinstance(v, tuple) else (v.name, v.read_bytes())) for k, v in files.items()}
        r = httpx.post(server.http + "/predict", files=parts, data=data, timeout=600)
        try:
            body = r.json()
        except ValueError:
            body = {}
        error = json.dumps(body)
        if r.status_code not in statuses or "error" not in body or needle.lower() not in error.lower():
            failures.append(f"{case}: {r.status_code} {r.text[:300]}")
        assert SECRET_NAME not in error, f"{case}: the upload's name leaked into the response"
    assert not failures, "\n".join(failures)
    assert server.healthy()
    ok = post_predict(server, patient.files["image_nii"], patient.files["mask_nii"])
    assert ok.status_code == 200


@pytest.mark.parametrize(
    ("payload", "status", "needle"),
    [
        ({"slices": [[1.0, 2.0]]}, 400, "shape"),
        ({"slices": "abc"}, 400, "slices"),
        ({}, 400, "exactly one"),
    ],
)
def test_bad_preprocessed_input(server: Server, payload, status, needle) -> None:
    r = httpx.post(server.http + "/predict_preprocessed", json=payload, timeout=120)
    assert r.status_code == status and "error" in r.json() and needle in r.text, r.text


def test_preprocessed_nan_and_pickled_npy_are_refused(server: Server, reference: dict) -> None:
    x = reference["prep"].slices.copy()
    x[0, 0, 0, 0] = np.inf
    buf = io.BytesIO()
    np.save(buf, x)
    r = httpx.post(
        server.http + "/predict_preprocessed", files={"npy": ("x.npy", buf.getvalue())}, timeout=120
    )
    assert r.status_code == 422 and "NaN" in r.json()["error"]
    buf = io.BytesIO()
    np.save(buf, np.array([{"a": 1}], dtype=object), allow_pickle=True)
    r = httpx.post(
        server.http + "/predict_preprocessed", files={"npy": ("x.npy", buf.getvalue())}, timeout=120
    )
    assert r.status_code == 400 and "npy" in r.json()["error"]


def test_server_log_has_no_upload_names(server: Server, bad_cases) -> None:
    log = server.log_text()
    assert "POST" in log or "/predict" in log  # the log is being written
    assert SECRET_NAME not in log


# ---------------------------------------------------------------------------------------------- batching


def _batch_hist(server: Server) -> tuple[float, float, float]:
    """(sum, count, count of batches > 1) of the graph service's adaptive batch size histogram."""
    text = httpx.get(server.http + "/metrics", timeout=30).text
    total = count = le1 = 0.0
    for line in text.splitlines():
        if 'service_name="PDL1Graph"' not in line or not line.startswith(
            "bentoml_service_adaptive_batch_size"
        ):
            continue
        value = float(line.rsplit(" ", 1)[1])
        if "_sum" in line.split("{")[0]:
            total += value
        elif "_count" in line.split("{")[0]:
            count += value
        elif 'le="1.0"' in line:
            le1 += value
    return total, count, count - le1


def test_concurrent_requests_are_batched(server: Server, reference: dict) -> None:
    buf = io.BytesIO()
    np.save(buf, reference["prep"].slices)
    payload = buf.getvalue()
    before = _batch_hist(server)

    async def fire() -> list[httpx.Response]:
        async with httpx.AsyncClient(base_url=server.http, timeout=600) as client:
            return await asyncio.gather(
                *(client.post("/predict_preprocessed", files={"npy": ("x.npy", payload)}) for _ in range(32))
            )

    responses = asyncio.run(fire())
    assert all(r.status_code == 200 for r in responses), [r.text for r in responses if r.status_code != 200][
        :2
    ]
    probs = [r.json()["probability"][0] for r in responses]
    np.testing.assert_allclose(probs, reference["probability"], atol=1e-5)  # batching changes no answer
    after = _batch_hist(server)
    calls, patients, multi = after[1] - before[1], after[0] - before[0], after[2] - before[2]
    assert patients == 32
    assert multi >= 1 and calls < 32, f"no batching: {calls} graph calls for 32 requests"


# -------------------------------------------------------------------------------- Open Inference Protocol


def _triton_inputs(module, patient: Patient, *, binary: bool):
    image, mask = patient.files["image_nii"].read_bytes(), patient.files["mask_nii"].read_bytes()
    inputs = []
    for name, data in (("image", image), ("mask", mask)):
        tensor = module.InferInput(name, [1], "BYTES")
        if binary:
            tensor.set_data_from_numpy(np.array([data], dtype=object))
        else:
            tensor.set_data_from_numpy(
                np.array([base64.b64encode(data).decode()], dtype=object), binary_data=False
            )
        inputs.append(tensor)
    return inputs


def test_tritonclient_grpc(server: Server, patient: Patient, reference: dict, model: InferenceModel) -> None:
    import tritonclient.grpc as tg

    client = tg.InferenceServerClient(server.grpc)
    assert client.is_server_live() and client.is_server_ready()
    assert client.is_model_ready("pdl1") and client.is_model_ready("pdl1-graph")
    assert client.get_server_metadata().name == "pdl1"
    meta = client.get_model_metadata("pdl1-graph")
    assert meta.versions == [model.manifest.version]
    assert list(meta.inputs[0].shape) == [-1, 3, 3, 224, 224] and meta.outputs[0].datatype == "FP32"
    assert [t.name for t in client.get_model_metadata("pdl1").inputs] == ["image", "mask"]

    result = client.infer("pdl1", _triton_inputs(tg, patient, binary=True), parameters={"return_cam": True})
    assert abs(float(result.as_numpy("probability")[0]) - reference["probability"]) <= 1e-5
    assert int(result.as_numpy("label")[0]) == int(reference["probability"] >= model.threshold)
    cam = nifti_bytes_to_image(result.as_numpy("cam")[0])
    assert cam.GetSize() == patient.image.GetSize()

    pair = []  # two patients in one request: BYTES tensors of shape [2]
    for name in ("image", "mask"):
        tensor = tg.InferInput(name, [2], "BYTES")
        tensor.set_data_from_numpy(np.array([patient.files[f"{name}_nii"].read_bytes()] * 2, dtype=object))
        pair.append(tensor)
    both = client.infer("pdl1", pair).as_numpy("probability")
    np.testing.assert_allclose(both, [reference["probability"]] * 2, atol=1e-5)

    x = np.concatenate([reference["prep"].slices[None]] * 2)
    tensor = tg.InferInput("slices", list(x.shape), "FP32")
    tensor.set_data_from_numpy(x)
    np.testing.assert_allclose(
        client.infer("pdl1-graph", [tensor]).as_numpy("probability"), reference["probability"], atol=1e-5
    )


def test_tritonclient_http_json(server: Server, patient: Patient, reference: dict) -> None:
    import tritonclient.http as th

    client = th.InferenceServerClient(server.http.removeprefix("http://"))
    assert client.is_server_live() and client.is_server_ready() and client.is_model_ready("pdl1")
    assert client.get_model_metadata("pdl1")["outputs"][0]["name"] == "probability"
    outputs = [th.InferRequestedOutput(n, binary_data=False) for n in ("probability", "label")]
    result = client.infer("pdl1", _triton_inputs(th, patient, binary=False), outputs=outputs)
    assert abs(float(result.as_numpy("probability")[0]) - reference["probability"]) <= 1e-5
    x = reference["prep"].slices[None]
    tensor = th.InferInput("slices", list(x.shape), "FP32")
    tensor.set_data_from_numpy(x, binary_data=False)
    out = client.infer(
        "pdl1-graph", [tensor], outputs=[th.InferRequestedOutput("probability", binary_data=False)]
    )
    assert abs(float(out.as_numpy("probability")[0]) - reference["probability"]) <= 1e-5


def test_invalid_grpc_requests(server: Server, patient: Patient) -> None:
    import tritonclient.grpc as tg
    from tritonclient.utils import InferenceServerException

    client = tg.InferenceServerClient(server.grpc)
    wrong_shape = tg.InferInput("slices", [1, 2, 3], "FP32")
    wrong_shape.set_data_from_numpy(np.zeros((1, 2, 3), np.float32))
    text = tg.InferInput("image", [1], "BYTES")
    text.set_data_from_numpy(np.array([b"not an image"], dtype=object))
    mask = _triton_inputs(tg, patient, binary=True)[1]
    cases = [
        ("pdl1-graph", [wrong_shape], "shape"),
        ("pdl1", [text, mask], "format"),
        ("pdl1", [mask], "missing"),
    ]
    for model_name, inputs, needle in cases:
        with pytest.raises(InferenceServerException) as info:
            client.infer(model_name, inputs)
        assert info.value.status() == "StatusCode.INVALID_ARGUMENT", info.value
        assert needle in info.value.message()
    with pytest.raises(InferenceServerException) as info:
        client.get_model_metadata("nope")
    assert info.value.status() == "StatusCode.NOT_FOUND"
    assert client.is_server_ready() and server.healthy()


def test_grpc_health_and_reflection(server: Server) -> None:
    from grpc_health.v1 import health_pb2, health_pb2_grpc
    from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

    with grpc.insecure_channel(server.grpc) as channel:
        status = health_pb2_grpc.HealthStub(channel).Check(
            health_pb2.HealthCheckRequest(service="inference.GRPCInferenceService"), timeout=30
        )
        assert status.status == health_pb2.HealthCheckResponse.SERVING
        stub = reflection_pb2_grpc.ServerReflectionStub(channel)
        replies = stub.ServerReflectionInfo(iter([reflection_pb2.ServerReflectionRequest(list_services="")]))
        names = {s.name for reply in replies for s in reply.list_services_response.service}
    assert "inference.GRPCInferenceService" in names


def test_oip_rest_errors(server: Server) -> None:
    r = httpx.post(server.http + "/v2/models/pdl1-graph/infer", content=b"{not json", timeout=60)
    assert r.status_code == 400 and "error" in r.json()
    r = httpx.get(server.http + "/v2/models/unknown", timeout=60)
    assert r.status_code == 404
    assert httpx.get(server.http + "/v2/health/ready", timeout=60).json() == {"ready": True}


# ------------------------------------------------------------------------------------------------ client


@pytest.mark.parametrize("use_grpc", [False, True])
def test_pdl1_client_cli(
    server: Server, patient: Patient, reference: dict, tmp_path: Path, use_grpc: bool
) -> None:
    cam = tmp_path / "cam.nii.gz"
    cmd = [
        sys.executable, "-m", "cli.main", "client",
        "--url", server.grpc if use_grpc else server.http,
        "--image", str(patient.files["image_nii"]), "--mask", str(patient.files["mask_nii"]),
        "--cam", str(cam),
    ]  # fmt: skip
    if use_grpc:
        cmd.append("--grpc")
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=600, cwd=Path(__file__).parents[2])
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(done.stdout)
    assert abs(result["probability"] - reference["probability"]) <= 1e-5
    assert sitk.ReadImage(str(cam)).GetSize() == patient.image.GetSize()


def test_load_bench_request_kinds(
    server: Server, patient: Patient, reference: dict, small_export: Path
) -> None:
    """bench.load's four request kinds (HTTP/gRPC x upload/preprocessed) are accepted by the service, and
    its bare-graph timing runs the same export at the batch sizes asked for."""
    import argparse

    from bench import load

    image, mask = patient.files["image_nii"], patient.files["mask_nii"]
    payload = load.Payload(
        image.read_bytes(), mask.read_bytes(), load.network_input(image, mask, str(small_export))
    )
    np.testing.assert_allclose(payload.slices, reference["prep"].slices, atol=1e-6)  # the export's own config
    args = argparse.Namespace(
        url=server.http,
        grpc=server.grpc,
        protocols=["http", "grpc"],
        inputs=["upload", "preprocessed"],
        concurrency=[2],
        requests=2,
        max_seconds=120,
        timeout=300,
        token=None,
    )
    runs = load.run_against(args, payload)
    assert {(r["protocol"], r["input"]) for r in runs} == {
        (p, k) for p in ("http", "grpc") for k in ("upload", "preprocessed")
    }
    assert all(r["completed"] == 2 and r["errors"] == 0 for r in runs), runs

    bare = load.bare_graph(str(small_export), payload.slices, [1, 2], repeats=2, budget_s=30)
    assert [r["batch_patients"] for r in bare["rows"]] == [1, 2]
    assert [r["batch_slices"] for r in bare["rows"]] == [payload.slices.shape[0] * b for b in (1, 2)]
    assert bare["variant"] == InferenceModel.load(small_export).variant
    assert all(r["n"] >= 2 and r["slices_per_s"] > 0 for r in bare["rows"])
