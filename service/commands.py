"""CLI commands of the `service` package (registered on the single `pdl1` app): `serve` and `client`."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import typer

PROJECT_ROOT = Path(__file__).resolve().parents[1]


def register(app: typer.Typer) -> None:
    """Attach this package's commands to `app`; keep imports of heavy modules inside the commands."""
    app.command("serve")(serve)
    app.command("client")(client)


def serve(
    model: str = typer.Option("pdl1:latest", "--model", help="BentoML model store tag of the export."),
    model_dir: Path | None = typer.Option(None, "--model-dir", help="Serve this export directory instead."),
    host: str = typer.Option("127.0.0.1", "--host", help="HTTP (and gRPC) interface; 0.0.0.0 for all."),
    port: int = typer.Option(3000, "--port", help="HTTP port."),
    grpc_port: int = typer.Option(8001, "--grpc-port", help="Open Inference Protocol gRPC port (0: off)."),
    max_batch_size: int | None = typer.Option(None, "--max-batch-size", help="Adaptive batching cap."),
    max_latency_ms: int | None = typer.Option(None, "--max-latency-ms", help="Adaptive batching budget."),
    variant: str | None = typer.Option(None, "--variant", help="ONNX variant: fp32, fp16 or int8."),
) -> None:
    """Serve the model: `bentoml serve service.service:PDL1` with PDL1_* settings from these options."""
    env = dict(os.environ)
    env.setdefault("BENTOML_DO_NOT_TRACK", "1")
    env["PDL1_MODEL_TAG"] = model
    env["PDL1_GRPC_PORT"] = str(grpc_port)
    env["PDL1_GRPC_HOST"] = host
    optional = {
        "PDL1_MODEL_DIR": model_dir and str(model_dir.resolve()),
        "PDL1_MAX_BATCH_SIZE": max_batch_size,
        "PDL1_MAX_LATENCY_MS": max_latency_ms,
        "PDL1_VARIANT": variant,
    }
    env.update({k: str(v) for k, v in optional.items() if v is not None})
    bentoml = Path(sys.executable).with_name("bentoml")
    cmd = [str(bentoml), "serve", "service.service:PDL1", "--host", host, "--port", str(port)]
    raise typer.Exit(subprocess.call(cmd, cwd=PROJECT_ROOT, env=env))


def client(
    url: str = typer.Option(..., "--url", help="Service URL: http://HOST:3000, or HOST:8001 with --grpc."),
    image: Path = typer.Option(..., "--image", exists=True, help="Iodine map file or DICOM series folder."),
    mask: Path = typer.Option(..., "--mask", exists=True, help="Tumour mask file."),
    cam: Path | None = typer.Option(None, "--cam", help="Write the CAM here (.nii.gz, or .png over HTTP)."),
    use_grpc: bool = typer.Option(False, "--grpc", help="Use the Open Inference Protocol over gRPC."),
    token: str | None = typer.Option(None, "--token", envvar="PDL1_API_TOKEN", help="Bearer token."),
) -> None:
    """Send one patient to a running service and print the JSON answer (the CAM goes to --cam)."""
    import logging

    import httpx

    from service.client import ServiceError, predict_grpc, predict_http, save_cam

    logging.getLogger("httpx").setLevel(logging.WARNING)  # its INFO request lines would pollute the JSON
    want_png = cam is not None and cam.suffix.lower() == ".png"
    if use_grpc and want_png:
        raise typer.BadParameter("gRPC returns the CAM as NIfTI; use a .nii.gz path", param_hint="--cam")
    try:
        if use_grpc:
            result = predict_grpc(url, image, mask, return_cam=cam is not None, token=token)
        else:
            fmt = "png" if want_png else "nifti"
            result = predict_http(url, image, mask, return_cam=cam is not None, cam_format=fmt, token=token)
    except ServiceError as exc:
        typer.secho(f"error: {exc}", err=True, fg="red")
        raise typer.Exit(2) from exc
    except httpx.HTTPError as exc:
        typer.secho(f"error: cannot reach {url}: {exc}", err=True, fg="red")
        raise typer.Exit(2) from exc
    if cam is not None:
        save_cam(result, cam)
        result["cam"] = str(cam)
    typer.echo(json.dumps(result, indent=2))
