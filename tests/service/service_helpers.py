"""Service test fixtures: a small real export, tiny patient files, and real `bentoml serve` processes.

Servers run on 127.0.0.1 with free ports and a temporary BENTOML_HOME; each test module starts at most one
(start-up costs tens of seconds on a small CPU) and stops it, whole process group, when the module ends.
"""

from __future__ import annotations

import io
import os
import signal
import socket
import subprocess
import sys
import time
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import numpy as np
import pytest
import SimpleITK as sitk

from tests.fixtures_imaging import phantom, write_dicom_series
from tests.service._export import build_small_export, import_to_store

ROOT = Path(__file__).resolve().parents[2]

BENTOML = Path(sys.executable).with_name("bentoml")
STARTUP_TIMEOUT_S = float(os.environ.get("PDL1_TEST_STARTUP_TIMEOUT", "600"))
# A name that must never reach the server log (uploads' names can identify patients).
SECRET_NAME = "DOE_JOHN_0042"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def small_export(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_small_export(tmp_path_factory.mktemp("export") / "pdl1")


@dataclass
class Patient:
    image: sitk.Image
    mask: sitk.Image
    files: dict[str, Path] = field(default_factory=dict)


@pytest.fixture(scope="session")
def patient(tmp_path_factory: pytest.TempPathFactory) -> Patient:
    """A small phantom in several formats, an oblique-free LPS grid with a non-trivial origin/spacing."""
    folder = tmp_path_factory.mktemp("patient")
    image, mask, _ = phantom((20, 48, 52), spacing=(0.8, 0.8, 2.0), origin=(-40.0, -30.0, 100.0), seed=3)
    p = Patient(image=image, mask=mask)
    for key, img, name in (
        ("image_nii", image, f"{SECRET_NAME}_image.nii.gz"),
        ("mask_nii", mask, f"{SECRET_NAME}_mask.nii.gz"),
        ("image_nrrd", image, "image.nrrd"),
        ("mask_mha", mask, "mask.mha"),
    ):
        path = folder / name
        sitk.WriteImage(img, str(path), useCompression=name.endswith(".gz"))
        p.files[key] = path
    # The same image as a zipped DICOM series (int16 with rescale slope/intercept, as scanners store it).
    arr = sitk.GetArrayFromImage(image)
    series = folder / "dicom"
    write_dicom_series(
        series,
        np.round(arr * 100).astype(np.int16),
        slope=0.01,
        spacing=image.GetSpacing(),
        origin=image.GetOrigin(),
        direction=image.GetDirection(),
    )
    zpath = folder / f"{SECRET_NAME}_series.zip"
    with zipfile.ZipFile(zpath, "w") as zf:
        for f in sorted(series.iterdir()):
            zf.write(f, f.name)
    p.files["image_zip"] = zpath
    return p


@dataclass
class Server:
    http: str
    grpc: str
    log: Path
    proc: subprocess.Popen
    env: dict[str, str]

    def log_text(self) -> str:
        return self.log.read_text(errors="replace")

    def healthy(self) -> bool:
        try:
            return httpx.get(self.http + "/readyz", timeout=10).status_code == 200
        except httpx.HTTPError:
            return False


@pytest.fixture(scope="session")
def bentoml_home(tmp_path_factory: pytest.TempPathFactory, small_export: Path) -> tuple[Path, str]:
    """A temporary BentoML home with the small export saved in its model store."""
    home = tmp_path_factory.mktemp("bentoml_home")
    return home, import_to_store(small_export, home)


def start_server(folder: Path, env_overrides: dict[str, str], *, via_cli: bool = False) -> Server:
    """Start `bentoml serve service.service:PDL1` (or `pdl1 serve`, which wraps it) on loopback and wait
    until /readyz answers 200."""
    http_port, grpc_port = free_port(), free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("PDL1_")}
    env.update(
        {
            "BENTOML_DO_NOT_TRACK": "1",
            "BENTOML_HOME": str(folder / "bentoml"),
            "PDL1_GRPC_HOST": "127.0.0.1",
            "PDL1_GRPC_PORT": str(grpc_port),
            "PDL1_PROVIDERS": "CPUExecutionProvider",
            "PDL1_ORT_THREADS": "2",
            "PYTHONUNBUFFERED": "1",
            **env_overrides,
        }
    )
    log = folder / f"server_{http_port}.log"
    cmd = [str(BENTOML), "serve", "service.service:PDL1", "--host", "127.0.0.1", "--port", str(http_port)]
    if via_cli:
        cmd = [sys.executable, "-m", "cli.main", "serve", "--host", "127.0.0.1", "--port", str(http_port)]
        cmd += ["--grpc-port", str(grpc_port)]
        if "PDL1_MODEL_DIR" in env:
            cmd += ["--model-dir", env.pop("PDL1_MODEL_DIR")]
    with open(log, "w") as fh:
        proc = subprocess.Popen(
            cmd, cwd=ROOT, env=env, stdout=fh, stderr=subprocess.STDOUT, start_new_session=True
        )
    server = Server(
        http=f"http://127.0.0.1:{http_port}", grpc=f"127.0.0.1:{grpc_port}", log=log, proc=proc, env=env
    )
    deadline = time.monotonic() + STARTUP_TIMEOUT_S
    while not server.healthy():
        if proc.poll() is not None or time.monotonic() > deadline:
            stop_server(server)
            raise RuntimeError(
                f"server did not become ready (rc={proc.returncode}):\n{server.log_text()[-6000:]}"
            )
        time.sleep(2)
    return server


def stop_server(server: Server) -> None:
    """SIGTERM the server's process group (it was started in its own session), then SIGKILL if needed."""
    if server.proc.poll() is None:
        os.killpg(server.proc.pid, signal.SIGTERM)
        try:
            server.proc.wait(60)
        except subprocess.TimeoutExpired:
            os.killpg(server.proc.pid, signal.SIGKILL)
            server.proc.wait(30)


@pytest.fixture(scope="module")
def server_factory(tmp_path_factory: pytest.TempPathFactory) -> Iterator:
    started: list[Server] = []

    def make(env: dict[str, str], *, via_cli: bool = False) -> Server:
        server = start_server(tmp_path_factory.mktemp("server"), env, via_cli=via_cli)
        started.append(server)
        return server

    yield make
    for server in started:
        stop_server(server)


def nifti_bytes_to_image(data: bytes) -> sitk.Image:
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "cam.nii.gz"
        path.write_bytes(data)
        return sitk.ReadImage(str(path))


def png_size(data: bytes) -> tuple[int, int]:
    from PIL import Image

    with Image.open(io.BytesIO(data)) as im:
        im.load()
        return im.size
