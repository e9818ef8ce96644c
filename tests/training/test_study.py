"""`pdl1 study run` end to end on a small synthetic cohort (tiny network input to keep CI fast)."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pytest
import yaml
from typer.testing import CliRunner

from cli.main import app
from training.study import data_hashes

TINY = {
    "preprocessing": {"size": 64, "n_slices": 2},
    "features": {"batch_size": 8},
    "models": {"candidates": ["lr", "knn"], "cv_splits": 3, "cv_repeats": 1},
    "evaluation": {"n_bootstrap": 50},
    "report": {"shap": True, "gradcam": False},
}


def test_data_hashes_cover_files_and_dicom_folders(tmp_path: Path) -> None:
    (tmp_path / "series").mkdir()
    (tmp_path / "series" / "1.dcm").write_bytes(b"a")
    (tmp_path / "mask.nii.gz").write_bytes(b"m")
    manifest = tmp_path / "manifest.csv"
    manifest.write_text("x\n")
    cohort = pd.DataFrame(
        {"patient_id": ["P1"], "image": [str(tmp_path / "series")], "mask": [str(tmp_path / "mask.nii.gz")]}
    )
    first = data_hashes(manifest, cohort)
    assert set(first) == {"manifest", "P1/image", "P1/mask"}
    (tmp_path / "series" / "1.dcm").write_bytes(b"b")
    assert data_hashes(manifest, cohort)["P1/image"] != first["P1/image"]


@pytest.mark.slow
def test_study_run_cli_writes_a_complete_reproducible_run(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setenv("PDL1_CACHE_DIR", str(tmp_path / "cache"))
    runner = CliRunner()
    synth = runner.invoke(app, ["synth", "--out", str(tmp_path / "cohort"), "--n-patients", "40"])
    assert synth.exit_code == 0, synth.output
    config = tmp_path / "tiny.yaml"
    config.write_text(yaml.safe_dump(TINY))
    manifest = tmp_path / "cohort" / "manifest.csv"

    args = ["study", "run", "--manifest", str(manifest), "--config", str(config), "--weights", "random"]
    first = runner.invoke(app, [*args, "--out", str(tmp_path / "run")])
    assert first.exit_code == 0, first.output
    run = tmp_path / "run"
    for name in (
        "config.yaml",
        "run.json",
        "metrics.json",
        "predictions.csv",
        "selection.json",
        "report.html",
    ):
        assert (run / name).is_file(), name
    for name in ("extractor.pt", "extractor.json", "dfsig.joblib", "clinical.joblib", "fusion.joblib"):
        assert (run / "models" / name).is_file(), name
    info = json.loads((run / "run.json").read_text())
    assert info["weights"]["kind"] == "random" and info["synthetic"] is True
    assert set(info["timings_s"]) >= {"features", "selection", "DFSigM model zoo", "statistics", "report"}
    assert len(info["data_hashes"]) == 1 + 2 * 40
    metrics = json.loads((run / "metrics.json").read_text())
    assert set(metrics["cohorts"]) == {"training", "internal_validation", "external_validation"}
    assert "SYNTHETIC" in (run / "report.html").read_text().upper()

    # same seed, same data, warm feature cache -> identical metrics
    second = runner.invoke(app, [*args, "--out", str(tmp_path / "again"), "--no-report"])
    assert second.exit_code == 0, second.output
    assert json.loads((tmp_path / "again" / "metrics.json").read_text()) == metrics


def test_study_run_bad_config_exits_2_naming_the_field(tmp_path: Path) -> None:
    config = tmp_path / "bad.yaml"
    config.write_text(yaml.safe_dump({"selection": {"max_features": 0}}))
    manifest = tmp_path / "manifest.csv"
    manifest.write_text("patient_id,cohort,image,mask,label\n")
    result = CliRunner().invoke(
        app,
        ["study", "run", "--manifest", str(manifest), "--out", str(tmp_path / "r"), "--config", str(config)],
    )
    assert result.exit_code == 2
    assert "selection.max_features" in result.output
