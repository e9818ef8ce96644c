"""Feature stage: batching, the content-addressed cache (skip, resume, corruption), BN re-estimation on the
training cohort only, and that the returned state reproduces the features."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import SimpleITK as sitk
import torch

import training.features as tf
from core.errors import InputError
from core.network import PatientFeatureNet, ResNet50Extractor, build_extractor
from core.preprocessing import PreprocessConfig
from training.features import (
    PatientInput,
    content_key,
    extract_features,
    iter_slice_batches,
    path_sha256,
    prepare_inputs,
    run_feature_extraction,
)

CONFIG = PreprocessConfig(size=64, n_slices=2)  # small: the extractor accepts any size >= 32


def write_case(folder: Path, pid: str, seed: int) -> tuple[str, str]:
    """A 40x40x12 iodine-like volume with a textured ellipsoidal 'tumour' and its mask (NIfTI)."""
    rng = np.random.default_rng(seed)
    z, y, x = np.mgrid[:12, :40, :40]
    inside = ((x - 20) / 9.0) ** 2 + ((y - 19) / 7.0) ** 2 + ((z - 6) / 3.5) ** 2 <= 1
    arr = rng.normal(0.5, 0.2, (12, 40, 40)).astype(np.float32)
    arr[inside] += 2.0 + rng.normal(0, 0.4 + 0.2 * seed, inside.sum())
    paths = []
    for name, data in (("image", arr), ("mask", inside.astype(np.uint8))):
        img = sitk.GetImageFromArray(data)
        img.SetSpacing((0.8, 0.8, 2.5))
        path = folder / f"{pid}_{name}.nii.gz"
        sitk.WriteImage(img, str(path))
        paths.append(str(path))
    return paths[0], paths[1]


@pytest.fixture(scope="module")
def manifest(tmp_path_factory: pytest.TempPathFactory) -> pd.DataFrame:
    folder = tmp_path_factory.mktemp("cases")
    rows = []
    for i, cohort in enumerate(["training", "training", "internal_validation", "external_validation"]):
        image, mask = write_case(folder, f"p{i}", seed=i)
        rows.append({"patient_id": f"p{i}", "image": image, "mask": mask, "cohort": cohort, "label": i % 2})
    return pd.DataFrame(rows)


@pytest.fixture(scope="module")
def extractor() -> ResNet50Extractor:
    return build_extractor("random", seed=0)[0]


class CountingNet(torch.nn.Module):
    """Wraps the extractor and counts slices it sees; can fail after a number of calls (interruption)."""

    def __init__(self, inner: ResNet50Extractor, fail_after: int | None = None) -> None:
        super().__init__()
        self.inner = inner
        self.slices = 0
        self.calls = 0
        self.fail_after = fail_after

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.fail_after is not None and self.calls >= self.fail_after:
            raise KeyboardInterrupt("simulated interruption")
        self.calls += 1
        self.slices += x.shape[0]
        return self.inner(x)


def test_path_sha256_for_files_and_dicom_folders(tmp_path: Path) -> None:
    series = tmp_path / "series"
    series.mkdir()
    (series / "a.dcm").write_bytes(b"one")
    (series / "b.dcm").write_bytes(b"two")
    before = path_sha256(series)
    assert path_sha256(series / "a.dcm") != path_sha256(series / "b.dcm")
    (series / "b.dcm").write_bytes(b"TWO")
    assert path_sha256(series) != before
    with pytest.raises(InputError, match="not found"):
        path_sha256(tmp_path / "missing.nii.gz")


def test_iter_slice_batches_keeps_order_across_patients() -> None:
    arrays = [np.full((n, 3, 2, 2), i, np.float32) for i, n in enumerate([3, 1, 4])]
    inputs = [PatientInput(f"p{i}", f"k{i}", lambda a=a: a) for i, a in enumerate(arrays)]
    batches = list(iter_slice_batches(inputs, 3))
    assert [len(b) for b in batches] == [3, 3, 2]
    flat = torch.cat(batches)[:, 0, 0, 0].tolist()
    assert flat == [0, 0, 0, 1, 2, 2, 2, 2]


def test_prepare_inputs_caches_preprocessed_slices(
    manifest: pd.DataFrame, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    first = prepare_inputs(manifest, CONFIG, cache_dir=tmp_path, progress=False)
    assert [i.patient_id for i in first] == ["p0", "p1", "p2", "p3"]
    arr = first[0].load()
    assert arr.shape == (2, 3, 64, 64) and arr.dtype == np.float32
    calls = []
    monkeypatch.setattr(tf, "preprocess_files", lambda *a, **k: calls.append(a))
    again = prepare_inputs(manifest, CONFIG, cache_dir=tmp_path, progress=False)
    assert calls == [] and [i.key for i in again] == [i.key for i in first]
    np.testing.assert_array_equal(again[0].load(), arr)
    monkeypatch.undo()
    other = prepare_inputs(manifest.iloc[:1], CONFIG.model_copy(update={"margin_mm": 5.0}), progress=False)
    assert other[0].key != first[0].key  # the configuration is part of the key


def test_feature_cache_skips_finished_and_recomputes_corrupt_entries(
    manifest: pd.DataFrame, extractor: ResNet50Extractor, tmp_path: Path
) -> None:
    inputs = prepare_inputs(manifest, CONFIG, cache_dir=tmp_path, progress=False)
    net = CountingNet(extractor)
    first = extract_features(inputs, net, batch_size=3, cache_dir=tmp_path, progress=False)
    assert net.slices == 8 and first.shape == (4, 2048) and first.dtype == np.float32
    with torch.inference_mode():
        expected = PatientFeatureNet(extractor)(torch.from_numpy(np.stack([i.load() for i in inputs])))
    np.testing.assert_allclose(first, expected.numpy(), rtol=1e-4, atol=1e-5)

    net.slices = 0
    second = extract_features(inputs, net, batch_size=3, cache_dir=tmp_path, progress=False)
    assert net.slices == 0
    np.testing.assert_array_equal(second, first)

    entries = sorted((tmp_path / "features").rglob("*.npy"))
    assert len(entries) == 4
    entries[1].write_bytes(entries[1].read_bytes()[:100])  # truncated (e.g. disk full)
    np.save(entries[2], np.zeros(7, np.float32))  # readable but the wrong shape
    third = extract_features(inputs, net, batch_size=3, cache_dir=tmp_path, progress=False)
    assert net.slices == 4  # only the two broken patients were recomputed
    np.testing.assert_allclose(third, first, rtol=1e-4, atol=1e-5)  # other batch composition: float noise


def test_interrupted_extraction_resumes(
    manifest: pd.DataFrame, extractor: ResNet50Extractor, tmp_path: Path
) -> None:
    inputs = prepare_inputs(manifest, CONFIG, cache_dir=tmp_path, progress=False)
    net = CountingNet(extractor, fail_after=2)  # batch of 2 slices = one patient per call
    with pytest.raises(KeyboardInterrupt):
        extract_features(inputs, net, batch_size=2, cache_dir=tmp_path, progress=False)
    assert len(list((tmp_path / "features").rglob("*.npy"))) == 2
    assert not list((tmp_path / "features").rglob("*.tmp"))
    resumed = CountingNet(extractor)
    extract_features(inputs, resumed, batch_size=2, cache_dir=tmp_path, progress=False)
    assert resumed.slices == 4


def test_features_change_with_the_weights(manifest: pd.DataFrame, tmp_path: Path) -> None:
    inputs = prepare_inputs(manifest.iloc[:1], CONFIG, progress=False)
    a = extract_features(inputs, build_extractor("random", seed=0)[0], cache_dir=tmp_path, progress=False)
    b = extract_features(inputs, build_extractor("random", seed=1)[0], cache_dir=tmp_path, progress=False)
    assert not np.allclose(a, b)
    assert len(list((tmp_path / "features").rglob("*.npy"))) == 2


def test_content_key_depends_on_every_part() -> None:
    base = content_key(kind="features", slices="a", weights="w")
    assert base == content_key(weights="w", slices="a", kind="features")
    assert base != content_key(kind="features", slices="a", weights="w2")


@pytest.mark.slow
def test_study_feature_stage_random_weights_bn_on_training_only(
    manifest: pd.DataFrame, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    cache = tmp_path / "cache"
    with caplog.at_level(logging.WARNING):
        run = run_feature_extraction(
            manifest, CONFIG, weights="random", seed=0, batch_size=4, cache_dir=cache, progress=False
        )
    assert any("RANDOM" in r.getMessage() for r in caplog.records)
    info = run.weights_info
    assert info.kind == "random" and info.bn_recalibrated
    bn = info.details["bn_recalibration"]
    assert bn["n_patients"] == 2 and bn["n_images"] == 4 and bn["from_cache"] is False
    info.model_dump_json()
    assert run.ids == ["p0", "p1", "p2", "p3"] and run.features.shape == (4, 2048)
    assert np.isfinite(run.features).all() and run.timings["extract_s"] > 0

    # The returned state_dict is the one that produced the features.
    fresh = ResNet50Extractor()
    fresh.load_state_dict(run.state_dict)
    slices = np.stack([i.load() for i in prepare_inputs(manifest, CONFIG, cache_dir=cache, progress=False)])
    with torch.inference_mode():
        again = PatientFeatureNet(fresh.eval())(torch.from_numpy(slices)).numpy()
    # Extraction runs channels_last (faster on CPU); float32 rounding through 50 layers differs ~1e-4.
    np.testing.assert_allclose(run.features, again, rtol=1e-3, atol=1e-3)
    assert np.abs(run.features - again).mean() < 1e-4

    # A re-run reuses every cache level: no preprocessing, no BN pass, no network call, same numbers.
    monkeypatch.setattr(tf, "preprocess_files", lambda *a, **k: pytest.fail("preprocessed again"))
    monkeypatch.setattr(tf, "recalibrate_batchnorm", lambda *a, **k: pytest.fail("BN re-estimated again"))
    monkeypatch.setattr(ResNet50Extractor, "forward", lambda *a, **k: pytest.fail("extracted again"))
    rerun = run_feature_extraction(
        manifest, CONFIG, weights="random", seed=0, batch_size=4, cache_dir=cache, progress=False
    )
    monkeypatch.undo()
    assert rerun.weights_info.details["bn_recalibration"]["from_cache"] is True
    assert rerun.state_sha256 == run.state_sha256
    np.testing.assert_array_equal(rerun.features, run.features)

    # Leakage check: changing a validation patient's image changes only that patient's features, never
    # the BN statistics; changing a training patient's image changes the BN statistics.
    changed = manifest.copy()
    image, _ = write_case(tmp_path, "p2x", seed=9)
    changed.loc[2, "image"] = image
    run_val = run_feature_extraction(
        changed, CONFIG, weights="random", seed=0, batch_size=4, cache_dir=cache, progress=False
    )
    assert run_val.state_sha256 == run.state_sha256
    np.testing.assert_array_equal(run_val.features[[0, 1, 3]], run.features[[0, 1, 3]])
    assert not np.allclose(run_val.features[2], run.features[2])
    changed = manifest.copy()
    changed.loc[0, "image"] = image
    run_train = run_feature_extraction(
        changed, CONFIG, weights="random", seed=0, batch_size=4, cache_dir=cache, progress=False
    )
    assert run_train.state_sha256 != run.state_sha256


def test_random_without_bn_recalibration_warns_and_records(
    manifest: pd.DataFrame, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.WARNING):
        run = run_feature_extraction(
            manifest.iloc[:1], CONFIG, weights="random", bn_recalibration="off", progress=False
        )
    assert not run.weights_info.bn_recalibrated
    assert any("WITHOUT batch-norm re-estimation" in r.getMessage() for r in caplog.records)


def test_bad_requests_are_input_errors(manifest: pd.DataFrame) -> None:
    with pytest.raises(InputError, match="use 'torch' or 'onnx'"):
        run_feature_extraction(manifest, CONFIG, weights="random", backend="tensorrt", progress=False)
    with pytest.raises(InputError) as err:
        prepare_inputs(manifest.drop(columns=["mask"]), CONFIG, progress=False)
    assert err.value.field == "mask"
    with pytest.raises(InputError, match="no training-cohort patients"):
        run_feature_extraction(manifest.iloc[2:], CONFIG, weights="random", progress=False)


def test_bn_subsample_is_evenly_spaced_and_deterministic() -> None:
    inputs = [PatientInput(f"p{i}", f"k{i}", lambda: np.zeros((3, 3, 32, 32), np.float32)) for i in range(10)]
    picked = [i.patient_id for i in tf._subsample(inputs, 9)]
    assert picked == ["p0", "p4", "p9"] or picked == ["p0", "p5", "p9"]
    assert picked == [i.patient_id for i in tf._subsample(inputs, 9)]
    assert tf._subsample(inputs, None) == inputs and tf._subsample(inputs, 300) == inputs


def test_onnx_backend_matches_torch_extractor() -> None:
    """The ONNX Runtime fast path computes the same features as torch eager (same weights)."""
    from core.network import build_extractor
    from training.features import onnx_slice_net

    extractor, _ = build_extractor("random", seed=3)
    x = torch.randn(3, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        expected = extractor(x).numpy()
    got = onnx_slice_net(extractor, image_size=64, threads=1)(x).numpy()
    assert got.shape == (3, 2048)
    np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-5 * np.abs(expected).max())
