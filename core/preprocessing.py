"""The one preprocessing that training, export and the service share: iodine map + mask -> network input.

Steps (all declared in `PreprocessConfig`, which travels inside every exported model manifest):

1. Resample onto a canonical, axis-aligned LPS grid at `spacing_mm` (linear for the image, linear + 0.5
   threshold for the mask). The grid's lattice is anchored at the image's physical corner, so the same
   voxel values come out whether the whole volume is resampled or only the VOI box (`crop_first`, the
   fast default). Axis-aligned output means RAS-stored or oblique files give the same slices as LPS ones.
2. Crop the VOI's bounding box plus `margin_mm` in-plane, made square so resizing keeps the aspect ratio;
   the z range is the VOI's. Regions outside the image are padded with `pad_value_mg_ml` (recorded).
3. Choose `n_slices` slices: the largest-area tumour slice and its neighbours ('largest'), or slices
   spread evenly over the VOI ('uniform'). Slices stay inside the VOI: when it has fewer slices than
   `n_slices` the window is clamped and edge slices repeat (recorded in the geometry).
4. Window `window_mg_ml` -> [0, 1] (clipped), resize to `size`², zero outside the VOI when `voi_only`,
   copy to 3 channels, ImageNet-normalise. (`Preprocessed.windowed` keeps the unmasked slices for display.)

`Preprocessed.map_to_image` inverts the geometry: a per-slice map (7×7 CAM or 224×224) lands on the
ORIGINAL image grid, each slice covering its slab of thickness `spacing_mm[2]`.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
import SimpleITK as sitk
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator
from scipy import ndimage

from core import geometry
from core.errors import InputError

log = logging.getLogger(__name__)

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class PreprocessConfig(BaseModel):
    """Declarative preprocessing; serialise with `.model_dump()`, restore with `.model_validate(d)`."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    version: str = Field("1.1", description="Bumped whenever the produced arrays would change.")
    spacing_mm: tuple[float, float, float] = Field(
        (0.8, 0.8, 2.5),
        description="Target (x, y, z) spacing. 0.8 mm is mid-range of clinical in-plane DECT spacing"
        " (0.6-0.9); 2.5 mm is a common reconstruction thickness, so neighbouring slices differ.",
    )
    window_mg_ml: tuple[float, float] = Field(
        (-0.5, 6.0),
        description="Iodine window (mg/mL) mapped to [0, 1] and clipped: covers fat/water (~0), enhancing"
        " wall (1.5-3) and tumour (1.5-5); vessels (6-12) saturate.",
    )
    margin_mm: float = Field(10.0, ge=0, description="In-plane margin around the VOI bounding box.")
    n_slices: int = Field(3, ge=1, le=64, description="S: slices per patient fed to the 2-D network.")
    slice_strategy: Literal["largest", "uniform"] = Field(
        "largest", description="'largest': max-area tumour slice and neighbours; 'uniform': spread over VOI."
    )
    size: int = Field(224, ge=16, le=1024, description="Output height = width in pixels.")
    channels: Literal[3] = Field(3, description="The grey slice is copied to 3 channels (ImageNet networks).")
    mean: tuple[float, float, float] = Field(IMAGENET_MEAN, description="Per-channel normalisation mean.")
    std: tuple[float, float, float] = Field(IMAGENET_STD, description="Per-channel normalisation std.")
    square_crop: bool = Field(True, description="Square in-plane crop, so resizing keeps the aspect ratio.")
    crop_first: bool = Field(
        True, description="Resample only the VOI box (fast); False resamples the whole volume, then crops."
    )
    pad_value_mg_ml: float = Field(0.0, description="Value outside the image (water/air carry no iodine).")
    voi_only: bool = Field(
        True,
        description="Set pixels outside the tumour VOI to the window's low end, so the network describes the"
        " tumour rather than the stomach wall and fat around it (the study extracts features from the VOI).",
    )
    antialias: bool = Field(
        True,
        description="Gaussian pre-filter on downsampled axes (sigma = (target/input - 1)/2 input voxels, as"
        " skimage): 1 mm and 2.5 mm slices then carry comparable noise and texture after resampling.",
    )

    @field_validator("spacing_mm", "std")
    @classmethod
    def _positive(cls, v: tuple[float, ...]) -> tuple[float, ...]:
        if any(x <= 0 for x in v):
            raise ValueError(f"must be positive, got {v}")
        return v

    @model_validator(mode="before")
    @classmethod
    def _v1_0_had_no_voi_only(cls, data: Any) -> Any:
        """Configs dumped by version 1.0 predate `voi_only` and fed the whole crop to the network."""
        if isinstance(data, dict) and data.get("version") == "1.0" and "voi_only" not in data:
            return {**data, "voi_only": False}
        return data

    @model_validator(mode="after")
    def _window_order(self) -> PreprocessConfig:
        if self.window_mg_ml[0] >= self.window_mg_ml[1]:
            raise ValueError(f"window_mg_ml low must be below high, got {self.window_mg_ml}")
        return self


@dataclass(frozen=True)
class SliceGeometry:
    """Where the network input came from, in physical LPS millimetres."""

    input_grid: dict[str, Any]  # geometry.grid_dict of the ORIGINAL image
    crop_origin: tuple[float, float, float]  # centre of crop voxel (0, 0, 0), axis-aligned LPS grid
    crop_size: tuple[int, int, int]  # (x, y, z) voxels of the resampled crop
    spacing: tuple[float, float, float]
    slice_indices: tuple[int, ...]  # indices into the crop's z axis, one per output slice
    slice_area_mm2: tuple[float, ...]
    voi_bbox_min: tuple[float, float, float]  # of the VOI voxel centres
    voi_bbox_max: tuple[float, float, float]
    voi_centroid: tuple[float, float, float]
    voi_voxels: int
    voi_volume_ml: float
    voi_z_slices: int  # VOI slices on the resampled grid
    repeated_slices: bool
    padded: bool

    def slice_z(self) -> list[float]:
        return [self.crop_origin[2] + k * self.spacing[2] for k in self.slice_indices]

    def crop_edges(self) -> tuple[np.ndarray, np.ndarray]:
        """(min, max) LPS edges of the crop box."""
        sp, o, n = np.asarray(self.spacing), np.asarray(self.crop_origin), np.asarray(self.crop_size)
        return o - sp / 2, o + (n - 0.5) * sp


@dataclass(frozen=True)
class Preprocessed:
    """One patient's network input plus what is needed to show it and to map results back."""

    slices: np.ndarray  # float32 [S, 3, size, size], normalised
    windowed: np.ndarray  # float32 [S, size, size] in [0, 1] (before normalisation; for display)
    mask_slices: np.ndarray  # uint8 [S, size, size] (VOI on each slice; for outlines)
    geometry: SliceGeometry
    config: PreprocessConfig

    def geometry_dict(self) -> dict[str, Any]:
        """JSON-ready geometry: VOI box/centroid (LPS mm), chosen slices, spacing, crop box, input grid."""
        g = self.geometry
        lo, hi = g.crop_edges()
        return {
            "coordinate_system": "LPS",
            "units": "mm",
            "voi_bbox_lps_mm": {"min": list(g.voi_bbox_min), "max": list(g.voi_bbox_max)},
            "voi_centroid_lps_mm": list(g.voi_centroid),
            "voi_voxels": g.voi_voxels,
            "voi_volume_ml": g.voi_volume_ml,
            "voi_slices_resampled": g.voi_z_slices,
            "slice_strategy": self.config.slice_strategy,
            "slice_indices": list(g.slice_indices),
            "slice_z_lps_mm": g.slice_z(),
            "slice_area_mm2": list(g.slice_area_mm2),
            "input_slice_indices": self._input_slice_indices(),
            "repeated_slices": g.repeated_slices,
            "spacing_mm": list(g.spacing),
            "crop_box_lps_mm": {
                "min": lo.tolist(),
                "max": hi.tolist(),
                "origin": list(g.crop_origin),
                "size": list(g.crop_size),
            },
            "padded": g.padded,
            "input_grid": g.input_grid,
            "output_shape": list(self.slices.shape),
            "preprocess_version": self.config.version,
        }

    def _input_slice_indices(self) -> list[int]:
        """Nearest ORIGINAL-grid slice (k index) to each chosen slice centre (exact for axial inputs)."""
        g = self.geometry
        ref = geometry.image_from_grid({**g.input_grid, "size": [1, 1, 1]})
        centre = np.asarray(g.voi_centroid, dtype=float)
        pts = np.array([[centre[0], centre[1], z] for z in g.slice_z()])
        k = geometry.physical_to_index(ref, pts)[:, 2]
        nz = g.input_grid["size"][2]
        return [int(v) for v in np.clip(np.round(k), 0, nz - 1)]

    def map_to_image(self, maps: np.ndarray) -> sitk.Image:
        """Per-slice maps [S, h, w] -> float32 image on the ORIGINAL input grid (0 outside the chosen slabs).

        Map pixel (r, c) covers the same physical square as the resized crop pixel; each slice covers the
        slab of thickness spacing_mm[2] around its centre. In-plane values are bilinear; slices that were
        repeated (small VOIs) are averaged.
        """
        maps = np.asarray(maps, dtype=np.float32)
        n_s = len(self.geometry.slice_indices)
        if maps.ndim != 3 or maps.shape[0] != n_s:
            raise InputError(f"maps must have shape [S={n_s}, h, w], got {list(maps.shape)}", field="maps")
        if not np.isfinite(maps).all():
            raise InputError("maps contain NaN or Inf", field="maps")
        g = self.geometry
        ref = geometry.image_from_grid(g.input_grid)
        out = np.zeros(ref.GetSize()[::-1], dtype=np.float32)
        lo, hi = g.crop_edges()
        # Index box of the original voxels that can fall inside the crop box.
        corners = np.array(
            [[x, y, z] for x in (lo[0], hi[0]) for y in (lo[1], hi[1]) for z in (lo[2], hi[2])]
        )
        cidx = geometry.physical_to_index(ref, corners)
        size = np.asarray(ref.GetSize())
        i0 = np.clip(np.floor(cidx.min(axis=0)).astype(int), 0, size - 1)
        i1 = np.clip(np.ceil(cidx.max(axis=0)).astype(int), 0, size - 1)
        grids = np.meshgrid(*[np.arange(a, b + 1) for a, b in zip(i0, i1)], indexing="ij")  # x, y, z
        idx = np.stack([gr.ravel() for gr in grids], axis=1).astype(np.float64)
        pts = geometry.index_to_physical(ref, idx)
        h, w = maps.shape[1:]
        u = (pts[:, 0] - lo[0]) / (hi[0] - lo[0]) * w - 0.5  # map column (x)
        v = (pts[:, 1] - lo[1]) / (hi[1] - lo[1]) * h - 0.5  # map row (y)
        kz = np.floor((pts[:, 2] - lo[2]) / g.spacing[2]).astype(int)  # crop slab
        inside = (u >= -0.5) & (u <= w - 0.5) & (v >= -0.5) & (v <= h - 0.5)
        sub = np.zeros(len(pts), dtype=np.float32)
        for k in sorted(set(g.slice_indices)):
            chosen = [s for s, kk in enumerate(g.slice_indices) if kk == k]
            plane = maps[chosen].mean(axis=0)
            sel = inside & (kz == k)
            if sel.any():
                sub[sel] = ndimage.map_coordinates(plane, [v[sel], u[sel]], order=1, mode="nearest")
        shape_xyz = tuple(int(b - a + 1) for a, b in zip(i0, i1))
        out[i0[2] : i1[2] + 1, i0[1] : i1[1] + 1, i0[0] : i1[0] + 1] = sub.reshape(shape_xyz).transpose(
            2, 1, 0
        )
        result = sitk.GetImageFromArray(out)
        result.CopyInformation(ref)
        return result


# ---------------------------------------------------------------------------------------------- pipeline


def preprocess(image: sitk.Image, mask: sitk.Image, config: PreprocessConfig | None = None) -> Preprocessed:
    """Iodine map + binary mask on the same grid (as `core.io.read_pair` returns) -> `Preprocessed`."""
    config = config or PreprocessConfig()
    if image.GetDimension() != 3 or mask.GetDimension() != 3:
        raise InputError("image and mask must be 3-D", field="image")
    if not geometry.same_grid(image, mask):
        raise InputError("mask is not on the image grid; read it with core.io.read_mask", field="mask")
    m_arr = sitk.GetArrayViewFromImage(mask) != 0
    if not m_arr.any():
        raise InputError("mask is empty", field="mask")
    mask = sitk.Image(mask)
    mask.CopyInformation(image)  # same grid to tolerance; make it exact

    # VOI statistics on the original grid (voxel centres, LPS).
    pts = geometry.mask_points(image, m_arr)
    voi_min, voi_max, centroid = pts.min(axis=0), pts.max(axis=0), pts.mean(axis=0)
    voxel_ml = float(np.prod(image.GetSpacing())) / 1000.0

    # Canonical lattice anchored at the image's physical corner (identity direction).
    sp = np.asarray(config.spacing_mm, dtype=float)
    ext_lo, ext_hi = geometry.physical_extent(image)
    lattice0 = ext_lo + sp / 2
    half = (voi_max - voi_min) / 2 + geometry.voxel_footprint(image)
    centre = (voi_max + voi_min) / 2
    half_xy = half[:2] + config.margin_mm
    if config.square_crop:
        half_xy = np.full(2, half_xy.max())
    c_idx = np.round((centre[:2] - lattice0[:2]) / sp[:2]).astype(int)
    h_idx = np.ceil(half_xy / sp[:2]).astype(int)
    k0 = int(np.round((voi_min[2] - lattice0[2]) / sp[2]))
    k1 = int(np.round((voi_max[2] - lattice0[2]) / sp[2]))
    start = np.array([*(c_idx - h_idx), k0])
    size = np.array([*(2 * h_idx + 1), k1 - k0 + 1])
    crop_origin = lattice0 + start * sp
    crop_lo, crop_hi = crop_origin - sp / 2, crop_origin + (size - 0.5) * sp
    padded = bool(np.any(crop_lo < ext_lo - 1e-6) or np.any(crop_hi > ext_hi + 1e-6))
    if padded:
        log.debug("VOI box reaches beyond the image; padded with %.2f mg/mL", config.pad_value_mg_ml)

    sigma = _antialias_sigma(image, sp) if config.antialias else np.zeros(3)
    if config.crop_first:
        grid = _axis_grid(crop_origin, sp, size)
        source = _smooth(_region(image, crop_lo, crop_hi, sigma), sigma)
        vol = _resample(source, grid, config.pad_value_mg_ml, footprint=image)
        voi = _resample(_binary01(_region(mask, crop_lo, crop_hi, sigma)), grid, 0.0, footprint=image)
    else:
        n_full = np.ceil((ext_hi - ext_lo) / sp - 1e-6).astype(int)
        grid = _axis_grid(lattice0, sp, n_full)
        full = _resample(_smooth(image, sigma), grid, config.pad_value_mg_ml, footprint=image)
        vol = _take(full, start, size, config.pad_value_mg_ml)
        voi = _take(_resample(_binary01(mask), grid, 0.0, footprint=image), start, size, 0.0)

    area = voi.reshape(voi.shape[0], -1).sum(axis=1) * sp[0] * sp[1]
    idx, repeated = _choose_slices(area, config.n_slices, config.slice_strategy)
    if repeated:
        log.info(
            "VOI spans %d resampled slice(s) < n_slices=%d: slices repeated",
            int((area > 0).sum()),
            config.n_slices,
        )

    windowed, mask_slices, net = _to_network(vol[idx], voi[idx], config)
    geo = SliceGeometry(
        input_grid=geometry.grid_dict(image),
        crop_origin=tuple(float(v) for v in crop_origin),
        crop_size=tuple(int(v) for v in size),
        spacing=tuple(float(v) for v in sp),
        slice_indices=tuple(int(i) for i in idx),
        slice_area_mm2=tuple(float(area[i]) for i in idx),
        voi_bbox_min=tuple(float(v) for v in voi_min),
        voi_bbox_max=tuple(float(v) for v in voi_max),
        voi_centroid=tuple(float(v) for v in centroid),
        voi_voxels=int(m_arr.sum()),
        voi_volume_ml=float(m_arr.sum() * voxel_ml),
        voi_z_slices=int((area > 0).sum()),
        repeated_slices=repeated,
        padded=padded,
    )
    return Preprocessed(slices=net, windowed=windowed, mask_slices=mask_slices, geometry=geo, config=config)


def preprocess_files(
    image_path: str | os.PathLike[str],
    mask_path: str | os.PathLike[str],
    config: PreprocessConfig | None = None,
    *,
    label: int | None = None,
) -> Preprocessed:
    """Read (core.io) and preprocess one image/mask pair."""
    from core.io import read_pair

    image, mask = read_pair(image_path, mask_path, label=label)
    return preprocess(image, mask, config)


# ----------------------------------------------------------------------------------------------- helpers


def _axis_grid(origin: np.ndarray, spacing: np.ndarray, size: np.ndarray) -> sitk.Image:
    ref = sitk.Image([int(v) for v in size], sitk.sitkUInt8)
    ref.SetOrigin([float(v) for v in origin])
    ref.SetSpacing([float(v) for v in spacing])
    return ref


_TRUNCATE = 3.0


def _antialias_sigma(image: sitk.Image, target: np.ndarray) -> np.ndarray:
    """Per input axis (x, y, z) Gaussian sigma in voxels; 0 where the axis is not downsampled."""
    d = geometry.direction_matrix(image)
    along = np.sqrt(((d * target[:, None]) ** 2).sum(axis=0))  # target spacing seen along each input axis
    return np.maximum(along / np.asarray(image.GetSpacing()) - 1.0, 0.0) / 2.0


def _region(image: sitk.Image, lo: np.ndarray, hi: np.ndarray, sigma: np.ndarray) -> sitk.Image:
    """The input sub-volume that the crop box's interpolation and smoothing can touch (geometry kept)."""
    corners = np.array([[x, y, z] for x in (lo[0], hi[0]) for y in (lo[1], hi[1]) for z in (lo[2], hi[2])])
    cidx = geometry.physical_to_index(image, corners)
    pad = np.ceil(_TRUNCATE * sigma + 0.5).astype(int) + 2
    size = np.asarray(image.GetSize())
    i0 = np.clip(np.floor(cidx.min(axis=0)).astype(int) - pad, 0, size - 1)
    i1 = np.clip(np.ceil(cidx.max(axis=0)).astype(int) + pad, 0, size - 1)
    return image[int(i0[0]) : int(i1[0]) + 1, int(i0[1]) : int(i1[1]) + 1, int(i0[2]) : int(i1[2]) + 1]


def _binary01(mask: sitk.Image) -> sitk.Image:
    return sitk.Cast(mask != 0, sitk.sitkFloat32)


def _smooth(image: sitk.Image, sigma: np.ndarray) -> sitk.Image:
    """Finite-support Gaussian (so a sub-region with margin matches the full volume exactly); float32."""
    image = sitk.Cast(image, sitk.sitkFloat32)
    if not np.any(sigma > 0):
        return image
    arr = ndimage.gaussian_filter(
        sitk.GetArrayFromImage(image), sigma=sigma[::-1].tolist(), mode="nearest", truncate=_TRUNCATE
    )
    out = sitk.GetImageFromArray(arr)
    out.CopyInformation(image)
    return out


def _resample(image: sitk.Image, grid: sitk.Image, pad: float, *, footprint: sitk.Image) -> np.ndarray:
    """Linear resampling onto `grid`; `pad` exactly outside the closed footprint of the input voxels.

    ITK treats the image as the half-open index box [-0.5, size - 0.5) and decides on floating-point
    noise at the edges, so flipped storage or another crop could change edge samples. The input is
    therefore edge-replicated by one voxel (samples in the outer half-voxel get the clamped linear
    value, unambiguously) and inside/outside is decided here, symmetrically, on the closed box.
    """
    padded = sitk.ZeroFluxNeumannPad(image, [1, 1, 1], [1, 1, 1])
    out = sitk.Resample(padded, grid, sitk.Transform(), sitk.sitkLinear, 0.0, sitk.sitkFloat32)
    arr = sitk.GetArrayFromImage(out)  # (z, y, x)
    size = np.asarray(footprint.GetSize(), dtype=float)
    origin = np.asarray(grid.GetOrigin(), dtype=float)
    sp = np.asarray(grid.GetSpacing(), dtype=float)
    base = geometry.physical_to_index(footprint, origin[None])[0]
    step = geometry.physical_to_index(footprint, (origin + np.diag(sp))) - base  # per grid axis (rows)
    n_x, n_y, n_z = grid.GetSize()
    col = (
        base[None, None, :]
        + np.arange(n_x)[None, :, None] * step[0]
        + np.arange(n_y)[:, None, None] * step[1]
    )
    eps = 1e-6
    for k in range(n_z):
        c = col + k * step[2]
        outside = np.any((c < -0.5 - eps) | (c > size - 0.5 + eps), axis=2)
        arr[k][outside] = pad
    return arr


def _take(full: np.ndarray, start_xyz: np.ndarray, size_xyz: np.ndarray, pad: float) -> np.ndarray:
    """Crop `full` (z, y, x) at a box that may extend beyond it (padding with `pad`)."""
    out = np.full(tuple(size_xyz[::-1]), pad, dtype=np.float32)
    src_lo = np.maximum(start_xyz[::-1], 0)
    src_hi = np.minimum(start_xyz[::-1] + size_xyz[::-1], full.shape)
    if np.any(src_hi <= src_lo):
        return out
    dst_lo = src_lo - start_xyz[::-1]
    dst_hi = dst_lo + (src_hi - src_lo)
    out[tuple(slice(a, b) for a, b in zip(dst_lo, dst_hi))] = full[
        tuple(slice(a, b) for a, b in zip(src_lo, src_hi))
    ]
    return out


def _choose_slices(area: np.ndarray, n: int, strategy: str) -> tuple[list[int], bool]:
    """Indices into the crop's z axis, kept inside the VOI's slices (clamped: repeats when it is short)."""
    nz_idx = np.flatnonzero(area > 0)
    if nz_idx.size == 0:  # sub-voxel VOI lost in resampling: fall back to the box centre, loudly
        log.warning("VOI vanished on the resampled grid; using the central slice of its box")
        lo = hi = len(area) // 2
        best = lo
    else:
        lo, hi = int(nz_idx[0]), int(nz_idx[-1])
        best = int(np.argmax(area))
    if strategy == "uniform":
        idx = np.round(np.linspace(lo, hi, n)).astype(int)
    else:
        first = best - (n - 1) // 2
        first = max(min(first, hi - n + 1), lo)
        idx = np.clip(first + np.arange(n), lo, hi)
    idx_list = [int(i) for i in idx]
    return idx_list, len(set(idx_list)) < n


def _to_network(
    vol: np.ndarray, voi: np.ndarray, config: PreprocessConfig
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Window, resize and normalise slices [S, y, x] with MONAI array transforms."""
    from monai.transforms import NormalizeIntensity, Resize, ScaleIntensityRange
    from monai.utils import convert_to_numpy

    lo, hi = config.window_mg_ml
    size = (config.size, config.size)
    windowed = ScaleIntensityRange(a_min=lo, a_max=hi, b_min=0.0, b_max=1.0, clip=True)(vol)
    windowed = Resize(size, mode="bilinear", align_corners=False)(windowed)  # slices act as channels
    windowed = np.clip(convert_to_numpy(windowed, dtype=np.float32), 0.0, 1.0)
    mask_r = convert_to_numpy(Resize(size, mode="bilinear", align_corners=False)(voi), dtype=np.float32)
    voi_r = (mask_r >= 0.5).astype(np.uint8)
    source = windowed * voi_r if config.voi_only else windowed
    three = np.repeat(source[None], config.channels, axis=0)  # [3, S, H, W]: channel-first for MONAI
    norm = NormalizeIntensity(
        subtrahend=np.asarray(config.mean, dtype=np.float32),
        divisor=np.asarray(config.std, dtype=np.float32),
        channel_wise=True,
    )(three)
    net = np.ascontiguousarray(convert_to_numpy(norm, dtype=np.float32).transpose(1, 0, 2, 3))
    return windowed.astype(np.float32), voi_r, net
