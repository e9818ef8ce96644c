"""`pdl1 study run`: the whole study, stage by stage, into one self-contained run directory.

features (cached, resumable) -> selection (training cohort only) -> DFSigM zoo -> clinical model -> fusion
-> predictions -> statistics (cut-offs fixed on training) -> explainability -> report.

Every artifact is written atomically; the expensive stage (deep features) is content-addressed in a
cache shared between runs, so an interrupted run resumes and a re-run skips finished patients. Same
seed and data give identical metrics.
"""

from __future__ import annotations

import logging
import os
import platform
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from importlib import metadata
from pathlib import Path

import numpy as np
import pandas as pd
from rich.console import Console
from rich.table import Table

from core.manifest import sha256_file
from training import artifacts
from training.cohort import COHORTS, load_manifest
from training.config import StudyConfig, dump_config, load_study_config

log = logging.getLogger(__name__)
console = Console(stderr=True)

MODEL_KEYS = ("clinical", "dfsig", "fusion")
PACKAGES = (
    "torch",
    "monai",
    "SimpleITK",
    "numpy",
    "scipy",
    "pandas",
    "scikit-learn",
    "statsmodels",
    "shap",
    "onnx",
    "onnxruntime-gpu",
    "skl2onnx",
    "bentoml",
)


def default_cache_dir() -> Path:
    """Feature/preprocessing cache shared by runs (env PDL1_CACHE_DIR, else ~/.cache/pdl1)."""
    return Path(os.environ.get("PDL1_CACHE_DIR", Path.home() / ".cache" / "pdl1"))


def package_versions() -> dict[str, str | None]:
    versions: dict[str, str | None] = {"python": platform.python_version()}
    for name in PACKAGES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = None
    return versions


class StageTimer:
    """Per-stage wall time, shown live and recorded in run.json."""

    def __init__(self) -> None:
        self.timings: dict[str, float] = {}

    @contextmanager
    def __call__(self, name: str) -> Iterator[None]:
        console.rule(f"[bold]{name}")
        start = time.perf_counter()
        yield
        self.timings[name] = round(time.perf_counter() - start, 3)
        console.print(f"[green]✓[/green] {name}: {self.timings[name]:.1f} s")

    def table(self) -> Table:
        table = Table(title="Stage timings (s)")
        table.add_column("stage")
        table.add_column("seconds", justify="right")
        for name, seconds in self.timings.items():
            table.add_row(name, f"{seconds:.1f}")
        table.add_row("total", f"{sum(self.timings.values()):.1f}")
        return table


def data_hashes(manifest_path: Path, cohort: pd.DataFrame) -> dict[str, str]:
    """SHA-256 of the manifest and every image/mask file (a run records exactly which data it saw)."""
    from training.features import path_sha256  # files, and DICOM series folders

    hashes = {"manifest": sha256_file(manifest_path)}
    for row in cohort.itertuples():
        hashes[f"{row.patient_id}/image"] = path_sha256(row.image)
        hashes[f"{row.patient_id}/mask"] = path_sha256(row.mask)
    return hashes


def _is_synthetic(manifest_path: Path) -> bool:
    """The synthetic generator leaves a marker README next to its manifest."""
    readme = Path(manifest_path).parent / "README.md"
    return readme.exists() and "SYNTHETIC" in readme.read_text(errors="ignore")[:4000].upper()


def run_study(
    manifest_path: Path,
    out: Path,
    *,
    config_path: Path | None = None,
    overrides: dict | None = None,
    build_report: bool = True,
    cache_dir: Path | None = None,
) -> Path:
    """Run the study; returns the run directory. See the module docstring for the stages."""
    config = load_study_config(config_path, overrides)
    manifest_path = Path(manifest_path).resolve()
    run_dir = Path(out).resolve()
    run_dir.mkdir(parents=True, exist_ok=True)
    cohort = load_manifest(manifest_path)
    timer = StageTimer()
    started = datetime.now(UTC).isoformat()
    run_id = f"{datetime.now(UTC):%Y%m%dT%H%M%SZ}-{uuid.uuid4().hex[:8]}"
    synthetic = _is_synthetic(manifest_path)
    if synthetic:
        console.print("[yellow]SYNTHETIC cohort: results demonstrate the pipeline, not clinical evidence.")
    artifacts.write_text(run_dir / "config.yaml", dump_config(config))

    with timer("hash data"):
        hashes = data_hashes(manifest_path, cohort)

    from training.pipeline import StudyData, fit_and_evaluate

    with timer("features"):
        from training.features import extract_cohort_features

        extraction = extract_cohort_features(cohort, config, cache_dir=cache_dir or default_cache_dir())
        _save_features(run_dir, cohort, extraction)

    data = StudyData.from_cohort(cohort, extraction.features)
    fit_and_evaluate(data, config, run_dir, timer=timer, synthetic=synthetic)

    if config.report.shap or config.report.gradcam:
        with timer("explainability"):
            from training.explain import run_explainability

            run_explainability(run_dir, cohort_df=cohort, config=config)

    run_info = {
        "run_id": run_id,
        "started": started,
        "finished": datetime.now(UTC).isoformat(),
        "seed": config.seed,
        "manifest": str(manifest_path),
        "synthetic": synthetic,
        "weights": extraction.weights_info.model_dump(mode="json"),
        "versions": package_versions(),
        "platform": {
            "machine": platform.machine(),
            "processor": platform.processor(),
            "cpus": os.cpu_count(),
        },
        "data_hashes": hashes,
        "timings_s": timer.timings,
        "config_sha256": artifacts.sha256_text(dump_config(config)),
        "n_patients": len(cohort),
    }
    artifacts.write_json(run_dir / "run.json", run_info)

    if build_report:
        with timer("report"):
            from training.report import build_report as _build

            report = _build(run_dir)
        console.print(f"report: {report}")
        run_info["timings_s"] = timer.timings
        artifacts.write_json(run_dir / "run.json", run_info)
    console.print(timer.table())
    return run_dir


def _save_features(run_dir: Path, cohort: pd.DataFrame, extraction) -> None:
    import torch

    artifacts.write_npz(
        run_dir / "features" / "features.npz",
        ids=np.asarray(cohort["patient_id"].astype(str), dtype=str),
        X=extraction.features.astype(np.float32),
        cohort=np.asarray(cohort["cohort"].astype(str), dtype=str),
        label=cohort["label"].to_numpy(dtype=np.int64),
    )
    artifacts.write_with(run_dir / "models" / "extractor.pt", lambda p: torch.save(extraction.state_dict, p))
    artifacts.write_json(
        run_dir / "models" / "extractor.json",
        {
            "weights": extraction.weights_info.model_dump(mode="json"),
            "preprocessing": extraction.preprocess_config.model_dump(mode="json"),
            "state_sha256": extraction.state_sha256,
            "architecture": "ResNet-50 (MONAI, 2-D), GAP 2048-d per slice, mean over slices",
        },
    )


__all__ = ["COHORTS", "MODEL_KEYS", "StudyConfig", "run_study"]
