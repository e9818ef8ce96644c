"""CLI commands of the `export` package (on the single `pdl1` app): export, predict, models list."""

from __future__ import annotations

import json
from pathlib import Path

import typer

models_app = typer.Typer(help="Exported models in the BentoML model store.", no_args_is_help=True)


def register(app: typer.Typer) -> None:
    """Attach this package's commands to `app`; keep imports of heavy modules inside the commands."""
    app.command("export")(export)
    app.command("predict")(predict)
    app.add_typer(models_app, name="models")
    models_app.command("list")(models_list)


def _fail(exc: Exception) -> typer.Exit:
    typer.secho(f"error: {exc}", err=True, fg="red")
    return typer.Exit(2)


def export(
    run: Path = typer.Option(..., "--run", help="Training run directory (from `pdl1 study run`)."),
    out: Path | None = typer.Option(None, "--out", help="Export directory (default exports/NAME/VERSION)."),
    name: str = typer.Option(
        "pdl1", "--name", help="Model name in the store (the service loads NAME:latest)."
    ),
    variants: str = typer.Option("fp32,fp16,int8", "--variants", help="Comma-separated; fp32 is required."),
    no_store: bool = typer.Option(False, "--no-store", help="Do not import into the BentoML model store."),
    calibration_patients: int = typer.Option(16, "--calibration-patients", min=1, help="int8 calibration."),
) -> None:
    """Build ONE ONNX graph from a run, validate fp32/fp16/int8 variants, write manifest + card, store it."""
    from core.errors import InputError, IntegrityError
    from export.build import build_export

    try:
        result = build_export(
            run,
            out,
            name=name,
            variants=[v.strip() for v in variants.split(",") if v.strip()],
            store=not no_store,
            calibration_patients=calibration_patients,
        )
    except (InputError, IntegrityError) as exc:
        raise _fail(exc) from exc
    m = result.manifest
    summary = {
        "tag": result.tag or f"{m.name}:{m.version} (not stored)",
        "dir": str(result.out_dir),
        "published": m.published_variants,
        "rejected": [v for v in m.variants if v not in m.published_variants],
        "has_graph_cam": m.has_graph_cam,
        "threshold": m.threshold,
    }
    typer.echo(json.dumps(summary, indent=2), err=True)
    typer.echo(result.tag or str(result.out_dir))


def predict(
    model: str = typer.Option(
        ..., "--model", help="Store tag (NAME, NAME:latest, NAME:VERSION) or export dir."
    ),
    image: Path = typer.Option(
        ..., "--image", help="Iodine map: NIfTI, NRRD, MHA/MHD or a DICOM series folder."
    ),
    mask: Path = typer.Option(..., "--mask", help="Tumour VOI mask."),
    cam: Path | None = typer.Option(None, "--cam", help="Write the CAM on the input grid (e.g. cam.nii.gz)."),
    variant: str | None = typer.Option(None, "--variant", help="fp32, fp16 or int8 (default: per provider)."),
    label: int | None = typer.Option(None, "--label", help="Mask label to use when the mask has several."),
) -> None:
    """Local inference with the exported graph and the shared preprocessing; JSON on stdout."""
    from core.errors import InputError, IntegrityError
    from export.predict import predict_files

    try:
        result = predict_files(model, image, mask, variant=variant, cam_out=cam, mask_label=label)
    except (InputError, IntegrityError) as exc:
        raise _fail(exc) from exc
    typer.echo(json.dumps(result, indent=2))


def models_list(
    name: str | None = typer.Argument(None, help="Only this model name."),
    as_json: bool = typer.Option(False, "--json", help="JSON instead of a table."),
) -> None:
    """Exported models in the BentoML model store (newest first)."""
    from export.store import list_models

    rows = list_models(name)
    if as_json:
        typer.echo(json.dumps(rows, indent=2))
        return
    from rich.console import Console
    from rich.table import Table

    table = Table("tag", "created", "variants", "head", "threshold", "AUCs", "synthetic")
    for r in rows:
        aucs = ", ".join(f"{k}={v:.3f}" for k, v in r["metadata"].get("cohort_auc", {}).items())
        table.add_row(
            r["tag"],
            r["created"][:19],
            r["labels"].get("variants", ""),
            r["labels"].get("head", ""),
            f"{r['metadata'].get('threshold', float('nan')):.4f}",
            aucs,
            r["labels"].get("synthetic", ""),
        )
    Console().print(table)
