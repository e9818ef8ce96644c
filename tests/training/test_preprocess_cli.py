"""`pdl1 preprocess` and training.preprocess_outputs: input.npy, montage.png, preprocess.json."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from core.preprocessing import PreprocessConfig
from training.preprocess_outputs import write_preprocess_outputs

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from fixtures_imaging import phantom, rotation


@pytest.fixture
def pair(tmp_path: Path) -> tuple[Path, Path, np.ndarray]:
    image, mask, centroid = phantom((14, 40, 44), spacing=(0.7, 0.7, 2.0), direction=rotation(0, 0, 15))
    sitk.WriteImage(image, str(tmp_path / "img.nii.gz"))
    sitk.WriteImage(mask, str(tmp_path / "mask.nrrd"))
    return tmp_path / "img.nii.gz", tmp_path / "mask.nrrd", centroid


def test_write_preprocess_outputs(tmp_path: Path, pair) -> None:
    img, msk, centroid = pair
    cfg = PreprocessConfig(n_slices=4, size=96)
    info = write_preprocess_outputs(img, msk, tmp_path / "out", config=cfg)
    arr = np.load(tmp_path / "out" / "input.npy")
    assert arr.shape == (4, 3, 96, 96) and arr.dtype == np.float32
    on_disk = json.loads((tmp_path / "out" / "preprocess.json").read_text())
    assert on_disk == json.loads(json.dumps(info))
    np.testing.assert_allclose(on_disk["voi_centroid_lps_mm"], centroid, atol=1e-6)
    assert on_disk["input_shape"] == [4, 3, 96, 96] and len(on_disk["slice_indices"]) == 4
    assert PreprocessConfig.model_validate(on_disk["preprocess_config"]) == cfg
    png = (tmp_path / "out" / "montage.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 2000


def test_cli_preprocess(tmp_path: Path, pair) -> None:
    pytest.importorskip("training.config")
    from typer.testing import CliRunner

    from cli.main import app

    img, msk, _ = pair
    runner = CliRunner()
    result = runner.invoke(
        app, ["preprocess", "--image", str(img), "--mask", str(msk), "--out", str(tmp_path / "o")]
    )
    assert result.exit_code == 0, result.output
    assert (tmp_path / "o" / "input.npy").exists() and (tmp_path / "o" / "montage.png").exists()
    assert json.loads((tmp_path / "o" / "preprocess.json").read_text())["input_shape"] == [3, 3, 224, 224]
    bad = runner.invoke(
        app,
        [
            "preprocess",
            "--image",
            str(tmp_path / "nope.nii"),
            "--mask",
            str(msk),
            "--out",
            str(tmp_path / "x"),
        ],
    )
    assert bad.exit_code == 2 and "file not found" in bad.output
