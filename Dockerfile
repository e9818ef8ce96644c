# syntax=docker/dockerfile:1
# PD-L1 inference service (BentoML HTTP :3000 + Open Inference Protocol gRPC :8001) on a CUDA host.
#
# CUDA 13.0 + cuDNN 9: onnxruntime-gpu 1.31 and the PyPI torch 2.13 wheel are both built for them
# (onnxruntime-gpu 1.2x used CUDA 12.x + cuDNN 9; override CUDA_IMAGE/ORT_VERSION together if you pin
# those). Needs an NVIDIA driver >= 580 and the NVIDIA Container Toolkit (`docker run --gpus all`).
#
# Two ways to provide the model (an export directory written by `pdl1 export`):
#   mounted (default target):
#     docker build -t pdl1 .
#     docker run --gpus all -p 3000:3000 -p 8001:8001 -v /path/to/export:/models/pdl1:ro pdl1
#   or mount a BentoML model store instead and pick the tag:
#     docker run --gpus all -p 3000:3000 -p 8001:8001 -e PDL1_MODEL_DIR= -e PDL1_MODEL_TAG=pdl1:latest \
#       -v "$HOME/bentoml:/bentoml:ro" -e BENTOML_HOME=/bentoml pdl1
#   baked in (the export is copied into the image; MODEL_DIR is a path inside the build context):
#     docker build --target baked --build-arg MODEL_DIR=exports/pdl1 -t pdl1:baked .
#     docker run --gpus all -p 3000:3000 -p 8001:8001 pdl1:baked
# Settings are PDL1_* environment variables (service/config.py), e.g. -e PDL1_API_TOKEN=... for auth.

ARG CUDA_IMAGE=nvidia/cuda:13.0.1-cudnn-runtime-ubuntu24.04

FROM ${CUDA_IMAGE} AS runtime

# Pinned GPU runtime: kept in one ARG so tests/service/test_container.py can resolve exactly these.
ARG RUNTIME_PINS="onnxruntime-gpu==1.31.1 torch==2.13.0"

ENV DEBIAN_FRONTEND=noninteractive \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    VIRTUAL_ENV=/opt/venv \
    PATH=/opt/venv/bin:$PATH \
    BENTOML_DO_NOT_TRACK=1 \
    BENTOML_HOME=/home/pdl1/bentoml \
    PDL1_GRPC_HOST=0.0.0.0 \
    PDL1_GRPC_PORT=8001

# Ubuntu's own Python (3.12) in a virtualenv; apt versions follow the pinned base image.
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends python3 python3-venv libgomp1 ca-certificates \
    && rm -rf /var/lib/apt/lists/* \
    && python3 -m venv "$VIRTUAL_ENV" \
    && useradd --create-home --uid 10001 --shell /usr/sbin/nologin pdl1

WORKDIR /opt/pdl1/src
COPY pyproject.toml README.md ./
COPY core ./core
COPY training ./training
COPY export ./export
COPY service ./service
COPY cli ./cli
COPY bentofile.yaml ./

# GPU runtime first (so pip keeps these builds), then the project with its remaining dependencies
# (`.` is this source tree; its requirements are declared in pyproject.toml).
# hadolint ignore=SC2086,DL3013
RUN pip install ${RUNTIME_PINS} \
    && pip install . \
    && python -c "import onnxruntime, service.service" \
    && mkdir -p /models "$BENTOML_HOME" \
    && chown -R pdl1:pdl1 /models "$BENTOML_HOME"

WORKDIR /opt/pdl1
USER 10001:10001
EXPOSE 3000 8001
HEALTHCHECK --interval=30s --timeout=5s --start-period=180s --retries=3 \
    CMD ["python", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:3000/readyz', timeout=4)"]
CMD ["bentoml", "serve", "service.service:PDL1", "--host", "0.0.0.0", "--port", "3000"]

# --- the model copied into the image --------------------------------------------------------------------
FROM runtime AS baked
ARG MODEL_DIR=model
COPY --chown=pdl1:pdl1 ${MODEL_DIR} /opt/pdl1/model
ENV PDL1_MODEL_DIR=/opt/pdl1/model

# --- default: the model mounted at run time --------------------------------------------------------------
FROM runtime AS mounted
ENV PDL1_MODEL_DIR=/models/pdl1
VOLUME ["/models"]
