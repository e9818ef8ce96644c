"""Physical-space helpers for SimpleITK images (LPS millimetres, any direction cosines).

Everything that compares or combines volumes goes through physical coordinates, never raw indices, so
that RAS-stored NIfTI files, oblique acquisitions and masks on other grids give the same answer.
Index arrays follow ITK order (x, y, z); numpy arrays from SimpleITK are (z, y, x).
"""

from __future__ import annotations

import itertools
from typing import Any

import numpy as np
import SimpleITK as sitk


def direction_matrix(image: sitk.Image) -> np.ndarray:
    """3×3 direction cosines; column j is the physical direction of index axis j."""
    return np.asarray(image.GetDirection(), dtype=np.float64).reshape(3, 3)


def index_to_physical(image: sitk.Image, index_xyz: np.ndarray) -> np.ndarray:
    """Continuous (x, y, z) indices [N, 3] -> LPS points [N, 3] (vectorised ITK index-to-point)."""
    idx = np.asarray(index_xyz, dtype=np.float64).reshape(-1, 3)
    m = direction_matrix(image) * np.asarray(image.GetSpacing())[None, :]
    return idx @ m.T + np.asarray(image.GetOrigin())[None, :]


def physical_to_index(image: sitk.Image, points: np.ndarray) -> np.ndarray:
    """LPS points [N, 3] -> continuous (x, y, z) indices [N, 3]."""
    pts = np.asarray(points, dtype=np.float64).reshape(-1, 3)
    m = direction_matrix(image) * np.asarray(image.GetSpacing())[None, :]
    return (pts - np.asarray(image.GetOrigin())[None, :]) @ np.linalg.inv(m).T


def corner_points(image: sitk.Image) -> np.ndarray:
    """The 8 outer corners (voxel edges, i.e. ±0.5 voxel beyond the corner centres) in LPS mm [8, 3]."""
    size = np.asarray(image.GetSize(), dtype=np.float64)
    corners = np.array(list(itertools.product(*[(-0.5, s - 0.5) for s in size])))
    return index_to_physical(image, corners)


def physical_extent(image: sitk.Image) -> tuple[np.ndarray, np.ndarray]:
    """Axis-aligned LPS bounding box (min, max) of the region the image covers (voxel edges)."""
    pts = corner_points(image)
    return pts.min(axis=0), pts.max(axis=0)


def voxel_footprint(image: sitk.Image) -> np.ndarray:
    """Half-size [3] of one voxel's axis-aligned LPS box (larger than spacing/2 on oblique grids)."""
    m = direction_matrix(image) * np.asarray(image.GetSpacing())[None, :]
    return 0.5 * np.abs(m).sum(axis=1)


def mask_points(image: sitk.Image, array_zyx: np.ndarray) -> np.ndarray:
    """LPS centres [N, 3] of the non-zero voxels of `array_zyx` (an array on `image`'s grid)."""
    idx_zyx = np.argwhere(array_zyx != 0)
    return index_to_physical(image, idx_zyx[:, ::-1].astype(np.float64))


def same_grid(a: sitk.Image, b: sitk.Image, *, tolerance: float = 1e-2) -> bool:
    """True when the grids coincide to `tolerance` of a voxel (header round-off from editors is tolerated)."""
    if a.GetDimension() != b.GetDimension() or a.GetSize() != b.GetSize():
        return False
    sa, sb = np.asarray(a.GetSpacing()), np.asarray(b.GetSpacing())
    if not np.allclose(sa, sb, rtol=1e-4, atol=0):
        return False
    if np.max(np.abs(np.asarray(a.GetOrigin()) - np.asarray(b.GetOrigin()))) > tolerance * sa.min():
        return False
    return bool(np.allclose(a.GetDirection(), b.GetDirection(), atol=1e-4))


def grid_dict(image: sitk.Image) -> dict[str, Any]:
    """JSON-serialisable description of an image grid (enough to rebuild an empty image on it)."""
    return {
        "size": [int(s) for s in image.GetSize()],
        "origin": [float(v) for v in image.GetOrigin()],
        "spacing": [float(v) for v in image.GetSpacing()],
        "direction": [float(v) for v in image.GetDirection()],
    }


def image_from_grid(grid: dict[str, Any], array_zyx: np.ndarray | None = None) -> sitk.Image:
    """Build a float32 image on a grid described by `grid_dict` (zeros unless `array_zyx` is given)."""
    size = [int(s) for s in grid["size"]]
    if array_zyx is None:
        array_zyx = np.zeros(size[::-1], dtype=np.float32)
    if tuple(array_zyx.shape) != tuple(size[::-1]):
        raise ValueError(f"array shape {array_zyx.shape} does not match grid size (x,y,z)={size}")
    img = sitk.GetImageFromArray(np.ascontiguousarray(array_zyx, dtype=np.float32))
    img.SetOrigin([float(v) for v in grid["origin"]])
    img.SetSpacing([float(v) for v in grid["spacing"]])
    img.SetDirection([float(v) for v in grid["direction"]])
    return img
