"""Service settings, read once from environment variables.

Why environment variables: BentoML imports the service module in every worker process (and at
`bentoml build` time); decorator arguments such as `max_batch_size` are evaluated at import, so the
environment is the one channel that reaches all of them identically (containers, `pdl1 serve`, tests).
"""

from __future__ import annotations

import os
from functools import lru_cache
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError

PREFIX = "PDL1_"
MIB = 1024 * 1024


class Settings(BaseModel):
    """Every knob of the deployed service; field `x` is read from env `PDL1_X` (upper case)."""

    model_config = ConfigDict(frozen=True, extra="forbid", protected_namespaces=())

    model_tag: str = Field("pdl1:latest", description="BentoML model store tag of the export.")
    model_dir: str | None = Field(None, description="Export directory to serve instead of the store.")
    variant: str | None = Field(None, description="ONNX variant (fp32, fp16, int8); default: the runtime's.")
    providers: str | None = Field(
        None, description="Comma-separated ORT providers, e.g. CPUExecutionProvider."
    )
    max_batch_size: int = Field(
        32, ge=1, description="Adaptive batching: most patients per graph call (1: off)."
    )
    max_latency_ms: int = Field(60_000, ge=1, description="Adaptive batching: latency budget per request.")
    graph_workers: int = Field(1, ge=1, description="Graph service workers (one per GPU).")
    graph_gpus: float = Field(0, ge=0, description="GPUs BentoML assigns to the graph service (0: none).")
    front_workers: int = Field(1, ge=1, description="Front service workers (CPU-bound preprocessing).")
    timeout_s: float = Field(300, gt=0, description="Per-request timeout of both services.")
    grpc_port: int = Field(8001, ge=0, le=65535, description="Open Inference Protocol gRPC port (0: off).")
    grpc_host: str = Field("0.0.0.0", description="Interface the gRPC server binds to.")
    grpc_reflection: bool = Field(False, description="Enable gRPC server reflection (grpcurl).")
    api_token: str | None = Field(None, description="Bearer token; when set every inference call needs it.")
    max_upload_mb: float = Field(512, gt=0, description="Largest request body (HTTP) or message (gRPC).")
    max_voxels: int = Field(512 * 512 * 1024, ge=1, description="Largest image accepted, in voxels.")

    @property
    def max_upload_bytes(self) -> int:
        return int(self.max_upload_mb * MIB)

    @property
    def provider_list(self) -> list[str] | None:
        return [p.strip() for p in self.providers.split(",") if p.strip()] if self.providers else None


def load_settings(environ: dict[str, str] | None = None) -> Settings:
    """Build `Settings` from `PDL1_*` variables; unknown values fail loudly with the variable's name."""
    env = os.environ if environ is None else environ
    raw: dict[str, Any] = {}
    for name in Settings.model_fields:
        value = env.get(PREFIX + name.upper())
        if value is not None and value != "":
            raw[name] = value
    try:
        return Settings.model_validate(raw)
    except ValidationError as exc:
        bad = ", ".join(PREFIX + str(e["loc"][0]).upper() for e in exc.errors())
        raise ValueError(f"invalid service setting(s) {bad}: {exc}") from exc


@lru_cache(maxsize=1)
def settings() -> Settings:
    """The process-wide settings (read once)."""
    return load_settings()
