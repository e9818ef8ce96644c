"""`pdl1 preprocess`: write what the network will see for one patient, so a human can check it.

Outputs in `out_dir`: `input.npy` (float32 [S, 3, size, size], the exact network input), `montage.png`
(the chosen windowed slices with the VOI outline) and `preprocess.json` (VOI bounding box and centroid
in LPS mm, chosen slice indices, spacing, crop box, input grid, and the PreprocessConfig used).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import numpy as np

from core.preprocessing import PreprocessConfig, Preprocessed, preprocess_files


def write_preprocess_outputs(
    image_path: str | os.PathLike[str],
    mask_path: str | os.PathLike[str],
    out_dir: str | os.PathLike[str],
    *,
    config: PreprocessConfig,
    label: int | None = None,
) -> dict[str, Any]:
    """Preprocess one pair; write input.npy, montage.png and preprocess.json; return the JSON content."""
    pre = preprocess_files(image_path, mask_path, config, label=label)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    np.save(out / "input.npy", pre.slices)
    write_montage(pre, out / "montage.png")
    info: dict[str, Any] = {
        "image": str(image_path),
        "mask": str(mask_path),
        "label": label,
        "files": {"input": "input.npy", "montage": "montage.png"},
        "input_shape": list(pre.slices.shape),
        "input_dtype": str(pre.slices.dtype),
        **pre.geometry_dict(),
        "preprocess_config": pre.config.model_dump(mode="json"),
    }
    (out / "preprocess.json").write_text(json.dumps(info, indent=2, allow_nan=False), encoding="utf-8")
    return info


def write_montage(pre: Preprocessed, path: Path) -> None:
    """One panel per chosen slice: windowed iodine map (grey) with the VOI outline (red)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n = pre.windowed.shape[0]
    lo, hi = pre.config.window_mg_ml
    fig, axes = plt.subplots(1, n, figsize=(3.2 * n, 3.5), squeeze=False)
    for ax, s in zip(axes[0], range(n)):
        ax.imshow(pre.windowed[s], cmap="gray", vmin=0.0, vmax=1.0, interpolation="bilinear")
        if pre.mask_slices[s].any():
            ax.contour(pre.mask_slices[s], levels=[0.5], colors="red", linewidths=1.0)
        z = pre.geometry.slice_z()[s]
        ax.set_title(f"slice {pre.geometry.slice_indices[s]}  z={z:.1f} mm", fontsize=9)
        ax.axis("off")
    fig.suptitle(f"VOI crop, window {lo:g}-{hi:g} mg/mL (LPS: patient right on image left)", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
