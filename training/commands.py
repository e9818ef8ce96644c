"""CLI commands of the `training` package: synth, preprocess, study run/report, evaluate.

Each command is a thin shell over a library function so that the same work is scriptable from Python.
"""

from __future__ import annotations

import json
from pathlib import Path

import typer

study_app = typer.Typer(help="Reproduce the study on a cohort manifest.", no_args_is_help=True)


def register(app: typer.Typer) -> None:
    """Attach this package's commands to `app`; heavy modules are imported inside the commands."""
    app.command("synth")(synth)
    app.command("preprocess")(preprocess)
    app.command("evaluate")(evaluate)
    app.add_typer(study_app, name="study")


def synth(
    out: Path = typer.Option(..., "--out", help="Directory to write the synthetic cohort into."),
    n_patients: int = typer.Option(267, "--n-patients", min=12, help="Number of synthetic patients."),
    seed: int = typer.Option(0, "--seed", help="Random seed; same seed, same cohort."),
) -> None:
    """Write a SYNTHETIC multicentre DECT cohort (iodine maps, tumour masks, clinical table, manifest.csv)."""
    from training.synth import write_cohort

    manifest = write_cohort(out, n_patients=n_patients, seed=seed)
    typer.echo(str(manifest))


def preprocess(
    image: Path = typer.Option(
        ..., "--image", help="Iodine map: NIfTI, NRRD, MHA/MHD or a DICOM series folder."
    ),
    mask: Path = typer.Option(..., "--mask", help="Tumour VOI mask (any grid overlapping the image)."),
    out: Path = typer.Option(..., "--out", help="Output directory."),
    label: int | None = typer.Option(None, "--label", help="Mask label to use when the mask has several."),
    config: Path | None = typer.Option(None, "--config", help="YAML with a `preprocessing:` section."),
) -> None:
    """Write the network input (input.npy), a PNG montage and preprocess.json (VOI geometry in LPS mm)."""
    from core.errors import InputError
    from training.config import load_preprocess_config
    from training.preprocess_outputs import write_preprocess_outputs

    try:
        info = write_preprocess_outputs(image, mask, out, config=load_preprocess_config(config), label=label)
    except InputError as exc:
        typer.secho(f"error: {exc}", err=True, fg="red")
        raise typer.Exit(2) from exc
    typer.echo(json.dumps(info, indent=2))


def evaluate(
    predictions: Path = typer.Option(..., "--predictions", help="CSV with one row per patient."),
    label_col: str = typer.Option(..., "--label-col", help="Binary outcome column (1 = positive)."),
    score_cols: str = typer.Option(
        ..., "--score-cols", help="Comma-separated score columns (higher = positive)."
    ),
    cohort_col: str | None = typer.Option(None, "--cohort-col", help="Evaluate each cohort separately."),
    threshold_cohort: str | None = typer.Option(
        None,
        "--threshold-cohort",
        help="Cohort whose Youden cut-off is applied to all (default: each its own).",
    ),
) -> None:
    """AUC with DeLong 95% CI, pairwise DeLong tests, calibration, threshold metrics, net benefit (JSON)."""
    import pandas as pd

    from core.errors import InputError
    from training.stats.evaluate import evaluate_table

    try:
        table = pd.read_csv(predictions)
        result = evaluate_table(
            table,
            label_col=label_col,
            score_cols=[c.strip() for c in score_cols.split(",") if c.strip()],
            cohort_col=cohort_col,
            threshold_cohort=threshold_cohort,
            source=str(predictions),
        )
    except (InputError, OSError, ValueError) as exc:  # pandas parse errors are ValueErrors
        typer.secho(f"error: {exc}", err=True, fg="red")
        raise typer.Exit(2) from exc
    typer.echo(json.dumps(result, indent=2, allow_nan=False, default=float))


@study_app.command("run")
def study_run(
    manifest: Path = typer.Option(..., "--manifest", help="Cohort manifest.csv."),
    out: Path = typer.Option(..., "--out", help="Run directory (created; finished stages are reused)."),
    config: Path | None = typer.Option(None, "--config", help="Study YAML (default: configs/study.yaml)."),
    weights: str | None = typer.Option(
        None,
        "--weights",
        help="Override features.weights: imagenet | file:PATH | random (explicit, recorded).",
    ),
    report: bool = typer.Option(True, "--report/--no-report", help="Build report.html at the end."),
) -> None:
    """Reproduce the study end to end and write a self-contained run directory."""
    from core.errors import InputError
    from training.study import run_study

    overrides = {"features.weights": weights} if weights else {}
    try:
        run_dir = run_study(manifest, out, config_path=config, overrides=overrides, build_report=report)
    except InputError as exc:
        typer.secho(f"error: {exc}", err=True, fg="red")
        raise typer.Exit(2) from exc
    typer.echo(str(run_dir))


@study_app.command("report")
def study_report(run_dir: Path = typer.Argument(..., help="A finished run directory.")) -> None:
    """Rebuild report.html / report.md from a finished run without recomputing."""
    from core.errors import InputError
    from training.report import build_report

    if not (run_dir / "metrics.json").is_file():
        typer.secho(f"error: {run_dir}: not a finished run directory (no metrics.json)", err=True, fg="red")
        raise typer.Exit(2)
    try:
        typer.echo(str(build_report(run_dir)))
    except InputError as exc:
        typer.secho(f"error: {exc}", err=True, fg="red")
        raise typer.Exit(2) from exc
