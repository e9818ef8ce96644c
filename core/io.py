"""Read iodine maps and tumour masks through SimpleITK; refuse anything that could give a silent wrong answer.

Formats: NIfTI (.nii, .nii.gz), NRRD (.nrrd, .nhdr), MetaImage (.mha, .mhd), a DICOM series folder, or a
.zip holding one DICOM series (or one image file). Geometry is kept in physical LPS millimetres (ITK's
convention), so RAS-stored NIfTI files and oblique direction cosines need no special casing downstream.

Every problem raises `core.errors.InputError` naming the file and the problem: missing, unreadable or
truncated files (SimpleITK zero-fills truncated NIfTI data, so completeness is checked here), sizes above
`MAX_VOXELS` / `MAX_FILE_BYTES` (checked from the header before any pixel is allocated), non-3-D or vector
images, NaN/Inf voxels, empty or multi-label masks without a chosen label, and masks that miss the image.
"""

from __future__ import annotations

import contextlib
import gzip
import logging
import os
import stat
import struct
import tempfile
import zipfile
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

import numpy as np
import SimpleITK as sitk

from core import geometry
from core.errors import InputError

log = logging.getLogger(__name__)

#: Largest accepted image, in voxels (2**28 ≈ 268 M voxels ≈ 1 GiB as float32; a 512×512×1024 CT fits).
MAX_VOXELS: int = 2**28
#: Largest accepted file (or DICOM folder / zip content) in bytes.
MAX_FILE_BYTES: int = 2 * 1024**3
#: Most members accepted in an uploaded zip (a DICOM series of a few hundred slices fits easily).
MAX_ZIP_MEMBERS: int = 5000

SUPPORTED_FORMATS = ".nii, .nii.gz, .nrrd, .nhdr, .mha, .mhd, a DICOM series folder, or a .zip of one series"
_SUFFIXES = {".nii": "nifti", ".nii.gz": "nifti", ".nrrd": "nrrd", ".nhdr": "nrrd", ".mha": "meta"}
_SUFFIXES |= {".mhd": "meta", ".dcm": "dicom", ".zip": "zip"}
_KIND_SUFFIX = {"nifti": ".nii", "nifti_gz": ".nii.gz", "nrrd": ".nrrd", "meta": ".mha", "dicom": ".dcm"}
_KIND_SUFFIX["zip"] = ".zip"


@dataclass(frozen=True)
class _Source:
    """Files SimpleITK should read (one file, or the ordered slices of one DICOM series)."""

    files: list[str]
    display: str
    is_series: bool = False


# --------------------------------------------------------------------------------------------- public API


def read_image(
    path: str | os.PathLike[str], *, max_voxels: int = MAX_VOXELS, series_uid: str | None = None
) -> sitk.Image:
    """Read a 3-D iodine map as float32 in physical LPS space (rescale slope/intercept applied).

    `series_uid` picks one series when a DICOM folder holds several (the error lists the UIDs).
    """
    path = Path(path)
    with contextlib.ExitStack() as stack:
        src = _locate(path, str(path), stack, series_uid=series_uid)
        image = _read_source(src, max_voxels=max_voxels, pixel_type=sitk.sitkFloat32)
    _check_finite(image, str(path))
    return image


def read_mask(
    path: str | os.PathLike[str],
    reference: sitk.Image,
    *,
    label: int | None = None,
    max_voxels: int = MAX_VOXELS,
) -> sitk.Image:
    """Read a tumour mask as binary uint8 on `reference`'s grid.

    A mask on another grid is resampled (nearest neighbour) when the physical extents overlap. With
    several labels, `label` must say which one is the tumour (the error lists the labels present).
    """
    path = Path(path)
    with contextlib.ExitStack() as stack:
        src = _locate(path, str(path), stack, series_uid=None)
        raw = _read_source(src, max_voxels=max_voxels, pixel_type=None)
    return _binarise_onto(raw, reference, label=label, display=str(path))


def read_pair(
    image_path: str | os.PathLike[str],
    mask_path: str | os.PathLike[str],
    *,
    label: int | None = None,
    max_voxels: int = MAX_VOXELS,
) -> tuple[sitk.Image, sitk.Image]:
    """Read an iodine map and its tumour mask (the mask lands on the image grid)."""
    image = read_image(image_path, max_voxels=max_voxels)
    return image, read_mask(mask_path, image, label=label, max_voxels=max_voxels)


def read_image_bytes(
    data: bytes, filename_hint: str, *, max_voxels: int = MAX_VOXELS, series_uid: str | None = None
) -> sitk.Image:
    """Read an uploaded image (file bytes or a zip of one DICOM series); format from magic bytes, then name.

    Errors name `filename_hint`; `InputError.public_message()` omits it for server logs.
    """
    with _bytes_as_file(data, filename_hint) as path, contextlib.ExitStack() as stack:
        src = _locate(path, filename_hint, stack, series_uid=series_uid)
        image = _read_source(src, max_voxels=max_voxels, pixel_type=sitk.sitkFloat32)
    _check_finite(image, filename_hint)
    return image


def read_mask_bytes(
    data: bytes,
    filename_hint: str,
    reference: sitk.Image,
    *,
    label: int | None = None,
    max_voxels: int = MAX_VOXELS,
) -> sitk.Image:
    """Uploaded-mask counterpart of `read_mask`."""
    with _bytes_as_file(data, filename_hint) as path, contextlib.ExitStack() as stack:
        src = _locate(path, filename_hint, stack, series_uid=None)
        raw = _read_source(src, max_voxels=max_voxels, pixel_type=None)
    return _binarise_onto(raw, reference, label=label, display=filename_hint)


# ------------------------------------------------------------------------------------------ format finding


def _suffix_kind(name: str) -> str | None:
    lower = name.lower()
    for suffix in sorted(_SUFFIXES, key=len, reverse=True):
        if lower.endswith(suffix):
            return _SUFFIXES[suffix]
    return None


def sniff_kind(head: bytes) -> str | None:
    """Format from the first bytes of a file: zip, dicom, nrrd, nifti(_gz) or meta; None when unknown."""
    if head.startswith(b"PK\x03\x04") or head.startswith(b"PK\x05\x06"):
        return "zip"
    if len(head) >= 132 and head[128:132] == b"DICM":
        return "dicom"
    if head.startswith(b"NRRD000"):
        return "nrrd"
    if head.startswith(b"\x1f\x8b"):
        return "nifti_gz"  # the only gzip-wrapped single-file format we accept
    if len(head) >= 4 and (
        struct.unpack("<i", head[:4])[0] in (348, 540) or struct.unpack(">i", head[:4])[0] in (348, 540)
    ):
        return "nifti"
    if head.lstrip().startswith((b"ObjectType", b"NDims")):
        return "meta"
    return None


def _locate(path: Path, display: str, stack: contextlib.ExitStack, *, series_uid: str | None) -> _Source:
    """Resolve a path (file, DICOM folder or zip) into the files to read; temp dirs go on `stack`."""
    if not path.exists():
        raise InputError("file not found", source=display)
    if path.is_dir():
        return _dicom_series(path, display, series_uid)
    size = path.stat().st_size
    if size == 0:
        raise InputError("file is empty", source=display)
    if size > MAX_FILE_BYTES:
        raise InputError(
            f"file is {size / 1e9:.1f} GB, above the {MAX_FILE_BYTES / 1e9:.1f} GB limit", source=display
        )
    try:
        with path.open("rb") as fh:
            head = fh.read(512)
    except OSError as exc:
        raise InputError(f"file cannot be opened ({exc.strerror})", source=display) from exc
    kind = _suffix_kind(path.name)
    sniffed = sniff_kind(head)
    if kind == "zip" or (kind is None and sniffed == "zip"):
        folder = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="pdl1_zip_")))
        _safe_extract(path, folder, display)
        return _from_extracted(folder, display, series_uid)
    if kind is None:
        if sniffed is None:
            raise InputError(f"unrecognised file format; supported: {SUPPORTED_FORMATS}", source=display)
        # ITK picks its reader by extension: give the file one.
        folder = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="pdl1_in_")))
        alias = folder / f"input{_KIND_SUFFIX[sniffed]}"
        os.symlink(path.resolve(), alias)
        log.info("%s: no known extension, read as %s from its magic bytes", display, sniffed)
        path, kind = alias, ("nifti" if sniffed == "nifti_gz" else sniffed)
    if kind == "nifti":
        _check_nifti_complete(path, display)
    return _Source(files=[str(path)], display=display)


def _from_extracted(folder: Path, display: str, series_uid: str | None) -> _Source:
    """A zip holds either DICOM slices or exactly one image file (e.g. .mhd with its .raw)."""
    series = _find_series(folder)
    if series:
        return _choose_series(series, display, series_uid)
    images = [
        p
        for p in sorted(folder.rglob("*"))
        if p.is_file() and _suffix_kind(p.name) in ("nifti", "nrrd", "meta")
    ]
    images = [p for p in images if not p.name.lower().endswith(".raw")]
    if len(images) == 1:
        if _suffix_kind(images[0].name) == "nifti":
            _check_nifti_complete(images[0], display)
        return _Source(files=[str(images[0])], display=display)
    raise InputError(
        f"zip holds no DICOM series and {len(images)} image files; expected one DICOM series or one image",
        source=display,
    )


def _safe_extract(zip_path: Path, dest: Path, display: str) -> None:
    """Extract a zip, refusing path traversal, links, zip bombs and oversized member counts."""
    try:
        with zipfile.ZipFile(zip_path) as zf:
            infos = zf.infolist()
            if len(infos) > MAX_ZIP_MEMBERS:
                raise InputError(
                    f"zip has {len(infos)} members, above the {MAX_ZIP_MEMBERS} limit", source=display
                )
            total = sum(i.file_size for i in infos)
            if total > MAX_FILE_BYTES:
                raise InputError(f"zip expands to {total / 1e9:.1f} GB, above the limit", source=display)
            root = dest.resolve()
            for info in infos:
                name = info.filename.replace("\\", "/")
                parts = PurePosixPath(name).parts
                if name.startswith("/") or ".." in parts or (parts and ":" in parts[0]):
                    raise InputError(f"zip member {info.filename!r} has an unsafe path", source=display)
                if stat.S_ISLNK(info.external_attr >> 16):
                    raise InputError(f"zip member {info.filename!r} is a symbolic link", source=display)
                target = (dest / name).resolve()
                if root not in target.parents and target != root:
                    raise InputError(
                        f"zip member {info.filename!r} escapes the archive folder", source=display
                    )
                if info.is_dir():
                    target.mkdir(parents=True, exist_ok=True)
                    continue
                target.parent.mkdir(parents=True, exist_ok=True)
                with zf.open(info) as src, target.open("wb") as out:
                    _copy_limited(src, out, info.file_size, display)
    except zipfile.BadZipFile as exc:
        raise InputError(f"not a valid zip archive ({exc})", source=display) from exc
    except (zlib.error, EOFError) as exc:
        raise InputError(f"zip archive is corrupt or truncated ({exc})", source=display) from exc


def _copy_limited(src, out, declared: int, display: str) -> None:
    written = 0
    while chunk := src.read(1 << 20):
        written += len(chunk)
        if written > declared:
            raise InputError("zip member is larger than its header declares", source=display)
        out.write(chunk)


@contextlib.contextmanager
def _bytes_as_file(data: bytes, filename_hint: str) -> Iterator[Path]:
    """Write upload bytes to a temp file named so that ITK recognises the format."""
    if len(data) == 0:
        raise InputError("upload is empty", source=filename_hint)
    if len(data) > MAX_FILE_BYTES:
        raise InputError("upload is above the size limit", source=filename_hint)
    sniffed = sniff_kind(data[:512])
    kind = _suffix_kind(Path(filename_hint).name)
    if sniffed == "nifti_gz" and kind in ("nrrd", "meta"):
        sniffed = None  # gzip magic alone is ambiguous; trust the name
    if sniffed is not None:
        suffix = _KIND_SUFFIX[sniffed]
    elif kind is not None:
        lower = filename_hint.lower()
        suffix = ".nii.gz" if lower.endswith(".nii.gz") else Path(lower).suffix
    else:
        raise InputError(f"unrecognised upload format; supported: {SUPPORTED_FORMATS}", source=filename_hint)
    if suffix in (".mhd", ".nhdr"):
        raise InputError(
            "detached headers (.mhd/.nhdr) need their data file: upload a zip", source=filename_hint
        )
    with tempfile.TemporaryDirectory(prefix="pdl1_up_") as tmp:
        path = Path(tmp) / f"upload{suffix}"
        path.write_bytes(data)
        yield path


# ------------------------------------------------------------------------------------------------ DICOM


def _find_series(root: Path) -> dict[str, list[str]]:
    """All DICOM series below `root` (GDCM grouping by SeriesInstanceUID), files in slice order."""
    series: dict[str, list[str]] = {}
    for dirpath, dirnames, _ in os.walk(root):
        dirnames.sort()
        for uid in sitk.ImageSeriesReader.GetGDCMSeriesIDs(dirpath):
            files = list(sitk.ImageSeriesReader.GetGDCMSeriesFileNames(dirpath, uid))
            series.setdefault(uid, []).extend(files)
    return series


def _dicom_series(folder: Path, display: str, series_uid: str | None) -> _Source:
    total = sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())
    if total > MAX_FILE_BYTES:
        raise InputError(f"folder holds {total / 1e9:.1f} GB, above the limit", source=display)
    series = _find_series(folder)
    if not series:
        raise InputError(f"folder contains no DICOM series; supported: {SUPPORTED_FORMATS}", source=display)
    return _choose_series(series, display, series_uid)


def _choose_series(series: dict[str, list[str]], display: str, series_uid: str | None) -> _Source:
    if series_uid is not None:
        if series_uid not in series:
            raise InputError(
                f"series {series_uid!r} not found; series present: {sorted(series)}", source=display
            )
        return _Source(files=series[series_uid], display=display, is_series=True)
    if len(series) > 1:
        listing = ", ".join(f"{uid} ({len(f)} files)" for uid, f in sorted(series.items()))
        raise InputError(
            f"holds {len(series)} DICOM series; choose one (series_uid): {listing}", source=display
        )
    return _Source(files=next(iter(series.values())), display=display, is_series=True)


def _check_series_spacing(reader: sitk.ImageSeriesReader, image: sitk.Image, display: str) -> None:
    """Missing or duplicated slices would silently stretch the volume: check positions are evenly spaced."""
    n = image.GetSize()[2]
    if n < 3:
        return
    key = "0020|0032"
    positions = []
    for i in range(n):
        if not reader.HasMetaDataKey(i, key):
            log.warning("%s: slice %d has no ImagePositionPatient; spacing check skipped", display, i)
            return
        positions.append([float(v) for v in reader.GetMetaData(i, key).split("\\")])
    normal = geometry.direction_matrix(image)[:, 2]
    depth = np.sort(np.asarray(positions) @ normal)
    steps = np.diff(depth)
    median = float(np.median(steps))
    if median <= 1e-6 or np.any(np.abs(steps - median) > 0.1 * median + 1e-3):
        raise InputError(
            f"DICOM slice positions are unevenly spaced (steps {np.unique(np.round(steps, 3)).tolist()} mm):"
            " missing or duplicated slices",
            source=display,
        )


# --------------------------------------------------------------------------------------------- reading


def _check_nifti_complete(path: Path, display: str) -> None:
    """SimpleITK zero-fills a truncated NIfTI silently, so compare the header's data size to the file."""
    opener = gzip.open if path.name.lower().endswith(".gz") else open
    try:
        with opener(path, "rb") as fh:
            head = fh.read(540)
            needed = _nifti_needed_bytes(head, display)
            if opener is open:
                have = path.stat().st_size
            else:
                have = len(head)
                while have < needed and (chunk := fh.read(1 << 22)):
                    have += len(chunk)
    except (OSError, EOFError, zlib.error) as exc:
        raise InputError(f"NIfTI file is corrupt or truncated ({exc})", source=display) from exc
    if have < needed:
        raise InputError(f"NIfTI file is truncated: {have} of {needed} bytes present", source=display)


def _nifti_needed_bytes(head: bytes, display: str) -> int:
    """Header size + voxel data size from a NIfTI-1 or NIfTI-2 header (either byte order)."""
    for endian in "<>":
        hdr_size = struct.unpack(endian + "i", head[:4])[0] if len(head) >= 4 else 0
        if hdr_size == 348 and len(head) >= 348:
            dims = struct.unpack(endian + "8h", head[40:56])
            bitpix = struct.unpack(endian + "h", head[72:74])[0]
            offset = int(struct.unpack(endian + "f", head[108:112])[0])
            break
        if hdr_size == 540 and len(head) >= 540:
            bitpix = struct.unpack(endian + "h", head[14:16])[0]
            dims = struct.unpack(endian + "8q", head[16:80])
            offset = int(struct.unpack(endian + "q", head[168:176])[0])
            break
    else:
        raise InputError("not a NIfTI file (bad header size field)", source=display)
    ndim = int(dims[0])
    if not 1 <= ndim <= 7 or any(d < 0 for d in dims[1 : ndim + 1]):
        raise InputError(f"NIfTI header has invalid dimensions {list(dims[: ndim + 1])}", source=display)
    n_vox = int(np.prod([max(int(d), 1) for d in dims[1 : ndim + 1]], dtype=np.float64))
    return max(offset, hdr_size + 4) + n_vox * max(int(bitpix), 8) // 8


def _read_source(src: _Source, *, max_voxels: int, pixel_type: int | None) -> sitk.Image:
    """Check the header (dimension, components, size) before reading pixels, then read."""
    info = sitk.ImageFileReader()
    info.SetFileName(src.files[0])
    try:
        info.ReadImageInformation()
    except RuntimeError as exc:
        raise InputError(f"not a readable image ({_itk_reason(exc)})", source=src.display) from exc
    size = list(info.GetSize())
    dim = info.GetDimension()
    if src.is_series and ((dim == 3 and size[2] == 1) or dim == 2):
        size = [*size[:2], len(src.files)]
        dim = 3
    if (n_comp := info.GetNumberOfComponents()) != 1:
        raise InputError(
            f"image has {n_comp} components per voxel (vector/RGB); expected a scalar map",
            source=src.display,
        )
    if dim == 4 and size[3] == 1:
        log.info("%s: 4-D image with a single time point, read as 3-D", src.display)
    elif dim != 3:
        raise InputError(f"image is {dim}-D with size {size}; expected a 3-D volume", source=src.display)
    if any(s < 1 for s in size[:3]):
        raise InputError(f"image has an empty dimension (size {size})", source=src.display)
    n_vox = int(np.prod(size, dtype=np.float64))
    if n_vox > max_voxels:
        raise InputError(
            f"image has {n_vox:,} voxels (size {size}), above the {max_voxels:,} limit", source=src.display
        )
    try:
        if src.is_series:
            reader = sitk.ImageSeriesReader()
            reader.SetFileNames(src.files)
            reader.MetaDataDictionaryArrayUpdateOn()
            if pixel_type is not None:
                reader.SetOutputPixelType(pixel_type)
            image = reader.Execute()
        else:
            reader = sitk.ImageFileReader()
            reader.SetFileName(src.files[0])
            if pixel_type is not None:
                reader.SetOutputPixelType(pixel_type)
            image = reader.Execute()
    except RuntimeError as exc:
        raise InputError(
            f"pixel data cannot be read, file corrupt or truncated ({_itk_reason(exc)})", source=src.display
        ) from exc
    if image.GetDimension() == 4:
        image = image[:, :, :, 0]
    if image.GetDimension() != 3:
        raise InputError(f"image is {image.GetDimension()}-D; expected a 3-D volume", source=src.display)
    if src.is_series:
        _check_series_spacing(reader, image, src.display)
    return image


def _itk_reason(exc: RuntimeError) -> str:
    """The informative line of a multi-line ITK exception (not the C++ source location)."""
    lines = [ln.strip() for ln in str(exc).splitlines() if ln.strip()]
    useful = [ln for ln in lines if not ln.startswith(("Exception thrown", "/")) and ".cxx:" not in ln]
    text = (useful[-1] if useful else lines[-1] if lines else "unknown error").removeprefix("sitk::ERROR: ")
    return text[:300]


def _check_finite(image: sitk.Image, display: str) -> None:
    arr = sitk.GetArrayViewFromImage(image)
    if np.issubdtype(arr.dtype, np.floating):
        bad = ~np.isfinite(arr)
        if bad.any():
            raise InputError(f"{int(bad.sum()):,} voxels are NaN or Inf", source=display)


# ------------------------------------------------------------------------------------------------- masks


def _binarise_onto(raw: sitk.Image, reference: sitk.Image, *, label: int | None, display: str) -> sitk.Image:
    """Select the tumour label, then put the binary mask on the reference grid."""
    _check_finite(raw, display)
    arr = sitk.GetArrayViewFromImage(raw)
    values = arr[arr != 0]
    if values.size == 0:
        raise InputError("mask is empty (no non-zero voxels)", source=display)
    labels = np.unique(values)
    if np.issubdtype(labels.dtype, np.floating) and not np.allclose(labels, np.round(labels)):
        raise InputError(
            f"mask has non-integer values (e.g. {labels[~np.isclose(labels, np.round(labels))][:3].tolist()})"
            "; expected a label map",
            source=display,
        )
    present = sorted({round(float(v)) for v in labels})
    if label is not None:
        if label not in present:
            raise InputError(f"label {label} is not in the mask; labels present: {present}", source=display)
        binary = np.rint(arr) == label if np.issubdtype(arr.dtype, np.floating) else arr == label
    elif len(present) > 1:
        raise InputError(
            f"mask has several labels {present}; choose the tumour label (label=...)", source=display
        )
    else:
        binary = arr != 0
    mask = sitk.GetImageFromArray(binary.astype(np.uint8))
    mask.CopyInformation(raw)
    if geometry.same_grid(mask, reference):
        mask.CopyInformation(reference)
        return mask
    return _resample_mask(mask, reference, display)


def _resample_mask(mask: sitk.Image, reference: sitk.Image, display: str) -> sitk.Image:
    m_lo, m_hi = geometry.physical_extent(mask)
    r_lo, r_hi = geometry.physical_extent(reference)
    if np.any(m_hi < r_lo) or np.any(r_hi < m_lo):
        raise InputError(
            f"mask does not overlap the image (LPS mm: mask {_span(m_lo, m_hi)}, image {_span(r_lo, r_hi)})",
            source=display,
        )
    out = sitk.Resample(mask, reference, sitk.Transform(), sitk.sitkNearestNeighbor, 0, sitk.sitkUInt8)
    n_out = int(sitk.GetArrayViewFromImage(out).sum())
    if n_out == 0:
        raise InputError(
            "mask is empty after resampling onto the image grid (the lesion lies outside the image)",
            source=display,
        )
    vol_in = float(sitk.GetArrayViewFromImage(mask).sum()) * float(np.prod(mask.GetSpacing()))
    vol_out = n_out * float(np.prod(reference.GetSpacing()))
    log.info(
        "%s: mask on another grid resampled (nearest neighbour) onto the image grid; volume %.2f -> %.2f mL",
        display,
        vol_in / 1000,
        vol_out / 1000,
    )
    if vol_out < 0.8 * vol_in:
        log.warning(
            "%s: only %.0f%% of the mask volume lies inside the image", display, 100 * vol_out / vol_in
        )
    return out


def _span(lo: np.ndarray, hi: np.ndarray) -> str:
    return f"{np.round(lo, 1).tolist()}..{np.round(hi, 1).tolist()}"
