"""Call a running service: HTTP (`/predict`, via httpx) or gRPC (Open Inference Protocol model `pdl1`).

A DICOM series folder is zipped in memory before upload (the service accepts a zip of one series).
"""

from __future__ import annotations

import base64
import io
import zipfile
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

DEFAULT_TIMEOUT_S = 600.0


def file_payload(path: Path) -> tuple[str, bytes]:
    """(upload name, bytes): a file as is, a folder (DICOM series) as a zip of its files."""
    path = Path(path)
    if path.is_dir():
        buf = io.BytesIO()
        with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as zf:
            for f in sorted(p for p in path.rglob("*") if p.is_file()):
                zf.write(f, f.relative_to(path).as_posix())
        return path.name + ".zip", buf.getvalue()
    return path.name, path.read_bytes()


def _auth_headers(token: str | None) -> dict[str, str]:
    return {"authorization": f"Bearer {token}"} if token else {}


def predict_http(
    url: str,
    image: Path,
    mask: Path,
    *,
    return_cam: bool = False,
    cam_format: str = "nifti",
    token: str | None = None,
    timeout: float = DEFAULT_TIMEOUT_S,
) -> dict[str, Any]:
    """POST /predict; returns the JSON answer. Raises `ServiceError` with the server's message on 4xx/5xx."""
    import httpx

    files = {"image": file_payload(image), "mask": file_payload(mask)}
    data = {"return_cam": "true" if return_cam else "false", "cam_format": cam_format}
    response = httpx.post(
        url.rstrip("/") + "/predict", files=files, data=data, headers=_auth_headers(token), timeout=timeout
    )
    body = _json_or_text(response)
    if response.status_code >= 400:
        raise ServiceError(response.status_code, body.get("error", body) if isinstance(body, dict) else body)
    return body


def grpc_target(url: str) -> str:
    """'grpc://host:port', 'http://host:port' or 'host:port' -> 'host:port'."""
    parsed = urlparse(url if "://" in url else f"grpc://{url}")
    return f"{parsed.hostname}:{parsed.port or 8001}"


def predict_grpc(
    url: str,
    image: Path,
    mask: Path,
    *,
    return_cam: bool = False,
    token: str | None = None,
    timeout: float = DEFAULT_TIMEOUT_S,
) -> dict[str, Any]:
    """ModelInfer on model `pdl1` with raw BYTES inputs; the CAM (NIfTI) comes back base64 like over HTTP."""
    import grpc

    from service.oip import grpc_predict_v2_pb2 as pb
    from service.oip import grpc_predict_v2_pb2_grpc as pb_grpc
    from service.oip.tensors import decode_raw_bytes, encode_raw_bytes

    request = pb.ModelInferRequest(model_name="pdl1")
    request.parameters["return_cam"].bool_param = return_cam
    for name, path in (("image", image), ("mask", mask)):
        request.inputs.add(name=name, datatype="BYTES", shape=[1])
        request.raw_input_contents.append(encode_raw_bytes([file_payload(path)[1]]))
    limit = 1024 * 1024 * 1024
    options = [("grpc.max_receive_message_length", limit), ("grpc.max_send_message_length", limit)]
    metadata = tuple(_auth_headers(token).items())
    with grpc.insecure_channel(grpc_target(url), options=options) as channel:
        stub = pb_grpc.GRPCInferenceServiceStub(channel)
        try:
            response = stub.ModelInfer(request, timeout=timeout, metadata=metadata)
        except grpc.RpcError as exc:
            raise ServiceError(exc.code().name, exc.details()) from exc
    raw = dict(zip([o.name for o in response.outputs], response.raw_output_contents))
    import numpy as np

    result: dict[str, Any] = {
        "probability": float(np.frombuffer(raw["probability"], dtype="<f4")[0]),
        "label": int(np.frombuffer(raw["label"], dtype="<i4")[0]),
        "model": {"name": response.model_name, "version": response.model_version},
    }
    if "cam" in raw:
        result["cam"] = base64.b64encode(decode_raw_bytes(raw["cam"], "cam")[0]).decode("ascii")
        result["cam_format"] = "nifti"
    return result


def save_cam(result: dict[str, Any], out: Path) -> Path:
    """Write the base64 CAM of a result to `out` (.nii.gz or .png, as requested)."""
    if not result.get("cam"):
        raise ValueError("the result holds no CAM (ask with return_cam)")
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_bytes(base64.b64decode(result["cam"]))
    return out


class ServiceError(RuntimeError):
    """The service refused or failed a request; `status` is the HTTP status or gRPC code name."""

    def __init__(self, status: int | str, message: Any) -> None:
        self.status = status
        self.message = message
        super().__init__(f"{status}: {message}")


def _json_or_text(response: Any) -> Any:
    try:
        return response.json()
    except ValueError:
        return response.text
