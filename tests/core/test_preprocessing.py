"""core.preprocessing: shapes, normalisation, slice choice, geometry, map-back, crop-first equivalence."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pydantic
import pytest
import SimpleITK as sitk

from core import geometry
from core.errors import InputError
from core.preprocessing import IMAGENET_MEAN, IMAGENET_STD, PreprocessConfig, preprocess, preprocess_files

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from fixtures_imaging import make_image, phantom, rotation


def _denorm(slices: np.ndarray) -> np.ndarray:
    mean = np.asarray(IMAGENET_MEAN, np.float32)[None, :, None, None]
    std = np.asarray(IMAGENET_STD, np.float32)[None, :, None, None]
    return slices * std + mean


def test_shapes_dtype_and_imagenet_normalisation() -> None:
    image, mask, _ = phantom()
    pre = preprocess(image, mask, PreprocessConfig(voi_only=False))
    assert pre.slices.shape == (3, 3, 224, 224) and pre.slices.dtype == np.float32
    raw = _denorm(pre.slices)
    np.testing.assert_allclose(raw[:, 0], raw[:, 1], atol=1e-5)  # the same grey slice in every channel
    np.testing.assert_allclose(raw[:, 0], pre.windowed, atol=1e-5)
    assert raw.min() >= -1e-5 and raw.max() <= 1 + 1e-5
    assert pre.mask_slices.shape == (3, 224, 224) and pre.mask_slices[:, 112, 112].all()


def test_voi_only_zeroes_the_network_input_outside_the_voi() -> None:
    image, mask, _ = phantom()
    keep = preprocess(image, mask, PreprocessConfig(voi_only=False))
    only = preprocess(image, mask, PreprocessConfig(voi_only=True))
    outside = keep.mask_slices == 0
    raw_keep, raw_only = _denorm(keep.slices)[:, 0], _denorm(only.slices)[:, 0]
    assert raw_keep[outside].max() > 0.05
    np.testing.assert_allclose(raw_only[outside], 0.0, atol=1e-5)
    np.testing.assert_allclose(raw_only[~outside], raw_keep[~outside], atol=1e-5)
    np.testing.assert_allclose(only.windowed, keep.windowed)  # the display copy is never masked


def test_window_maps_iodine_linearly_and_clips() -> None:
    arr = np.full((10, 30, 30), 2.75, np.float32)
    arr[:, 7:9, :] = 40.0  # a vessel-like row inside the crop saturates
    image = make_image(arr)
    mask = make_image(_ball(arr.shape))
    cfg = PreprocessConfig(window_mg_ml=(-0.5, 6.0), margin_mm=2.0, antialias=False)
    pre = preprocess(image, mask, cfg)
    np.testing.assert_allclose(pre.windowed[:, 112, 112], (2.75 + 0.5) / 6.5, atol=1e-5)
    assert pre.windowed.max() == pytest.approx(1.0)


def _ball(shape: tuple[int, int, int]) -> np.ndarray:
    z, y, x = np.indices(shape)
    c = np.array(shape) / 2
    return (((z - c[0]) / 3) ** 2 + ((y - c[1]) / 6) ** 2 + ((x - c[2]) / 6) ** 2 <= 1).astype(np.uint8)


def test_geometry_dict_centroid_and_json() -> None:
    image, mask, centroid = phantom(direction=rotation(15, -10, 30))
    pre = preprocess(image, mask)
    g = pre.geometry_dict()
    json.dumps(g, allow_nan=False)
    np.testing.assert_allclose(g["voi_centroid_lps_mm"], centroid, atol=1e-6)
    lo, hi = np.array(g["voi_bbox_lps_mm"]["min"]), np.array(g["voi_bbox_lps_mm"]["max"])
    assert np.all(lo <= centroid) and np.all(centroid <= hi)
    assert g["spacing_mm"] == [0.8, 0.8, 2.5]
    assert len(g["slice_indices"]) == 3 and g["slice_indices"] == sorted(g["slice_indices"])
    # The largest-area slice is among the chosen ones.
    assert max(g["slice_area_mm2"]) > 0


def test_largest_area_slice_chosen_with_neighbours() -> None:
    arr = np.zeros((12, 40, 40), np.uint8)
    for k, r in zip(range(3, 9), [3, 5, 9, 12, 6, 2]):  # largest at k=6
        y, x = np.ogrid[:40, :40]
        arr[k] = (y - 20) ** 2 + (x - 20) ** 2 <= r * r
    image = make_image(np.ones(arr.shape, np.float32), spacing=(0.8, 0.8, 2.5), origin=(0, 0, 0))
    mask = make_image(arr, spacing=(0.8, 0.8, 2.5), origin=(0, 0, 0))
    pre = preprocess(image, mask, PreprocessConfig(antialias=False))
    areas = pre.geometry.slice_area_mm2
    assert pre.geometry.slice_indices[1] - pre.geometry.slice_indices[0] == 1
    assert np.argmax(areas) == 1  # centre of the window
    assert pre.geometry_dict()["input_slice_indices"] == [5, 6, 7]
    uni = preprocess(image, mask, PreprocessConfig(slice_strategy="uniform", antialias=False))
    assert uni.geometry_dict()["input_slice_indices"] == [3, 5, 8]  # linspace over the VOI's slices 3..8


def test_voi_smaller_than_s_slices_repeats_and_border_is_padded() -> None:
    arr = np.zeros((6, 30, 30), np.uint8)
    arr[0, 0:4, 0:5] = 1  # one slice, touching the corner of the volume
    image = make_image(np.full(arr.shape, 2.0, np.float32), spacing=(0.8, 0.8, 2.5))
    mask = make_image(arr, spacing=(0.8, 0.8, 2.5))
    pre = preprocess(image, mask, PreprocessConfig(n_slices=3, margin_mm=8.0))
    g = pre.geometry_dict()
    assert len(set(g["slice_indices"])) == 1 and g["repeated_slices"] is True
    assert g["padded"] is True
    np.testing.assert_allclose(pre.slices[0], pre.slices[2])
    assert np.isfinite(pre.slices).all() and pre.slices.shape == (3, 3, 224, 224)
    # Padding is water (0 mg/mL): the image corner (top-left) of the crop is outside the image.
    assert pre.windowed[0, 0, 0] == pytest.approx(0.5 / 6.5, abs=1e-5)
    cam = pre.map_to_image(np.ones((3, 7, 7), np.float32))
    assert sitk.GetArrayViewFromImage(cam)[0].max() == pytest.approx(1.0)


@pytest.mark.parametrize("direction", [(1, 0, 0, 0, 1, 0, 0, 0, 1), rotation(25, -15, 40)])
def test_crop_first_equals_full_resampling(direction) -> None:
    image, mask, _ = phantom((24, 50, 54), spacing=(0.6, 0.65, 1.0), direction=direction, seed=3)
    fast = preprocess(image, mask, PreprocessConfig(crop_first=True))
    full = preprocess(image, mask, PreprocessConfig(crop_first=False))
    assert fast.geometry.slice_indices == full.geometry.slice_indices
    np.testing.assert_allclose(fast.slices, full.slices, atol=1e-4)


def test_flipped_storage_gives_the_same_network_input() -> None:
    """Canonical LPS resampling: an image stored with flipped x/y axes yields the same slices."""
    image, mask, _ = phantom((14, 40, 44), spacing=(0.75, 0.75, 2.0), seed=5)
    size = np.array(image.GetSize())
    far = geometry.index_to_physical(image, (size - 1)[None].astype(float))[0]
    origin = (far[0], far[1], image.GetOrigin()[2])
    flip = dict(spacing=image.GetSpacing(), origin=origin, direction=(-1, 0, 0, 0, -1, 0, 0, 0, 1))
    f_img = make_image(sitk.GetArrayFromImage(image)[:, ::-1, ::-1].copy(), **flip)
    f_mask = make_image(sitk.GetArrayFromImage(mask)[:, ::-1, ::-1].copy(), **flip)
    a = preprocess(image, mask)
    b = preprocess(f_img, f_mask)
    np.testing.assert_allclose(a.geometry.voi_centroid, b.geometry.voi_centroid, atol=1e-6)
    np.testing.assert_allclose(a.slices, b.slices, atol=1e-3)


def test_map_to_image_lands_on_the_voi() -> None:
    image, mask, centroid = phantom((20, 70, 74), spacing=(0.7, 0.7, 1.5), direction=rotation(10, 5, -20))
    pre = preprocess(image, mask)
    out = pre.map_to_image(np.ones((3, 7, 7), np.float32))
    for attr in ("GetSize", "GetOrigin", "GetSpacing", "GetDirection"):
        assert getattr(out, attr)() == getattr(image, attr)()
    arr = sitk.GetArrayFromImage(out)
    covered = geometry.mask_points(out, arr > 0.5)
    # Covered region: inside the crop box and within the chosen slabs around the VOI centroid.
    lo, hi = pre.geometry.crop_edges()
    assert np.all(covered >= lo - 1e-6) and np.all(covered <= hi + 1e-6)
    z = np.array(pre.geometry.slice_z())
    assert np.all(np.abs(covered[:, 2:3] - z[None, :]).min(axis=1) <= 2.5 / 2 + 1e-6)
    np.testing.assert_allclose(covered[:, :2].mean(axis=0), centroid[:2], atol=2.0)
    # Tumour voxels on the middle chosen slice are covered.
    tumour = geometry.mask_points(mask, sitk.GetArrayFromImage(mask))
    on_slice = tumour[np.abs(tumour[:, 2] - z[1]) < 0.5]
    idx = np.round(geometry.physical_to_index(image, on_slice)).astype(int)
    assert on_slice.size and arr[idx[:, 2], idx[:, 1], idx[:, 0]].min() > 0.99


def test_map_to_image_orientation() -> None:
    """Map column 0 is patient right (low LPS x), row 0 anterior (low LPS y), whatever the storage."""
    image, mask, _ = phantom((10, 40, 44), spacing=(0.8, 0.8, 2.0), direction=(-1, 0, 0, 0, -1, 0, 0, 0, 1))
    pre = preprocess(image, mask)
    lo, hi = pre.geometry.crop_edges()
    centre = (lo + hi) / 2
    maps = np.zeros((3, 224, 224), np.float32)
    maps[:, :100, :80] = 1.0  # top-left block
    arr = sitk.GetArrayFromImage(pre.map_to_image(maps))
    pts = geometry.mask_points(image, arr > 0.5)
    assert len(pts) > 0
    assert np.all(pts[:, 0] < centre[0]) and np.all(pts[:, 1] < centre[1])


def test_map_to_image_rejects_bad_shapes() -> None:
    image, mask, _ = phantom()
    pre = preprocess(image, mask)
    with pytest.raises(InputError, match="shape"):
        pre.map_to_image(np.ones((2, 7, 7)))
    with pytest.raises(InputError, match="NaN"):
        pre.map_to_image(np.full((3, 7, 7), np.nan))


def test_config_is_frozen_serialisable_and_validated() -> None:
    cfg = PreprocessConfig(n_slices=5, slice_strategy="uniform")
    assert PreprocessConfig.model_validate(cfg.model_dump()) == cfg
    assert PreprocessConfig.model_validate(json.loads(cfg.model_dump_json())) == cfg
    with pytest.raises(pydantic.ValidationError):
        cfg.n_slices = 2  # type: ignore[misc]
    with pytest.raises(pydantic.ValidationError):
        PreprocessConfig(window_mg_ml=(5.0, 1.0))
    with pytest.raises(pydantic.ValidationError):
        PreprocessConfig(spacing_mm=(0.8, 0.0, 2.5))
    with pytest.raises(pydantic.ValidationError):
        PreprocessConfig(unknown_field=1)  # type: ignore[call-arg]


def test_mask_must_share_the_image_grid_and_be_non_empty() -> None:
    image, mask, _ = phantom()
    moved = sitk.Image(mask)
    moved.SetOrigin((0.0, 0.0, 0.0))
    with pytest.raises(InputError, match="not on the image grid"):
        preprocess(image, moved)
    with pytest.raises(InputError, match="empty"):
        preprocess(image, mask * 0)


def test_preprocess_files_with_mask_on_another_grid(tmp_path: Path) -> None:
    image, mask, centroid = phantom((16, 40, 44), spacing=(0.75, 0.75, 2.0))
    fine = sitk.Resample(
        mask, _grid_like(image, spacing=(0.5, 0.5, 1.0)), sitk.Transform(), sitk.sitkNearestNeighbor
    )
    sitk.WriteImage(image, str(tmp_path / "img.nrrd"))
    sitk.WriteImage(fine * 3, str(tmp_path / "mask.nii.gz"))  # label value 3
    pre = preprocess_files(tmp_path / "img.nrrd", tmp_path / "mask.nii.gz", PreprocessConfig(), label=3)
    assert np.all(np.abs(np.array(pre.geometry.voi_centroid) - centroid) <= np.array(image.GetSpacing()))


def _grid_like(image: sitk.Image, *, spacing: tuple[float, float, float]) -> sitk.Image:
    lo, hi = geometry.physical_extent(image)
    size = np.ceil((hi - lo) / np.asarray(spacing)).astype(int)
    ref = sitk.Image([int(s) for s in size], sitk.sitkUInt8)
    ref.SetSpacing(spacing)
    ref.SetOrigin(tuple(lo + np.asarray(spacing) / 2))
    return ref


def test_version_1_0_configs_keep_their_whole_crop_input():
    """A manifest written before `voi_only` existed must not silently switch to VOI-only inputs."""
    from core.preprocessing import PreprocessConfig

    assert PreprocessConfig.model_validate({"version": "1.0"}).voi_only is False
    assert PreprocessConfig.model_validate({"version": "1.0", "voi_only": True}).voi_only is True
    assert PreprocessConfig.model_validate(PreprocessConfig().model_dump()).voi_only is True
