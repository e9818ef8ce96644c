"""Preprocessing benchmark: read + resample + crop of a full 512x512x80 .nii.gz volume vs a VOI-sized upload.

    python -m bench.preprocess [--size 512,512,80] [--repeats 5] [--quick] [--out bench/results]

A synthetic iodine map (smooth background, noise, an enhancing tumour; values stored to 0.01 mg/mL as
DECT iodine maps usually are) and its mask are written as .nii.gz, plus a VOI-sized upload: the same
image cropped to the tumour box + ``--upload-margin-mm`` (physical coordinates kept, so preprocessing
sees the same anatomy). Timed interleaved, each through ``core.io.read_pair`` + ``core.preprocessing``:

- ``full, crop_first=True``   (default config: resample only the VOI box of the full volume),
- ``full, crop_first=False``  (resample the whole volume, then crop),
- ``voi upload``              (the small file, default config).

The read and the preprocessing are also timed apart, and the three outputs are compared (max |Δ| of
the network input): the upload path must give the same slices as the full volume.
"""

from __future__ import annotations

import argparse
import logging
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from bench import common

log = logging.getLogger(__name__)

FULL_SIZE = (512, 512, 80)  # x, y, z
SPACING = (0.75, 0.75, 2.5)  # mm: typical abdominal DECT reconstruction
TUMOUR_RADIUS_MM = (18.0, 14.0, 12.0)


def make_volume(size: tuple[int, int, int], spacing: tuple[float, float, float], *, seed: int = 0) -> tuple:
    """(image, mask) SimpleITK images: background + noise + an ellipsoidal enhancing tumour off-centre."""
    import SimpleITK as sitk

    rng = np.random.default_rng(seed)
    nx, ny, nz = size
    z, y, x = np.meshgrid(
        np.arange(nz, dtype=np.float32) * spacing[2],
        np.arange(ny, dtype=np.float32) * spacing[1],
        np.arange(nx, dtype=np.float32) * spacing[0],
        indexing="ij",
    )
    centre = (nx * spacing[0] * 0.6, ny * spacing[1] * 0.45, nz * spacing[2] * 0.5)
    r2 = sum(((a - c) / r) ** 2 for a, c, r in zip((x, y, z), centre, TUMOUR_RADIUS_MM))
    body = 0.3 + 0.2 * np.sin(x / 23.0) * np.cos(y / 31.0)
    vol = body + 2.5 * np.exp(-r2) + rng.normal(0, 0.25, size=body.shape).astype(np.float32)
    vol = np.round(vol, 2).astype(np.float32)  # 0.01 mg/mL storage precision
    image = sitk.GetImageFromArray(vol)
    image.SetSpacing(spacing)
    image.SetOrigin((-100.0, -150.0, -50.0))
    mask = sitk.GetImageFromArray((r2 <= 1.0).astype(np.uint8))
    mask.CopyInformation(image)
    return image, mask


def lattice_step(spacing_in: float, spacing_out: float, most: int = 256) -> int:
    """Smallest k with k * spacing_in a whole number of output voxels (1 when none up to ``most``)."""
    for k in range(1, most + 1):
        ratio = k * spacing_in / spacing_out
        if abs(ratio - round(ratio)) < 1e-6:
            return k
    return 1


def voi_upload(
    image: Any, mask: Any, margin_mm: float, target_spacing: tuple[float, float, float] | None = None
) -> tuple:
    """The image and mask cropped to the mask's bounding box + ``margin_mm`` (origin kept physical).

    Preprocessing anchors its resampling lattice at the image corner, so a crop starting at an arbitrary
    voxel sees a lattice shifted by a fraction of a voxel (slightly different slices). With
    ``target_spacing`` the crop start is moved down to a voxel where the lattices coincide, which makes
    the upload's output directly comparable with the full volume's.
    """
    import SimpleITK as sitk

    idx = np.argwhere(sitk.GetArrayViewFromImage(mask) != 0)  # z, y, x
    lo, hi = idx.min(axis=0)[::-1], idx.max(axis=0)[::-1]  # x, y, z
    pad = np.ceil(margin_mm / np.asarray(image.GetSpacing())).astype(int)
    lo = np.maximum(lo - pad, 0)
    if target_spacing is not None:
        steps = [lattice_step(a, b) for a, b in zip(image.GetSpacing(), target_spacing)]
        lo = np.asarray([(v // k) * k for v, k in zip(lo, steps)])
    hi = np.minimum(hi + pad, np.asarray(image.GetSize()) - 1)
    size = [int(v) for v in hi - lo + 1]
    start = [int(v) for v in lo]
    return sitk.RegionOfInterest(image, size, start), sitk.RegionOfInterest(mask, size, start)


def _write(image: Any, path: Path) -> Path:
    import SimpleITK as sitk

    sitk.WriteImage(image, str(path), useCompression=True)
    return path


def run(
    *,
    size: tuple[int, int, int] = FULL_SIZE,
    spacing: tuple[float, float, float] = SPACING,
    upload_margin_mm: float = 30.0,
    repeats: int = 5,
    budget_s: float = 120.0,
    quick: bool = False,
    out_dir: Path | None = None,
    keep_files: Path | None = None,
) -> dict[str, Any]:
    """Run the benchmark; returns (and writes) the result dict. ``keep_files``: also copy the generated
    full volume and VOI upload there (the service load test reuses the upload)."""
    from core.io import read_pair
    from core.preprocessing import PreprocessConfig, preprocess

    started, machine = common.now(), common.machine_info()
    common.set_threads(None)
    with tempfile.TemporaryDirectory(prefix="pdl1-bench-pre-") as tmp:
        folder = Path(keep_files) if keep_files else Path(tmp)
        folder.mkdir(parents=True, exist_ok=True)
        t0 = time.perf_counter()
        image, mask = make_volume(size, spacing)
        default, full_res = PreprocessConfig(), PreprocessConfig(crop_first=False)
        small_img, small_mask = voi_upload(image, mask, upload_margin_mm, default.spacing_mm)
        files = {
            "full": (_write(image, folder / "full_image.nii.gz"), _write(mask, folder / "full_mask.nii.gz")),
            "voi": (
                _write(small_img, folder / "voi_image.nii.gz"),
                _write(small_mask, folder / "voi_mask.nii.gz"),
            ),
        }
        make_s = time.perf_counter() - t0
        outputs: dict[str, np.ndarray] = {}
        images = {k: read_pair(*v) for k, v in files.items()}  # for the preprocess-only timings

        def end_to_end(key: str, config: PreprocessConfig, name: str) -> Any:
            def fn() -> None:
                outputs[name] = preprocess(*read_pair(*files[key]), config).slices

            return fn

        cands = {
            "full, crop_first=True": end_to_end("full", default, "full_cf"),
            "full, crop_first=False": end_to_end("full", full_res, "full_nocf"),
            "voi upload": end_to_end("voi", default, "voi"),
            "read only: full": lambda: read_pair(*files["full"]),
            "read only: voi upload": lambda: read_pair(*files["voi"]),
            "preprocess only: full, crop_first=True": lambda: preprocess(*images["full"], default),
            "preprocess only: full, crop_first=False": lambda: preprocess(*images["full"], full_res),
            "preprocess only: voi upload": lambda: preprocess(*images["voi"], default),
        }
        load_before = common.load_average()
        times = common.interleaved(
            cands, repeats=repeats, warmup=1, budget_s=budget_s, min_repeats=1 if quick else 2
        )
        sizes = {
            k: {
                "voxels": int(np.prod(images[k][0].GetSize())),
                "shape_xyz": list(images[k][0].GetSize()),
                "file_bytes": sum(p.stat().st_size for p in v),
            }
            for k, v in files.items()
        }
    ref = outputs["full_cf"]
    rows = []
    t_full = float(np.median(times["full, crop_first=True"]))
    for name, ts in times.items():
        med = float(np.median(ts))
        rows.append({"path": name, **common.stats(ts), "speedup_vs_full_crop_first": round(t_full / med, 3)})
    by = {r["path"]: r for r in rows}
    voi_speed = by["voi upload"]["speedup_vs_full_crop_first"]
    voi_vs_nocf = round(
        float(np.median(times["full, crop_first=False"])) / float(np.median(times["voi upload"])), 3
    )
    agreement = {
        "max_abs_diff_full_crop_first_false_vs_true": float(np.max(np.abs(outputs["full_nocf"] - ref))),
        "max_abs_diff_voi_upload_vs_full": float(np.max(np.abs(outputs["voi"] - ref))),
        "output_shape": list(ref.shape),
    }
    result = {
        **common.result_header("preprocess", started, machine),
        "load_average_before_timing": load_before,
        "settings": {
            "full_size_xyz": list(size),
            "spacing_mm": list(spacing),
            "upload_margin_mm": upload_margin_mm,
            "upload_crop": "tumour box + margin, start moved onto the resampling lattice (see voi_upload)",
            "preprocess_config": default.model_dump(mode="json"),
            "repeats": repeats,
            "budget_s": budget_s,
            "timing": "interleaved round-robin, 1 warm-up call each; median reported",
            "quick": quick,
            "volume_generation_s": round(make_s, 2),
        },
        "inputs": sizes,
        "rows": rows,
        "voi_upload_speedup_vs_full_crop_first_false": voi_vs_nocf,
        "agreement": agreement,
        "targets": [
            common.target(
                voi_speed, ">=", 10.0, "VOI upload >= 10x faster than the full volume (crop_first=True)"
            ),
            common.target(
                voi_vs_nocf, ">=", 10.0, "VOI upload >= 10x faster than the full volume (crop_first=False)"
            ),
            common.target(
                agreement["max_abs_diff_voi_upload_vs_full"], "<=", 1e-4, "VOI upload gives the same slices"
            ),
        ],
    }
    _print(result)
    common.write_result("preprocess", result, out_dir)
    return result


def _print(result: dict[str, Any]) -> None:
    m = result["machine"]
    s = result["settings"]
    load = m["load_average_1_5_15"]
    print(f"\nPreprocessing benchmark on {m['cpu_model']} ({m['usable_cpus']} CPUs), load {load}")
    print(f"full volume {s['full_size_xyz']} at {s['spacing_mm']} mm; inputs: {result['inputs']}")
    print(f"{'path':<42} {'median s':>9} {'x full':>8}")
    for r in result["rows"]:
        print(f"{r['path']:<42} {r['median_s']:>9.4f} {r['speedup_vs_full_crop_first']:>8.2f}")
    print(f"agreement: {result['agreement']}")
    common.print_targets(result["targets"])


def main(argv: list[str] | None = None) -> dict[str, Any]:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--size", default=None, help="Full volume x,y,z (default 512,512,80).")
    p.add_argument("--upload-margin-mm", type=float, default=30.0)
    p.add_argument("--repeats", type=int, default=None)
    p.add_argument("--budget-s", type=float, default=None)
    p.add_argument("--quick", action="store_true", help="2 repeats, 30 s budget (same volume size).")
    p.add_argument("--keep-files", type=Path, default=None, help="Keep the generated volumes here.")
    p.add_argument("--out", type=Path, default=None, help="Results folder (default bench/results).")
    a = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    size = tuple(int(v) for v in a.size.split(",")) if a.size else FULL_SIZE
    if len(size) != 3:
        raise SystemExit("--size needs three integers x,y,z")
    return run(
        size=size,  # type: ignore[arg-type]
        upload_margin_mm=a.upload_margin_mm,
        repeats=a.repeats or (2 if a.quick else 5),
        budget_s=a.budget_s or (30.0 if a.quick else 120.0),
        quick=a.quick,
        out_dir=a.out,
        keep_files=a.keep_files,
    )


if __name__ == "__main__":
    main()
