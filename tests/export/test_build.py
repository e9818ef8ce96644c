"""`pdl1 export` end to end on a tiny run: layout, manifest hashes, parity through the runtime, tampering,
the torch Grad-CAM path, the BentoML store (tmp BENTOML_HOME), and `pdl1 predict` / `pdl1 models list`."""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import SimpleITK as sitk
import torch
from typer.testing import CliRunner

from core.errors import IntegrityError
from core.manifest import ModelManifest, sha256_file
from core.runtime import CPU, InferenceModel

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/ for fixtures_imaging
from fixtures_imaging import phantom


def test_export_layout_and_manifest_hashes(export_dir: Path) -> None:
    manifest = ModelManifest.read(export_dir / "manifest.json")
    on_disk = {p.name for p in export_dir.iterdir()} - {"manifest.json"}
    assert set(manifest.files) == on_disk
    for name, digest in manifest.files.items():
        assert sha256_file(export_dir / name) == digest
    expected = {"model.fp32.onnx", "extractor.pt", "head.npz", "head.onnx", "validation.csv", "MODEL_CARD.md"}
    assert expected <= on_disk
    assert manifest.published_variants[0] == "fp32"
    assert manifest.has_graph_cam and manifest.head.type == "linear"
    assert manifest.threshold == 0.5  # metrics.json cutoffs.dfsig of the run
    assert manifest.training_run_id == "test-run-1" and manifest.synthetic_data
    assert manifest.input_shape == ["N", 2, 3, 224, 224] and manifest.outputs["cam"] == ["N", 2, 7, 7]
    table = pd.read_csv(export_dir / "validation.csv")
    assert set(table["variant"]) == {"fp32", "fp16"}
    fp32 = table[table["variant"] == "fp32"]
    assert fp32["passed"].all() and (fp32["max_abs_diff"] <= 1e-4).all()
    for variant in ("fp16",):  # published exactly when it passed
        passed = bool(table.loc[table["variant"] == variant, "passed"].all())
        on_disk_variant = (export_dir / f"model.{variant}.onnx").exists()
        assert (variant in manifest.published_variants) == passed == on_disk_variant
    assert "SYNTHETIC" in (export_dir / "MODEL_CARD.md").read_text()


def test_loaded_export_matches_the_reference_and_gradcam_matches_the_graph_cam(export_dir, trained) -> None:
    from core.cam import postprocess
    from export.validate import reference_probabilities

    m = InferenceModel.load(export_dir, variant="fp32", providers=[CPU])
    x = trained.slices[-2:]  # validation patients
    out = m.predict(x)
    ref, _ = reference_probabilities(trained.extractor, trained.indices, trained.pipeline, x)
    assert np.max(np.abs(out["probability"] - ref)) <= 1e-4
    assert out["cam"].shape == (2, 2, 7, 7)
    # torch path: Grad-CAM of the logit == ReLU(graph CAM), both upsampled and normalised per patient
    cams = m.gradcam(x[:1])
    assert cams.shape == (1, 2, 224, 224) and cams.min() >= 0 and cams.max() <= 1
    graph = postprocess(torch.relu(torch.from_numpy(out["cam"][:1])), size=(224, 224), normalize="patient")
    np.testing.assert_allclose(cams, graph, atol=5e-3)
    assert m.gradcam_method.startswith("Grad-CAM")


def test_a_tampered_export_graph_is_refused(export_dir: Path, tmp_path: Path) -> None:
    copy = tmp_path / "export"
    shutil.copytree(export_dir, copy)
    path = copy / "model.fp32.onnx"
    data = bytearray(path.read_bytes())
    data[-100] ^= 0x01  # one bit, inside the weights
    path.write_bytes(bytes(data))
    with pytest.raises(IntegrityError, match=r"model\.fp32\.onnx"):
        InferenceModel.load(copy, variant="fp32", providers=[CPU])


def test_store_round_trip_new_version_and_latest(
    export_dir: Path, run_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from cli.main import app
    from export.store import list_models, resolve_model, save_to_store

    monkeypatch.setenv("BENTOML_HOME", str(tmp_path / "bentoml"))
    monkeypatch.setenv("BENTOML_DO_NOT_TRACK", "1")
    first = ModelManifest.read(export_dir / "manifest.json")
    tag1 = save_to_store(export_dir, first)
    assert tag1 == f"pdl1:{first.version}"
    runner = CliRunner()
    args = ["export", "--run", str(run_dir), "--out", str(tmp_path / "re"), "--variants", "fp32"]
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    tag2 = result.stdout.strip().splitlines()[-1]
    assert tag2.startswith("pdl1:") and tag2 != tag1  # re-export: a new version
    tags = [row["tag"] for row in list_models("pdl1")]
    assert tags == [tag2, tag1]  # newest first
    latest_dir, latest_tag = resolve_model("pdl1:latest")
    assert latest_tag == tag2 and (latest_dir / "manifest.json").is_file()
    m = InferenceModel.load(latest_dir, providers=[CPU])  # store copy verifies against its manifest
    assert m.tag == tag2 and m.variant == "fp32"
    listed = runner.invoke(app, ["models", "list", "--json"])
    assert listed.exit_code == 0
    assert [r["tag"] for r in json.loads(listed.stdout)] == [tag2, tag1]


def test_cli_predict_matches_the_reference_and_writes_the_cam(export_dir: Path, trained, tmp_path) -> None:
    from cli.main import app
    from core.preprocessing import preprocess_files
    from export.validate import reference_probabilities

    image, mask, _ = phantom((24, 64, 64), seed=3)
    sitk.WriteImage(image, str(tmp_path / "img.nii.gz"))
    sitk.WriteImage(mask, str(tmp_path / "mask.nii.gz"))
    args = ["predict", "--model", str(export_dir), "--image", str(tmp_path / "img.nii.gz")]
    args += ["--mask", str(tmp_path / "mask.nii.gz"), "--variant", "fp32"]
    args += ["--cam", str(tmp_path / "cam.nii.gz")]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    out = json.loads(result.stdout)
    manifest = ModelManifest.read(export_dir / "manifest.json")
    config = InferenceModel.load(export_dir, variant="fp32", providers=[CPU]).preprocess_config
    slices = preprocess_files(tmp_path / "img.nii.gz", tmp_path / "mask.nii.gz", config).slices[None]
    ref, _ = reference_probabilities(trained.extractor, trained.indices, trained.pipeline, slices)
    assert abs(out["probability"] - ref[0]) <= 1e-4
    assert out["label"] == int(out["probability"] >= manifest.threshold)
    assert out["model"] == f"{manifest.name}:{manifest.version}" and out["variant"] == "fp32"
    assert out["provider"] == "CPUExecutionProvider" or out["provider"] == "CUDAExecutionProvider"
    assert set(out["timings_s"]) >= {"load_s", "preprocess_s", "inference_s", "cam_s"}
    cam = sitk.ReadImage(out["cam"]["path"])
    assert cam.GetSize() == image.GetSize()
    np.testing.assert_allclose(cam.GetOrigin(), image.GetOrigin())
    np.testing.assert_allclose(cam.GetSpacing(), image.GetSpacing())
    arr = sitk.GetArrayFromImage(cam)
    assert 0 < arr.max() <= 1 and arr.min() >= 0


def test_cli_predict_reports_bad_input_without_a_traceback(export_dir: Path, tmp_path: Path) -> None:
    from cli.main import app

    args = ["predict", "--model", str(export_dir), "--image", str(tmp_path / "none.nii.gz")]
    result = CliRunner().invoke(app, [*args, "--mask", str(tmp_path / "none.nii.gz")])
    assert result.exit_code == 2
    assert "error:" in result.output


@pytest.mark.slow
def test_all_variants_only_passing_ones_are_published(run_dir: Path, tmp_path: Path, monkeypatch) -> None:
    """int8 (both type pairs) and fp16 built and validated. fp16 is forced to fail (impossible tolerance) and
    int8 to pass (tolerances of 1), so both the not-published and the published path are exercised whatever
    the hardware and the random weights do; the faster passing int8 type pair is the one kept."""
    from export import validate
    from export.build import build_export

    monkeypatch.setitem(validate.TOLERANCES, "fp16", (1e-12, 0.01))
    monkeypatch.setitem(validate.TOLERANCES, "int8", (1.0, 1.0))
    result = build_export(run_dir, tmp_path / "all", store=False, calibration_patients=4)
    m = result.manifest
    table = result.validation
    assert "fp16" not in m.published_variants and not (tmp_path / "all" / "model.fp16.onnx").exists()
    assert not m.variants["fp16"].published and m.variants["fp16"].validation["passed"] is False
    int8 = table[table["variant"] == "int8"]
    assert set(int8["candidate"]) == {"int8-u8s8", "int8-s8s8"} and int8["passed"].all()
    assert "int8" in m.published_variants and (tmp_path / "all" / "model.int8.onnx").exists()
    fastest = int8.groupby("candidate")["median_s_batch"].first().idxmin().removeprefix("int8-")
    assert f"int8 QDQ {fastest} " in m.variants["int8"].precision
    assert set(m.files) == {p.name for p in (tmp_path / "all").iterdir()} - {"manifest.json"}
    # the published int8 graph is the CPU default, and it runs
    loaded = InferenceModel.load(tmp_path / "all", providers=[CPU])
    assert loaded.variant == "int8"
    x = np.zeros((1, *[int(d) for d in loaded.manifest.input_shape[1:]]), dtype=np.float32)
    assert np.isfinite(loaded.predict(x)["probability"]).all()


def test_validation_inputs_are_re_preprocessed_from_the_run_manifest(tmp_path: Path, monkeypatch) -> None:
    """Without features/slices/ the slices are re-made (shared preprocessing) from run.json's manifest."""
    from core.preprocessing import PreprocessConfig, preprocess_files
    from export.build import load_validation_inputs

    monkeypatch.setenv("PDL1_CACHE_DIR", str(tmp_path / "cache"))
    rows = []
    for i, cohort in enumerate(["training", "internal_validation"]):
        image, mask, _ = phantom((16, 40, 40), seed=i)
        sitk.WriteImage(image, str(tmp_path / f"img{i}.nii.gz"))
        sitk.WriteImage(mask, str(tmp_path / f"mask{i}.nii.gz"))
        rows.append(f"P{i},{cohort},img{i}.nii.gz,mask{i}.nii.gz,{i % 2}")
    (tmp_path / "manifest.csv").write_text("patient_id,cohort,image,mask,label\n" + "\n".join(rows) + "\n")
    run = tmp_path / "run"
    (run / "models").mkdir(parents=True)
    (run / "features").mkdir()
    config = PreprocessConfig(n_slices=2)
    info = {"weights": {"kind": "random"}, "preprocessing": config.model_dump(mode="json")}
    (run / "models" / "extractor.json").write_text(json.dumps(info))
    (run / "run.json").write_text(json.dumps({"run_id": "r", "manifest": str(tmp_path / "manifest.csv")}))
    (run / "models" / "dfsig.joblib").write_bytes(b"")  # not read: see below
    with open(run / "features" / "features.npz", "wb") as fh:
        np.savez(
            fh,
            ids=np.array(["P0", "P1"]),
            X=np.zeros((2, 2048), np.float32),
            cohort=np.array(["training", "internal_validation"]),
            label=np.array([0, 1]),
        )

    class _Model:  # read_run only needs these attributes here
        feature_indices, feature_names, pipeline, model_name = np.array([0]), ["f0"], None, "lr"

    monkeypatch.setattr("joblib.load", lambda path: _Model())
    got = load_validation_inputs(run, patient_ids=["P1"])
    expected = preprocess_files(tmp_path / "img1.nii.gz", tmp_path / "mask1.nii.gz", config).slices
    assert got.ids.tolist() == ["P1"] and got.cohorts.tolist() == ["internal_validation"]
    assert got.labels.tolist() == [1]
    np.testing.assert_array_equal(got.slices[0], expected)
