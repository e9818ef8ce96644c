"""Tiny test volumes written by the tests themselves (no data files in the repository).

`phantom` builds an image with a known ellipsoidal 'tumour'; `write_dicom_series` writes a real DICOM
series with pydicom (rescale slope/intercept, ImagePositionPatient per slice) so SimpleITK reads it
through GDCM exactly as it would a scanner export.
"""

from __future__ import annotations

import datetime
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from core import geometry


def make_image(
    array_zyx: np.ndarray,
    *,
    spacing: Sequence[float] = (0.8, 0.8, 2.0),
    origin: Sequence[float] = (-40.0, -30.0, 100.0),
    direction: Sequence[float] = (1, 0, 0, 0, 1, 0, 0, 0, 1),
) -> sitk.Image:
    img = sitk.GetImageFromArray(np.ascontiguousarray(array_zyx))
    img.SetSpacing([float(v) for v in spacing])
    img.SetOrigin([float(v) for v in origin])
    img.SetDirection([float(v) for v in direction])
    return img


def rotation(ax: float, ay: float, az: float) -> tuple[float, ...]:
    """Direction cosines (row-major 3×3) of a rotation by angles in degrees about x, y, z."""
    a, b, c = np.deg2rad([ax, ay, az])
    rx = np.array([[1, 0, 0], [0, np.cos(a), -np.sin(a)], [0, np.sin(a), np.cos(a)]])
    ry = np.array([[np.cos(b), 0, np.sin(b)], [0, 1, 0], [-np.sin(b), 0, np.cos(b)]])
    rz = np.array([[np.cos(c), -np.sin(c), 0], [np.sin(c), np.cos(c), 0], [0, 0, 1]])
    return tuple((rz @ ry @ rx).ravel().tolist())


def phantom(
    shape_zyx: tuple[int, int, int] = (20, 48, 52),
    *,
    spacing: Sequence[float] = (0.8, 0.8, 2.0),
    origin: Sequence[float] = (-40.0, -30.0, 100.0),
    direction: Sequence[float] = (1, 0, 0, 0, 1, 0, 0, 0, 1),
    centre_mm: Sequence[float] | None = None,
    radii_mm: Sequence[float] = (8.0, 6.0, 7.0),
    seed: int = 0,
) -> tuple[sitk.Image, sitk.Image, np.ndarray]:
    """An iodine-like float32 image and a uint8 ellipsoid mask defined in PHYSICAL space.

    Returns (image, mask, true_centroid_lps): the centroid is the mean of the mask voxel centres.
    `centre_mm` defaults to the physical centre of the volume.
    """
    rng = np.random.default_rng(seed)
    img = make_image(np.zeros(shape_zyx, np.float32), spacing=spacing, origin=origin, direction=direction)
    lo, hi = geometry.physical_extent(img)
    centre = np.asarray(centre_mm if centre_mm is not None else (lo + hi) / 2, dtype=float)
    idx = np.indices(shape_zyx).reshape(3, -1)[::-1].T.astype(float)  # (x, y, z)
    pts = geometry.index_to_physical(img, idx)
    inside = (((pts - centre) / np.asarray(radii_mm)) ** 2).sum(axis=1) <= 1.0
    inside = inside.reshape(shape_zyx)
    values = (0.2 + 0.3 * rng.standard_normal(shape_zyx)).astype(np.float32)
    values[inside] += 2.5
    image = make_image(values, spacing=spacing, origin=origin, direction=direction)
    mask = make_image(inside.astype(np.uint8), spacing=spacing, origin=origin, direction=direction)
    centroid = geometry.mask_points(mask, inside).mean(axis=0)
    return image, mask, centroid


def write_dicom_series(
    folder: Path,
    stored_zyx: np.ndarray,
    *,
    spacing: Sequence[float] = (0.7, 0.7, 2.5),
    origin: Sequence[float] = (-120.0, -90.0, -300.0),
    direction: Sequence[float] = (1, 0, 0, 0, 1, 0, 0, 0, 1),
    slope: float = 1.0,
    intercept: float = 0.0,
    series_uid: str | None = None,
    skip_slices: Sequence[int] = (),
) -> list[Path]:
    """Write int16 `stored_zyx` as a CT DICOM series; real value = stored * slope + intercept."""
    from pydicom.dataset import FileDataset, FileMetaDataset
    from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, generate_uid

    folder.mkdir(parents=True, exist_ok=True)
    series_uid = series_uid or generate_uid()
    study_uid = generate_uid()
    frame_uid = generate_uid()
    d = np.asarray(direction, dtype=float).reshape(3, 3)
    row_cos, col_cos = d[:, 0], d[:, 1]
    paths = []
    for k in range(stored_zyx.shape[0]):
        if k in skip_slices:
            continue
        meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID = CTImageStorage
        meta.MediaStorageSOPInstanceUID = generate_uid()
        meta.TransferSyntaxUID = ExplicitVRLittleEndian
        path = folder / f"slice_{k:04d}.dcm"
        ds = FileDataset(str(path), {}, file_meta=meta, preamble=b"\0" * 128)
        ds.SOPClassUID = CTImageStorage
        ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
        ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.FrameOfReferenceUID = study_uid, series_uid, frame_uid
        ds.Modality = "CT"
        ds.PatientID = "SYNTHETIC"
        ds.PatientName = "Synthetic^Phantom"
        ds.StudyDate = datetime.date(2024, 1, 1).strftime("%Y%m%d")
        ds.SeriesNumber, ds.InstanceNumber = 1, k + 1
        pos = np.asarray(origin) + d @ (np.array([0.0, 0.0, k]) * np.asarray(spacing))
        ds.ImagePositionPatient = [f"{v:.6f}" for v in pos]
        ds.ImageOrientationPatient = [f"{v:.6f}" for v in (*row_cos, *col_cos)]
        ds.PixelSpacing = [f"{spacing[1]:.6f}", f"{spacing[0]:.6f}"]  # row spacing (y), column spacing (x)
        ds.SliceThickness = f"{spacing[2]:.6f}"
        ds.Rows, ds.Columns = stored_zyx.shape[1], stored_zyx.shape[2]
        ds.SamplesPerPixel = 1
        ds.PhotometricInterpretation = "MONOCHROME2"
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 1
        ds.RescaleSlope, ds.RescaleIntercept = f"{slope:g}", f"{intercept:g}"
        ds.PixelData = np.ascontiguousarray(stored_zyx[k], dtype="<i2").tobytes()
        ds.save_as(path, enforce_file_format=True)
        paths.append(path)
    return paths
