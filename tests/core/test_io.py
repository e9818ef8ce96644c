"""core.io: every supported format, physical geometry, and every bad-input case gives a clear InputError."""

from __future__ import annotations

import gzip
import io
import sys
import zipfile
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from core import geometry
from core import io as cio
from core.errors import InputError

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from fixtures_imaging import make_image, phantom, rotation, write_dicom_series


def _arr(img: sitk.Image) -> np.ndarray:
    return sitk.GetArrayFromImage(img)


@pytest.fixture(scope="module")
def volume() -> tuple[sitk.Image, sitk.Image, np.ndarray]:
    return phantom((12, 20, 22), spacing=(0.7, 0.7, 2.0), origin=(-12.0, 30.0, -200.0))


@pytest.mark.parametrize("suffix", [".nii", ".nii.gz", ".nrrd", ".mha", ".mhd"])
def test_formats_round_trip_values_and_geometry(tmp_path: Path, volume, suffix: str) -> None:
    image, mask, _ = volume
    path = tmp_path / f"img{suffix}"
    sitk.WriteImage(image, str(path))
    out = cio.read_image(path)
    assert out.GetPixelID() == sitk.sitkFloat32
    np.testing.assert_allclose(_arr(out), _arr(image), atol=1e-6)
    np.testing.assert_allclose(out.GetOrigin(), image.GetOrigin(), atol=1e-4)
    np.testing.assert_allclose(out.GetSpacing(), image.GetSpacing(), atol=1e-5)
    m = cio.read_mask(_write(tmp_path / f"mask{suffix}", mask), out)
    assert m.GetPixelID() == sitk.sitkUInt8
    np.testing.assert_array_equal(_arr(m), _arr(mask))


def _write(path: Path, img: sitk.Image) -> Path:
    sitk.WriteImage(img, str(path))
    return path


def test_dicom_series_rescale_and_oblique_geometry(tmp_path: Path) -> None:
    rng = np.random.default_rng(1)
    stored = rng.integers(-200, 1200, (6, 10, 12)).astype(np.int16)
    direction = rotation(12, -7, 25)
    write_dicom_series(tmp_path / "series", stored, slope=0.01, intercept=-1.5, direction=direction)
    img = cio.read_image(tmp_path / "series")
    assert img.GetSize() == (12, 10, 6)
    np.testing.assert_allclose(_arr(img), stored * 0.01 - 1.5, atol=1e-5)
    np.testing.assert_allclose(img.GetDirection(), direction, atol=1e-5)
    np.testing.assert_allclose(img.GetSpacing(), (0.7, 0.7, 2.5), atol=1e-4)
    np.testing.assert_allclose(img.GetOrigin(), (-120.0, -90.0, -300.0), atol=1e-4)


def test_dicom_zip_upload_and_bytes_reader(tmp_path: Path) -> None:
    stored = np.arange(4 * 6 * 5, dtype=np.int16).reshape(4, 6, 5)
    files = write_dicom_series(tmp_path / "s", stored, slope=2.0, intercept=-10)
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        for f in files:
            zf.write(f, f"export/series/{f.name}")
    img = cio.read_image_bytes(buf.getvalue(), "upload.zip")
    np.testing.assert_allclose(_arr(img), stored * 2.0 - 10, atol=1e-5)
    zpath = tmp_path / "series.zip"
    zpath.write_bytes(buf.getvalue())
    np.testing.assert_allclose(_arr(cio.read_image(zpath)), stored * 2.0 - 10, atol=1e-5)


def test_bytes_reader_detects_format_by_magic(tmp_path: Path, volume) -> None:
    image, mask, _ = volume
    for suffix in (".nii.gz", ".nrrd", ".mha", ".nii"):
        data = _write(tmp_path / f"x{suffix}", image).read_bytes()
        out = cio.read_image_bytes(data, "no_extension_given")
        np.testing.assert_allclose(_arr(out), _arr(image), atol=1e-6)
    m = cio.read_mask_bytes(_write(tmp_path / "m.nrrd", mask).read_bytes(), "mask.nrrd", image)
    np.testing.assert_array_equal(_arr(m), _arr(mask))


def test_unknown_extension_read_by_magic(tmp_path: Path, volume) -> None:
    image, _, _ = volume
    src = _write(tmp_path / "a.nii.gz", image)
    odd = tmp_path / "scan.data"
    odd.write_bytes(src.read_bytes())
    np.testing.assert_allclose(_arr(cio.read_image(odd)), _arr(image), atol=1e-6)


def test_ras_stored_nifti_gives_same_physical_centroid(tmp_path: Path) -> None:
    """A file stored with flipped x/y axes (RAS-like storage) must land at the same physical place."""
    image, mask, centroid = phantom((10, 24, 26), spacing=(0.8, 0.8, 2.0), centre_mm=(-22.0, -15.0, 110.0))
    lps_img, lps_mask = image, mask
    flipped_dir = (-1, 0, 0, 0, -1, 0, 0, 0, 1)
    size = np.array(image.GetSize())
    far_corner = geometry.index_to_physical(image, (size - 1)[None].astype(float))[0]
    origin = (far_corner[0], far_corner[1], image.GetOrigin()[2])
    ras_img = make_image(
        _arr(lps_img)[:, ::-1, ::-1].copy(), spacing=image.GetSpacing(), origin=origin, direction=flipped_dir
    )
    ras_mask = make_image(
        _arr(lps_mask)[:, ::-1, ::-1].copy(), spacing=image.GetSpacing(), origin=origin, direction=flipped_dir
    )
    img_path, mask_path = (
        _write(tmp_path / "ras.nii.gz", ras_img),
        _write(tmp_path / "ras_mask.nii.gz", ras_mask),
    )
    img, m = cio.read_pair(img_path, mask_path)
    got = geometry.mask_points(m, _arr(m)).mean(axis=0)
    np.testing.assert_allclose(got, centroid, atol=1e-3)
    # And an LPS-stored mask read against the RAS-stored image resamples onto it without loss.
    m2 = cio.read_mask(_write(tmp_path / "lps_mask.nrrd", lps_mask), img)
    np.testing.assert_array_equal(_arr(m2), _arr(m))


@pytest.mark.parametrize("direction", [(1, 0, 0, 0, 1, 0, 0, 0, 1), rotation(20, 10, -35)])
def test_mask_on_other_grid_centroid_within_one_voxel(tmp_path: Path, direction) -> None:
    image, _, _ = phantom(
        (16, 40, 44), spacing=(0.75, 0.75, 2.0), origin=(-16.0, -15.0, 50.0), direction=direction
    )
    lo, hi = geometry.physical_extent(image)
    centre = (lo + hi) / 2 + np.array([1.3, -2.1, 1.7])
    # A finer, shifted, differently oriented mask grid (as an editor might export a cropped segmentation).
    _, fine_mask, true_centroid = phantom(
        (30, 36, 40),
        spacing=(0.5, 0.45, 1.1),
        origin=tuple(centre - [10, 8, 16]),
        centre_mm=centre,
        radii_mm=(6, 5, 7),
    )
    path = _write(tmp_path / "mask_fine.nii.gz", fine_mask)
    m = cio.read_mask(path, image)
    assert geometry.same_grid(m, image)
    got = geometry.mask_points(m, _arr(m)).mean(axis=0)
    assert np.all(np.abs(got - true_centroid) <= np.array(image.GetSpacing())), (got, true_centroid)


def test_multilabel_mask_needs_label(tmp_path: Path, volume) -> None:
    image, mask, _ = volume
    arr = _arr(mask).astype(np.uint8) * 2
    arr[0, 0, 0] = 5
    path = _write(
        tmp_path / "labels.nii.gz", make_image(arr, spacing=image.GetSpacing(), origin=image.GetOrigin())
    )
    with pytest.raises(InputError, match=r"several labels \[2, 5\]"):
        cio.read_mask(path, image)
    m = cio.read_mask(path, image, label=2)
    np.testing.assert_array_equal(_arr(m), _arr(mask))
    with pytest.raises(InputError, match=r"label 3 is not in the mask; labels present: \[2, 5\]"):
        cio.read_mask(path, image, label=3)


# ------------------------------------------------------------------------------------------ bad inputs


def test_missing_and_empty_and_garbage_files(tmp_path: Path) -> None:
    with pytest.raises(InputError, match="file not found") as exc:
        cio.read_image(tmp_path / "nope.nii.gz")
    assert "nope.nii.gz" in str(exc.value) and "nope" not in exc.value.public_message()
    empty = tmp_path / "empty.nii"
    empty.write_bytes(b"")
    with pytest.raises(InputError, match="empty"):
        cio.read_image(empty)
    junk = tmp_path / "junk.mha"
    junk.write_bytes(b"this is not an image at all" * 10)
    with pytest.raises(InputError, match=r"junk\.mha"):
        cio.read_image(junk)
    unknown = tmp_path / "notes.txt"
    unknown.write_text("hello")
    with pytest.raises(InputError, match="unrecognised file format"):
        cio.read_image(unknown)


@pytest.mark.parametrize("suffix", [".nii", ".nii.gz", ".nrrd", ".mha"])
def test_truncated_files_are_refused(tmp_path: Path, volume, suffix: str) -> None:
    image, _, _ = volume
    full = _write(tmp_path / f"full{suffix}", image).read_bytes()
    if suffix == ".nii.gz":  # truncate the decompressed stream, then recompress (valid gzip, short data)
        data = gzip.compress(gzip.decompress(full)[:-300])
    else:
        data = full[: len(full) - 300]
    bad = tmp_path / f"cut{suffix}"
    bad.write_bytes(data)
    with pytest.raises(InputError, match=r"cut\.") as exc:
        cio.read_image(bad)
    assert "truncated" in str(exc.value) or "cannot be read" in str(exc.value)
    chopped = tmp_path / f"chop{suffix}"
    chopped.write_bytes(full[: len(full) // 2])
    with pytest.raises(InputError):
        cio.read_image(chopped)


def test_nan_and_inf_voxels(tmp_path: Path) -> None:
    arr = np.ones((4, 5, 6), np.float32)
    arr[1, 2, 3] = np.nan
    arr[2, 2, 2] = np.inf
    path = _write(tmp_path / "nan.nrrd", make_image(arr))
    with pytest.raises(InputError, match="2 voxels are NaN or Inf"):
        cio.read_image(path)


def test_absurd_size_refused_before_reading(tmp_path: Path, monkeypatch) -> None:
    path = _write(tmp_path / "big.mha", make_image(np.zeros((8, 16, 16), np.float32)))
    with pytest.raises(InputError, match="above the 1,000 limit"):
        cio.read_image(path, max_voxels=1000)

    def boom(self):
        raise AssertionError("pixels were read before the size check")

    monkeypatch.setattr(sitk.ImageFileReader, "Execute", boom)
    with pytest.raises(InputError, match="voxels"):
        cio.read_image(path, max_voxels=1000)


def test_file_size_limit(tmp_path: Path, monkeypatch) -> None:
    path = _write(tmp_path / "a.nii", make_image(np.zeros((4, 4, 4), np.float32)))
    monkeypatch.setattr(cio, "MAX_FILE_BYTES", 100)
    with pytest.raises(InputError, match="limit"):
        cio.read_image(path)


@pytest.mark.parametrize(
    ("array", "is_vector", "match"),
    [
        (np.zeros((5, 6), np.float32), False, "2-D"),
        (np.zeros((3, 4, 5, 6), np.float32), False, "4-D"),
        (np.zeros((4, 5, 6, 3), np.float32), True, "3 components"),
    ],
)
def test_non_3d_inputs(tmp_path: Path, array: np.ndarray, is_vector: bool, match: str) -> None:
    path = tmp_path / "odd.nrrd"
    sitk.WriteImage(sitk.GetImageFromArray(array, isVector=is_vector), str(path))
    with pytest.raises(InputError, match=match):
        cio.read_image(path)


def test_empty_mask_and_mask_outside_image(tmp_path: Path, volume) -> None:
    image, mask, _ = volume
    empty = _write(tmp_path / "empty.nii.gz", make_image(np.zeros(_arr(mask).shape, np.uint8)))
    with pytest.raises(InputError, match="mask is empty"):
        cio.read_mask(empty, image)
    far = sitk.Image(mask)
    far.SetOrigin((500.0, 500.0, 500.0))
    with pytest.raises(InputError, match="does not overlap"):
        cio.read_mask(_write(tmp_path / "far.nii.gz", far), image)
    # Overlapping extents, but the labelled voxels fall outside the image: empty after resampling.
    arr = np.zeros((12, 20, 22), np.uint8)
    arr[-1, -1, -1] = 1
    _, hi = geometry.physical_extent(image)
    shifted = make_image(arr, spacing=(0.7, 0.7, 2.0), origin=tuple(hi - np.array([1.0, 1.0, 1.0])))
    with pytest.raises(InputError, match="empty after resampling"):
        cio.read_mask(_write(tmp_path / "edge.nii.gz", shifted), image)


def test_non_integer_mask_refused(tmp_path: Path, volume) -> None:
    image, mask, _ = volume
    arr = _arr(mask).astype(np.float32) * 0.5
    path = _write(
        tmp_path / "prob.nrrd", make_image(arr, spacing=image.GetSpacing(), origin=image.GetOrigin())
    )
    with pytest.raises(InputError, match="non-integer"):
        cio.read_mask(path, image)


def test_dicom_folder_errors(tmp_path: Path) -> None:
    stored = np.zeros((4, 6, 5), np.int16)
    write_dicom_series(tmp_path / "two" / "a", stored, series_uid="1.2.3.4")
    write_dicom_series(tmp_path / "two" / "b", stored, series_uid="1.2.3.5")
    with pytest.raises(InputError, match=r"2 DICOM series.*1\.2\.3\.4.*1\.2\.3\.5"):
        cio.read_image(tmp_path / "two")
    img = cio.read_image(tmp_path / "two", series_uid="1.2.3.5")
    assert img.GetSize() == (5, 6, 4)
    (tmp_path / "none").mkdir()
    (tmp_path / "none" / "readme.txt").write_text("x")
    with pytest.raises(InputError, match="no DICOM series"):
        cio.read_image(tmp_path / "none")
    write_dicom_series(tmp_path / "gap", np.zeros((6, 6, 5), np.int16), skip_slices=[3])
    with pytest.raises(InputError, match="unevenly spaced"):
        cio.read_image(tmp_path / "gap")


def test_zip_path_traversal_and_bad_zip() -> None:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        zf.writestr("../../evil.dcm", b"x" * 200)
    with pytest.raises(InputError, match="unsafe path"):
        cio.read_image_bytes(buf.getvalue(), "evil.zip")
    with pytest.raises(InputError, match=r"not a valid zip|unrecognised"):
        cio.read_image_bytes(b"PK\x03\x04" + b"\0" * 50, "broken.zip")
    with pytest.raises(InputError, match="upload is empty"):
        cio.read_image_bytes(b"", "x.nii")


def test_zip_with_two_series_lists_them(tmp_path: Path) -> None:
    stored = np.zeros((3, 4, 4), np.int16)
    files = write_dicom_series(tmp_path / "a", stored, series_uid="1.2.840.1")
    files += write_dicom_series(tmp_path / "b", stored, series_uid="1.2.840.2")
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        for f in files:
            zf.write(f, f"{f.parent.name}/{f.name}")
    with pytest.raises(InputError, match=r"1\.2\.840\.1.*1\.2\.840\.2") as exc:
        cio.read_image_bytes(buf.getvalue(), "two.zip")
    assert "two.zip" not in exc.value.public_message()
