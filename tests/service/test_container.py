"""Packaging: the Dockerfile lints clean, its pinned GPU runtime + the project resolve from PyPI as a
consistent CUDA 13 / cuDNN 9 set, and `bentoml build` makes a Bento with the model and only core/service.

No Docker engine runs here, so the image itself is not built; these are the checks that can run.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
DOCKERFILE = ROOT / "Dockerfile"
HADOLINT = Path(sys.executable).with_name("hadolint")


def runtime_pins() -> list[str]:
    """The `ARG RUNTIME_PINS="..."` requirement lines the Dockerfile installs first."""
    match = re.search(r'^ARG RUNTIME_PINS="([^"]+)"', DOCKERFILE.read_text(), flags=re.M)
    assert match, "Dockerfile has no ARG RUNTIME_PINS line"
    return shlex.split(match.group(1))


def test_dockerfile_lints_clean() -> None:
    done = subprocess.run([str(HADOLINT), str(DOCKERFILE)], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stdout + done.stderr


def test_dockerfile_essentials() -> None:
    text = DOCKERFILE.read_text()
    assert re.search(r"^ARG CUDA_IMAGE=nvidia/cuda:13\.\d+\.\d+-cudnn-runtime-", text, flags=re.M)
    assert re.search(r"^USER 10001", text, flags=re.M), "must run as a non-root user"
    assert "HEALTHCHECK" in text and re.search(r"^EXPOSE 3000 8001$", text, flags=re.M)
    assert {"AS baked", "AS mounted"} <= set(re.findall(r"AS \w+", text))
    assert any(p.startswith("onnxruntime-gpu==") for p in runtime_pins())
    assert any(p.startswith("torch==") for p in runtime_pins())


def test_bentofile_is_consistent_with_the_service() -> None:
    config = yaml.safe_load((ROOT / "bentofile.yaml").read_text())
    assert config["service"] == "service.service:PDL1"
    assert config["models"] == ["pdl1:latest"]
    packages = " ".join(config["python"]["packages"])
    assert "onnxruntime-gpu" in packages and "torch==" in packages
    for training_only in ("shap", "statsmodels", "dcurves", "pandas"):
        assert training_only not in packages
    # The same GPU runtime as the Dockerfile, so both routes ship the same CUDA build.
    for pin in runtime_pins():
        assert any(
            pin.split("==")[0] in p and pin.split("==")[1] in p for p in config["python"]["packages"]
        ), pin


@pytest.mark.slow
def test_docker_requirements_resolve_from_pypi(tmp_path: Path) -> None:
    """`pip install --dry-run` of the Dockerfile's pins + the project into a fresh venv, against PyPI only."""
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=300)
    report = tmp_path / "report.json"
    cmd = [
        str(venv / "bin" / "python"), "-m", "pip", "--isolated", "install", "--dry-run", "--quiet",
        "--ignore-installed", "--report", str(report), *runtime_pins(), str(ROOT),
    ]  # fmt: skip
    env = {k: v for k, v in os.environ.items() if not k.startswith("PIP_")}
    try:
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=900, env=env)
    except subprocess.TimeoutExpired:
        pytest.fail("resolving the Dockerfile's requirements took over 15 minutes")
    if done.returncode != 0 and (
        "Network is unreachable" in done.stderr or "NewConnectionError" in done.stderr
    ):
        pytest.skip("PyPI is not reachable from this machine: " + done.stderr[-300:])
    assert done.returncode == 0, done.stderr[-4000:]
    installed = {
        i["metadata"]["name"].lower(): i["metadata"]["version"]
        for i in json.loads(report.read_text())["install"]
    }
    assert installed["onnxruntime-gpu"] == "1.31.1"
    assert installed["torch"] == "2.13.0"  # the CUDA build (PyPI's Linux wheel), not +cpu
    assert "nvidia-cudnn-cu13" in installed and installed["nvidia-cudnn-cu13"].startswith("9.")
    assert "pdl1-dect" in installed


@pytest.mark.slow
def test_bentoml_build(tmp_path: Path, bentoml_home) -> None:
    """`bentoml build` in a temporary BENTOML_HOME holding the small export as pdl1:<version>."""
    home, tag = bentoml_home
    env = {**os.environ, "BENTOML_HOME": str(home), "BENTOML_DO_NOT_TRACK": "1"}
    env = {k: v for k, v in env.items() if not k.startswith("PDL1_")}
    bentoml = Path(sys.executable).with_name("bentoml")
    done = subprocess.run(
        [str(bentoml), "build", "-f", "bentofile.yaml", "--output", "tag", "--version", "t1"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=900,
    )  # fmt: skip
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    bento = home / "bentos" / "pdl1" / "t1"
    info = yaml.safe_load((bento / "bento.yaml").read_text())
    assert {s["name"] for s in info["services"]} == {"PDL1", "PDL1Graph"}
    assert str(info["models"][0]["tag"]) == tag  # the store model the Bento carries when exported
    graph = next(s for s in info["services"] if s["name"] == "PDL1Graph")
    assert [str(m["tag"]) for m in graph["models"]] == [tag]
    requirements = (bento / "env" / "python" / "requirements.txt").read_text()
    assert "onnxruntime-gpu" in requirements and "torch==" in requirements and "shap" not in requirements
    assert (bento / "env" / "docker" / "Dockerfile").is_file()
    src = bento / "src"
    assert (src / "service" / "service.py").is_file() and (src / "core" / "runtime.py").is_file()
    assert (src / "service" / "oip" / "grpc_predict_v2.proto").is_file()
    assert not (src / "training").exists() and not (src / "export").exists() and not (src / "tests").exists()
