"""SYNTHETIC multicentre dual-energy CT cohort: iodine maps, tumour masks, clinical table, PD-L1 label.

The data are synthetic and must never be used as clinical evidence. They exist so that the pipeline,
tests, demo and benchmarks run without patient data, on a cohort shaped like the study's: 267 patients;
centre A split (stratified on the label) into training 143 and internal validation 60; external
validation 64 from centres B and C.

Generative model (all strengths are module constants below, so they can be tuned and are documented):

* Label: PD-L1 high means combined positive score (CPS) >= 1; drawn per centre with `PREVALENCE`.
* A latent tumour heterogeneity h ~ N(`HETEROGENEITY_SHIFT` * label, 1) per patient. It scales
  (a) the amplitude of fine enhancement texture at a few-mm scale (`TEXTURE_*`), (b) the number of
  hyper-enhancing foci per mL (`FOCI_*`), and (c) the probability of a necrotic low-iodine core
  (`NECROSIS_*`). The tumour mean iodine is higher for PD-L1 high by `MEAN_IODINE_SHIFT` mg/mL, with
  patient-level spread `MEAN_IODINE_SD`. Because h and the mean vary per patient, classes overlap.
* Anatomy (mg/mL): fat/water ~0 with slow variation, solid organs 1.2-2.4, the stomach as a tilted
  elliptic tube with water-filled lumen (~0) and an enhancing wall 3-6 mm thick (1.5-2.2, mucosa up to
  ~3), an aorta (7-11) and small gastric vessels (5-10), and an irregular tumour (longest diameter
  15-60 mm, growing with cT) thickening the gastric wall.
* Scanner, per centre (`CENTRES`): in-plane spacing 0.6-0.9 mm, slice thickness 1-5 mm (the object is
  built on a <= 1.25 mm z grid and averaged over the slice), Gaussian blur (PSF), spatially correlated
  noise, and a calibration gain/offset. Centre C stores volumes with a flipped y axis (as some NIfTI
  converters do), so code that ignores direction cosines fails there. Centre B's thin, noisy slices and
  centre C's thick, blurred slices make the external cohort harder than the internal one.
* Clinical: age, sex, location, Lauren type, differentiation, cT, cN, CEA, CA19-9 and the normalised
  iodine concentration (NIC = tumour / aortic iodine, measured with 6 % error). Poor differentiation,
  CEA and NIC shift weakly with the label (`POOR_DIFFERENTIATION_PROB`, `CEA_LOG_SHIFT`, via the mean
  iodine); Lauren type, CEA, CA19-9 and differentiation have missing values (`MISSING_RATE`).

Determinism: one `numpy.random.Generator` for the cohort plan and one per patient, both derived from
`seed`, so the output does not depend on the number of worker processes. Nothing here computes or
writes a result or metric; `texture_proxy` only returns per-patient statistics for tuning.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from scipy import ndimage

log = logging.getLogger(__name__)

# ------------------------------------------------------------------------------------- cohort structure
#: Study sizes: 267 patients; centre A 203 (training 143 + internal 60); external 64 (centres B, C).
STUDY_N = 267
STUDY_CENTRE_A = 203
STUDY_INTERNAL = 60
#: PD-L1 high (CPS >= 1) prevalence per centre.
PREVALENCE = {"A": 0.50, "B": 0.45, "C": 0.55}

# ----------------------------------------------------------------------------- label -> image strengths
#: Latent heterogeneity h ~ N(HETEROGENEITY_SHIFT * label, 1): no image model can beat an AUC of
#: Phi(shift / sqrt(2)) (0.92 at 2.0). Chosen so that random-weight ResNet-50 features (BN re-estimated)
#: on the VOI-only network input separate the classes clearly but imperfectly; hand-crafted texture
#: statistics inside the mask find the effect somewhat more easily. Lower it for a harder cohort.
HETEROGENEITY_SHIFT = 2.0
#: Fine texture (Gaussian random field, correlation TEXTURE_SCALE_MM): amplitude BASE * exp(GAIN * h), capped.
TEXTURE_BASE_MG_ML = 0.30
TEXTURE_GAIN = 0.65
TEXTURE_MAX_MG_ML = 1.2  # amplitude cap (the most heterogeneous tumours)
TEXTURE_SCALE_MM = 2.5
#: Hyper-enhancing foci per mL of tumour: BASE * exp(GAIN * h); peak +FOCI_AMP_MG_ML, width FOCI_SIGMA_MM.
FOCI_BASE_PER_ML = 1.2
FOCI_GAIN = 0.90
FOCI_AMP_MG_ML = (1.2, 2.6)
FOCI_SIGMA_MM = (1.2, 2.2)
#: Necrotic core probability: logistic(INTERCEPT + H * h + SIZE * (diameter_mm - 30)); core 0.2-0.7 mg/mL.
NECROSIS_INTERCEPT = -1.6
NECROSIS_H = 0.7
NECROSIS_SIZE = 0.05
#: Tumour mean iodine (mg/mL): MEAN_IODINE_BASE + MEAN_IODINE_SHIFT * label + N(0, MEAN_IODINE_SD).
MEAN_IODINE_BASE = 2.4
MEAN_IODINE_SHIFT = 0.25
MEAN_IODINE_SD = 0.45

# ------------------------------------------------------------------------------ label -> clinical shifts
#: P(poorly differentiated) for PD-L1 low, high.
POOR_DIFFERENTIATION_PROB = (0.45, 0.62)
#: log(CEA) shift for PD-L1 high.
CEA_LOG_SHIFT = 0.35
#: NIC measurement error (relative SD).
NIC_ERROR = 0.06
#: Missing-value rate per clinical column.
MISSING_RATE = {"lauren": 0.10, "differentiation": 0.04, "cea": 0.07, "ca199": 0.09}

#: The documented strengths (written into the cohort README).
TUNABLES = (
    "PREVALENCE",
    "HETEROGENEITY_SHIFT",
    "TEXTURE_BASE_MG_ML",
    "TEXTURE_GAIN",
    "TEXTURE_SCALE_MM",
    "TEXTURE_MAX_MG_ML",
    "FOCI_BASE_PER_ML",
    "FOCI_GAIN",
    "FOCI_AMP_MG_ML",
    "FOCI_SIGMA_MM",
    "NECROSIS_INTERCEPT",
    "NECROSIS_H",
    "NECROSIS_SIZE",
    "MEAN_IODINE_BASE",
    "MEAN_IODINE_SHIFT",
    "MEAN_IODINE_SD",
    "POOR_DIFFERENTIATION_PROB",
    "CEA_LOG_SHIFT",
    "NIC_ERROR",
    "MISSING_RATE",
)

# --------------------------------------------------------------------------------------------- volumes
FOV_MM = 96.0  # in-plane field of view around the stomach
Z_EXTENT_MM = 60.0  # slab thickness
FINE_Z_MM = 1.25  # z step of the object before slice averaging


@dataclass(frozen=True)
class Centre:
    """Acquisition and reconstruction of one synthetic centre."""

    inplane_mm: tuple[float, float]  # uniform range of in-plane spacing
    slice_mm: tuple[float, ...]  # slice thicknesses used (chosen uniformly)
    psf_mm: float  # in-plane Gaussian blur sigma
    noise_mg_ml: float  # noise SD per voxel
    noise_corr_mm: float  # in-plane noise correlation (Gaussian sigma)
    gain: float  # iodine calibration gain
    offset_mg_ml: float  # iodine calibration offset
    flip_y: bool = False  # store with direction diag(1, -1, 1)


_A = Centre(
    (0.68, 0.78), (2.0, 2.5), psf_mm=0.60, noise_mg_ml=0.30, noise_corr_mm=0.40, gain=1.0, offset_mg_ml=0.0
)
_B = Centre(
    (0.60, 0.68), (1.0, 1.25), psf_mm=0.50, noise_mg_ml=0.36, noise_corr_mm=0.35, gain=1.04, offset_mg_ml=0.05
)
_C = Centre(
    (0.80, 0.90), (3.0, 5.0), psf_mm=0.65, noise_mg_ml=0.26, noise_corr_mm=0.50, gain=0.96, offset_mg_ml=-0.05
)
#: Per-centre scanner models. Noise scales roughly with 1/sqrt(slice thickness); centre C is stored y-flipped.
CENTRES: dict[str, Centre] = {"A": _A, "B": _B, "C": Centre(**{**_C.__dict__, "flip_y": True})}

#: Clinical manifest columns (types in training.cohort.CLINICAL_COLUMNS, which must list the same names).
CLINICAL = [
    "age",
    "sex",
    "location",
    "lauren",
    "differentiation",
    "ct_stage",
    "cn_stage",
    "cea",
    "ca199",
    "nic",
]


# -------------------------------------------------------------------------------------------- the plan


def cohort_sizes(n_patients: int = STUDY_N) -> dict[str, int]:
    """Patients per centre and cohort, scaled from the study's 267 (143 / 60 / 64)."""
    if n_patients < 12:
        raise ValueError(f"n_patients must be >= 12, got {n_patients}")
    n_a = round(n_patients * STUDY_CENTRE_A / STUDY_N)
    n_internal = round(n_patients * STUDY_INTERNAL / STUDY_N)
    n_b = (n_patients - n_a) // 2
    return {
        "A": n_a,
        "B": n_b,
        "C": n_patients - n_a - n_b,
        "training": n_a - n_internal,
        "internal_validation": n_internal,
        "external_validation": n_patients - n_a,
    }


def plan_cohort(n_patients: int = STUDY_N, seed: int = 0) -> pd.DataFrame:
    """Every patient-level quantity (label, clinical, acquisition, hidden generative parameters), no voxels.

    Columns starting with `gen_` are hidden generator parameters: they are never written to the manifest.
    """
    from sklearn.model_selection import train_test_split

    sizes = cohort_sizes(n_patients)
    rng = np.random.default_rng(np.random.SeedSequence([seed, 0]))
    centres = ["A"] * sizes["A"] + ["B"] * sizes["B"] + ["C"] * sizes["C"]
    rows = [_plan_patient(i, c, rng) for i, c in enumerate(centres)]
    plan = pd.DataFrame(rows)
    plan.insert(0, "patient_id", [f"SYN{i + 1:04d}" for i in range(n_patients)])
    a_idx = np.flatnonzero(plan["centre"].to_numpy() == "A")
    labels_a = plan["label"].to_numpy()[a_idx]
    try:
        _, internal = train_test_split(
            a_idx, test_size=sizes["internal_validation"], stratify=labels_a, random_state=seed
        )
    except ValueError as exc:  # a class too small to stratify (tiny test cohorts only)
        log.warning("stratified split impossible (%s); using an unstratified seeded split", exc)
        _, internal = train_test_split(a_idx, test_size=sizes["internal_validation"], random_state=seed)
    cohort = np.where(plan["centre"] == "A", "training", "external_validation").astype(object)
    cohort[internal] = "internal_validation"
    plan.insert(2, "cohort", cohort)
    return plan


def _plan_patient(i: int, centre: str, rng: np.random.Generator) -> dict[str, Any]:
    spec = CENTRES[centre]
    label = int(rng.random() < PREVALENCE[centre])
    h = rng.normal(HETEROGENEITY_SHIFT * label, 1.0)
    ct = rng.choice(["T1", "T2", "T3", "T4"], p=[0.08, 0.17, 0.40, 0.35])
    diameter = float(np.clip({"T1": 18, "T2": 25, "T3": 33, "T4": 42}[ct] * rng.lognormal(0, 0.25), 15, 60))
    n_pos = {"T1": 0.25, "T2": 0.45, "T3": 0.65, "T4": 0.80}[ct]
    cn = "N0" if rng.random() > n_pos else rng.choice(["N1", "N2", "N3"], p=[0.40, 0.35, 0.25])
    poor = rng.random() < POOR_DIFFERENTIATION_PROB[label]
    differentiation = "poor" if poor else rng.choice(["well", "moderate"], p=[0.25, 0.75])
    mean_iodine = float(
        np.clip(MEAN_IODINE_BASE + MEAN_IODINE_SHIFT * label + rng.normal(0, MEAN_IODINE_SD), 1.5, 4.5)
    )
    aorta = float(rng.uniform(7.0, 11.0))
    necrosis_p = 1 / (1 + np.exp(-(NECROSIS_INTERCEPT + NECROSIS_H * h + NECROSIS_SIZE * (diameter - 30))))
    row: dict[str, Any] = {
        "centre": centre,
        "label": label,
        "age": int(np.clip(np.round(rng.normal(61, 10.5)), 28, 88)),
        "sex": "M" if rng.random() < 0.70 else "F",
        "location": rng.choice(["cardia", "body", "antrum"], p=[0.28, 0.34, 0.38]),
        "lauren": rng.choice(["intestinal", "diffuse", "mixed"], p=[0.48, 0.34, 0.18]),
        "differentiation": differentiation,
        "ct_stage": ct,
        "cn_stage": cn,
        "cea": float(
            np.round(np.exp(rng.normal(np.log(2.6) + CEA_LOG_SHIFT * label + 0.15 * (ct == "T4"), 0.95)), 2)
        ),
        "ca199": float(np.round(np.exp(rng.normal(np.log(14.0) + 0.1 * label, 1.1)), 1)),
        "nic": float(np.round(mean_iodine / aorta * (1 + rng.normal(0, NIC_ERROR)), 3)),
        "gen_index": i,
        "gen_h": float(h),
        "gen_diameter_mm": diameter,
        "gen_thickness_mm": float(np.clip(0.3 * diameter + rng.normal(0, 2.5), 8, 20)),
        "gen_mean_iodine": mean_iodine,
        "gen_aorta": aorta,
        "gen_necrosis": bool(rng.random() < necrosis_p),
        "gen_spacing_xy": float(rng.uniform(*spec.inplane_mm)),
        "gen_spacing_z": float(rng.choice(spec.slice_mm)),
        "gen_noise_factor": float(rng.uniform(0.85, 1.15)),
    }
    for column, rate in MISSING_RATE.items():
        if rng.random() < rate:
            row[column] = None
    return row


# ------------------------------------------------------------------------------------------- one volume


@dataclass(frozen=True)
class SyntheticVolume:
    image: np.ndarray  # float32 (z, y, x), mg/mL
    mask: np.ndarray  # uint8 (z, y, x)
    spacing: tuple[float, float, float]
    origin: tuple[float, float, float]
    direction: tuple[float, ...]


def generate_volume(params: dict[str, Any], seed: int) -> SyntheticVolume:
    """Build one patient's iodine map and mask from its plan row (deterministic in (seed, gen_index))."""
    rng = np.random.default_rng(np.random.SeedSequence([seed, int(params["gen_index"]) + 1]))
    spec = CENTRES[params["centre"]]
    sxy, sz = float(params["gen_spacing_xy"]), float(params["gen_spacing_z"])
    n_xy = int(np.clip(round(FOV_MM / sxy), 96, 176))
    nz = max(round(Z_EXTENT_MM / sz), 8)
    sub = int(np.ceil(sz / FINE_Z_MM - 1e-6))
    dzf = sz / sub
    flip = -1.0 if spec.flip_y else 1.0
    # Local LPS coordinates (mm, relative to the slab centre) of the fine grid, per axis.
    x = ((np.arange(n_xy) - (n_xy - 1) / 2) * sxy).astype(np.float32)
    y = ((np.arange(n_xy) - (n_xy - 1) / 2) * sxy * flip).astype(np.float32)
    z = ((np.arange(nz * sub) - (nz * sub - 1) / 2) * dzf).astype(np.float32)
    step = np.array([dzf, sxy, sxy])

    obj, anatomy = _anatomy(x, y, z, float(params["gen_aorta"]), rng)
    tumour = _tumour(obj, x, y, z, step, anatomy, params, rng)

    # Scanner: PSF, slice averaging, calibration, correlated noise.
    obj = ndimage.gaussian_filter(obj, sigma=(0.6 / dzf, spec.psf_mm / sxy, spec.psf_mm / sxy), truncate=3.0)
    img = obj.reshape(nz, sub, n_xy, n_xy).mean(axis=1)
    mask = (tumour.reshape(nz, sub, n_xy, n_xy).mean(axis=1, dtype=np.float32) >= 0.5).astype(np.uint8)
    img = spec.gain * img + spec.offset_mg_ml
    noise = ndimage.gaussian_filter(
        rng.standard_normal(img.shape, dtype=np.float32),
        sigma=(0, spec.noise_corr_mm / sxy, spec.noise_corr_mm / sxy),
    )
    noise *= spec.noise_mg_ml * float(params["gen_noise_factor"]) / float(noise.std())
    img = _quantise((img + noise).astype(np.float32))

    centre_lps = np.array([rng.uniform(-20, 40), rng.uniform(-60, 20), rng.uniform(-250, 50)])
    direction = (1.0, 0.0, 0.0, 0.0, flip, 0.0, 0.0, 0.0, 1.0)
    origin = centre_lps + np.array([x[0], y[0], -(nz - 1) / 2 * sz])
    return SyntheticVolume(img, mask, (sxy, sxy, sz), tuple(float(v) for v in origin), direction)


def _smooth_field(shape: tuple[int, ...], sigma_vox: Sequence[float], rng: np.random.Generator) -> np.ndarray:
    """Unit-variance Gaussian random field (white noise blurred by `sigma_vox`)."""
    f = ndimage.gaussian_filter(rng.standard_normal(shape, dtype=np.float32), sigma=sigma_vox, truncate=3.0)
    return f / max(float(f.std()), 1e-6)


def _low_freq(shape: tuple[int, ...], coarse: int, rng: np.random.Generator) -> np.ndarray:
    """Slow, roughly unit-variance variation: two coarse 2-D fields upsampled, blended linearly along z."""
    planes = []
    for _ in range(2):
        c = rng.standard_normal((coarse, coarse)).astype(np.float32)
        planes.append(ndimage.zoom(c, [shape[1] / coarse, shape[2] / coarse], order=1))
    t = np.linspace(0.0, 1.0, shape[0], dtype=np.float32)[:, None, None]
    return ((1 - t) * planes[0][None] + t * planes[1][None]) / np.float32(np.sqrt(0.5))


def _anatomy(
    x: np.ndarray, y: np.ndarray, z: np.ndarray, aorta: float, rng: np.random.Generator
) -> tuple[np.ndarray, dict[str, Any]]:
    """Fat background, organs, stomach (lumen + wall) and vessels on the fine grid (z, y, x)."""
    Z, Y, X = z[:, None, None], y[None, :, None], x[None, None, :]
    shape = (len(z), len(y), len(x))
    obj = (rng.normal(-0.05, 0.05) + 0.12 * _low_freq(shape, 6, rng)).astype(np.float32)

    # Stomach: elliptic tube along a tilted axis u; cross-section axes e1, e2.
    tilt, az = np.deg2rad(rng.uniform(0, 20)), rng.uniform(0, 2 * np.pi)
    u = np.array([np.sin(tilt) * np.cos(az), np.sin(tilt) * np.sin(az), np.cos(tilt)])
    e1 = np.cross(u, [0.0, 1.0, 0.0])
    e1 /= np.linalg.norm(e1)
    e2 = np.cross(u, e1)
    c0 = np.array([rng.uniform(-4, 6), rng.uniform(-8, 2), 0.0])
    a, b = rng.uniform(20, 28), rng.uniform(20, 28)
    wall = rng.uniform(3.0, 6.0)
    anatomy = {"u": u, "e1": e1, "e2": e2, "c0": c0, "a": a, "b": b, "wall": wall}

    # Organs (liver-, spleen-, pancreas-like ellipsoids) outside the stomach.
    for angle, radii, value in [
        (rng.uniform(200, 240), (rng.uniform(35, 50), rng.uniform(30, 45), 80.0), rng.uniform(1.6, 2.2)),
        (rng.uniform(20, 60), (rng.uniform(18, 26), rng.uniform(14, 20), 60.0), rng.uniform(1.8, 2.4)),
        (rng.uniform(100, 140), (rng.uniform(20, 30), rng.uniform(8, 12), 40.0), rng.uniform(1.2, 2.0)),
    ]:
        d = np.array([np.cos(np.deg2rad(angle)), np.sin(np.deg2rad(angle)), 0.0])
        centre = c0 + d * (max(a, b) + wall + rng.uniform(4, 10) + radii[0] * 0.9)
        inside = (
            ((X - centre[0]) / radii[0]) ** 2
            + ((Y - centre[1]) / radii[1]) ** 2
            + ((Z - centre[2]) / radii[2]) ** 2
        )
        obj = np.where(inside <= 1.0, np.float32(value) + 0.1 * obj, obj)

    q1 = (X - c0[0]) * e1[0] + (Y - c0[1]) * e1[1] + (Z - c0[2]) * e1[2]
    q2 = (X - c0[0]) * e2[0] + (Y - c0[1]) * e2[1] + (Z - c0[2]) * e2[2]
    r_ell = np.sqrt((q1 / a) ** 2 + (q2 / b) ** 2)
    dist = (r_ell - 1.0) * np.float32((a + b) / 2)  # ~signed distance (mm) to the lumen surface
    wall_base, mucosa = rng.uniform(1.5, 2.2), rng.uniform(0.5, 0.9)
    wall_val = wall_base + mucosa * np.exp(-np.maximum(dist, 0) / 1.2)
    lumen_val = rng.uniform(-0.05, 0.15)
    obj = np.where(dist < 0, np.float32(lumen_val) + 0.3 * (obj - obj.mean()), obj)
    obj = np.where((dist >= 0) & (dist < wall), wall_val, obj).astype(np.float32)
    del q1, q2, r_ell, dist, wall_val

    # Vessels: aorta posterior-right of the stomach, small gastric vessels near the wall.
    outer = max(a, b) + wall
    vessels = [(rng.uniform(120, 150), outer + rng.uniform(3, 6), rng.uniform(8.0, 11.0), aorta)]
    for _ in range(int(rng.integers(2, 5))):
        vessels.append(
            (rng.uniform(0, 360), outer + rng.uniform(2, 7), rng.uniform(1.5, 3.0), rng.uniform(5.0, 10.0))
        )
    for angle_deg, dist_c, radius, value in vessels:
        d = np.array([np.cos(np.deg2rad(angle_deg)), np.sin(np.deg2rad(angle_deg)), 0.0])
        p0 = c0 + d * (dist_c + radius)
        slope = rng.uniform(-0.25, 0.25, size=2)
        cx = p0[0] + slope[0] * z
        cy = p0[1] + slope[1] * z
        obj[(X - cx[:, None, None]) ** 2 + (Y - cy[:, None, None]) ** 2 <= radius**2] = value
    return obj, anatomy


def _tumour(
    obj: np.ndarray,
    x: np.ndarray,
    y: np.ndarray,
    z: np.ndarray,
    step: np.ndarray,
    anatomy: dict[str, Any],
    params: dict[str, Any],
    rng: np.random.Generator,
) -> np.ndarray:
    """Paint the tumour into `obj` (in place); return its indicator on the fine grid."""
    u, e1, e2, c0 = anatomy["u"], anatomy["e1"], anatomy["e2"], anatomy["c0"]
    a, b, wall = anatomy["a"], anatomy["b"], anatomy["wall"]
    diameter, thickness = float(params["gen_diameter_mm"]), float(params["gen_thickness_mm"])
    half_z = diameter / 2 * rng.uniform(0.55, 0.95)
    theta = rng.uniform(0, 2 * np.pi)
    rho = float(np.hypot(a * np.cos(theta), b * np.sin(theta)))
    offset = rng.uniform(-2.0, 3.0) + wall / 2  # tumour centre relative to the lumen surface (mm)
    z_c = (
        rng.uniform(-(Z_EXTENT_MM / 2 - half_z - 4), Z_EXTENT_MM / 2 - half_z - 4)
        if half_z + 4 < Z_EXTENT_MM / 2
        else 0.0
    )
    wall_pt = c0 + (a * np.cos(theta) * e1 + b * np.sin(theta) * e2) + u * z_c
    reach = max(diameter / 2, half_z, thickness) * 1.35 + 5.0
    # Axes may be decreasing (flipped y): build index slices from the actual coordinate order.
    sl = []
    for k, ax in _axes(x, y, z):
        idx = np.flatnonzero(np.abs(ax - wall_pt[k]) <= reach)
        sl.append(slice(int(idx[0]), int(idx[-1]) + 1) if idx.size else slice(0, 0))
    zs, ys, xs = z[sl[2]][:, None, None], y[sl[1]][None, :, None], x[sl[0]][None, None, :]
    shape = (len(z[sl[2]]), len(y[sl[1]]), len(x[sl[0]]))
    q1 = (xs - c0[0]) * e1[0] + (ys - c0[1]) * e1[1] + (zs - c0[2]) * e1[2]
    q2 = (xs - c0[0]) * e2[0] + (ys - c0[1]) * e2[1] + (zs - c0[2]) * e2[2]
    qa = (xs - c0[0]) * u[0] + (ys - c0[1]) * u[1] + (zs - c0[2]) * u[2] - z_c
    r_ell = np.sqrt((q1 / a) ** 2 + (q2 / b) ** 2)
    phi = np.arctan2(q2 / b, q1 / a)
    arc = rho * np.angle(np.exp(1j * (phi - theta)))
    dist = (r_ell - 1.0) * np.float32(rho)
    sig = (4.0 / step).tolist()
    f = (arc / (diameter / 2)) ** 2 + ((dist - offset) / (thickness / 2)) ** 2 + (qa / half_z) ** 2
    f_irr = (f + 0.30 * _smooth_field(shape, sig, rng)).astype(np.float32)
    inside = f_irr < 1.0
    labelled, n = ndimage.label(inside)
    if n > 1:
        sizes = ndimage.sum(inside, labelled, range(1, n + 1))
        inside = labelled == (1 + int(np.argmax(sizes)))
    if not inside.any():
        raise RuntimeError("synthetic tumour vanished; widen its size range")

    # Intensity: mean + slow variation + label-driven fine texture, foci and necrosis.
    h = float(params["gen_h"])
    vox_ml = float(np.prod(step)) / 1000.0
    val = float(params["gen_mean_iodine"]) + 0.2 * _low_freq(shape, 4, rng)
    tex_amp = min(TEXTURE_BASE_MG_ML * np.exp(TEXTURE_GAIN * h), TEXTURE_MAX_MG_ML)
    val += tex_amp * _smooth_field(shape, (TEXTURE_SCALE_MM / step).tolist(), rng)
    n_foci = rng.poisson(FOCI_BASE_PER_ML * np.exp(FOCI_GAIN * h) * inside.sum() * vox_ml)
    if n_foci:
        sigma_mm = rng.uniform(*FOCI_SIGMA_MM)
        impulses = np.zeros(shape, np.float32)
        cand = np.flatnonzero(inside.ravel())
        picks = rng.choice(cand, size=int(n_foci), replace=True)
        np.add.at(impulses.ravel(), picks, rng.uniform(*FOCI_AMP_MG_ML, size=int(n_foci)).astype(np.float32))
        sig_vox = sigma_mm / step
        peak = 1.0 / ((2 * np.pi) ** 1.5 * float(np.prod(sig_vox)))
        val += ndimage.gaussian_filter(impulses, sigma=sig_vox.tolist(), truncate=3.0) / peak
    if params["gen_necrosis"]:
        core = rng.uniform(0.15, 0.40)
        f_core = f + 0.25 * _smooth_field(shape, sig, rng)
        w = np.clip((core - f_core) / 0.12, 0.0, 1.0)
        val = val * (1 - w) + rng.uniform(0.2, 0.7) * w
    sub = obj[sl[2], sl[1], sl[0]]
    sub[inside] = val[inside]
    tumour = np.zeros(obj.shape, np.float32)
    tumour[sl[2], sl[1], sl[0]] = inside
    return tumour


def _axes(x: np.ndarray, y: np.ndarray, z: np.ndarray) -> list[tuple[int, np.ndarray]]:
    return [(0, x), (1, y), (2, z)]


def _quantise(a: np.ndarray) -> np.ndarray:
    """Round float32 to 11 mantissa bits (relative 5e-4, far below noise) so gzip compresses ~2x better."""
    bits = a.view(np.uint32)
    return ((bits + np.uint32(0x800)) & np.uint32(0xFFFFF000)).view(np.float32)


# ---------------------------------------------------------------------------------------------- writing


def _write_one(args: tuple[dict[str, Any], str, int]) -> str:
    import SimpleITK as sitk

    params, out, seed = args
    vol = generate_volume(params, seed)
    for array, rel in ((vol.image, params["image"]), (vol.mask, params["mask"])):
        img = sitk.GetImageFromArray(array)
        img.SetSpacing(vol.spacing)
        img.SetOrigin(vol.origin)
        img.SetDirection(vol.direction)
        sitk.WriteImage(img, str(Path(out) / rel), useCompression=True, compressionLevel=6)
    return params["patient_id"]


def write_cohort(
    out: str | os.PathLike[str], *, n_patients: int = STUDY_N, seed: int = 0, workers: int | None = None
) -> Path:
    """Write the SYNTHETIC cohort (images/, masks/, manifest.csv, README.md); return the manifest path."""
    out = Path(out)
    (out / "images").mkdir(parents=True, exist_ok=True)
    (out / "masks").mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    plan = plan_cohort(n_patients, seed)
    plan["image"] = [f"images/{p}_iodine.nii.gz" for p in plan["patient_id"]]
    plan["mask"] = [f"masks/{p}_mask.nii.gz" for p in plan["patient_id"]]
    jobs = [(row, str(out), seed) for row in plan.to_dict(orient="records")]
    workers = workers if workers is not None else min(2, os.cpu_count() or 1)
    if workers > 1:
        with ProcessPoolExecutor(max_workers=workers) as pool:
            list(pool.map(_write_one, jobs, chunksize=4))
    else:
        for job in jobs:
            _write_one(job)
    manifest = out / "manifest.csv"
    columns = ["patient_id", "centre", "cohort", "image", "mask", "label", *CLINICAL]
    plan[columns].to_csv(manifest, index=False)
    (out / "README.md").write_text(_readme(plan, seed), encoding="utf-8")
    log.info("synthetic cohort: %d patients in %.1f s -> %s", n_patients, time.perf_counter() - t0, out)
    return manifest


def _readme(plan: pd.DataFrame, seed: int) -> str:
    counts = plan.groupby(["cohort", "centre"]).size().to_dict()
    lines = [
        "# SYNTHETIC DECT cohort — NOT PATIENT DATA",
        "",
        "**These data are synthetic. They must never be used as clinical evidence**, to validate a clinical",
        "claim, or to estimate how any model would perform on real patients. They were generated by",
        f"`training.synth` (seed {seed}) only to exercise the software.",
        "",
        "## Contents",
        "",
        "- `images/*_iodine.nii.gz`: iodine-density maps (mg/mL, float32, LPS geometry;",
        "  centre C is stored y-flipped).",
        "- `masks/*_mask.nii.gz`: binary tumour VOI masks on the image grids.",
        "- `manifest.csv`: patient_id, centre, cohort (training / internal_validation /",
        "  external_validation), image, mask (paths relative to the manifest), label, and the clinical",
        "  columns (an empty cell is a missing value).",
        "",
        "Label: 1 = PD-L1 high, defined as combined positive score (CPS) >= 1; 0 = PD-L1 low (CPS < 1).",
        "",
        "Patients per (cohort, centre): "
        + ", ".join(f"{k[0]}/{k[1]}: {v}" for k, v in sorted(counts.items())),
        "",
        "## Generative model",
        "",
        (__doc__ or "")
        .split("Generative model", 1)[-1]
        .split("\n", 1)[-1]
        .split("Determinism", 1)[0]
        .strip(),
        "",
        "Strengths used:",
        "",
    ]
    for name in TUNABLES:
        lines.append(f"- `{name}` = {globals()[name]!r}")
    lines += ["", "Centres:", ""]
    lines += [f"- {k}: {v}" for k, v in CENTRES.items()]
    return "\n".join(lines) + "\n"


# ------------------------------------------------------------------------------------------ tuning aid


def texture_proxy(
    image: np.ndarray,
    mask: np.ndarray,
    spacing: Sequence[float],
    *,
    resample_to: Sequence[float] | None = (0.8, 0.8, 2.5),
) -> dict[str, float]:
    """Simple per-patient texture statistics inside the mask (for tuning the generator, not a model).

    `image`, `mask` are (z, y, x) arrays with (x, y, z) `spacing` in mm. By default both are first
    resampled (anti-aliased linear / nearest) to the preprocessing spacing, as the network sees them.
    """
    if resample_to is not None:
        zoom = [s / t for s, t in zip(spacing[::-1], resample_to[::-1])]
        sigma = [max(1 / z - 1, 0) / 2 for z in zoom]
        image = ndimage.zoom(
            ndimage.gaussian_filter(image, sigma, mode="nearest", truncate=3.0), zoom, order=1
        )
        mask = ndimage.zoom(mask, zoom, order=0)
        spacing = resample_to
    m = mask.astype(bool)
    v = image[m]
    sig = [2.0 / s for s in spacing[::-1]]
    high = image - ndimage.gaussian_filter(image, sigma=[0, sig[1], sig[2]])
    return {
        "mean": float(v.mean()),
        "std": float(v.std()),
        "p10": float(np.percentile(v, 10)),
        "p90": float(np.percentile(v, 90)),
        "highpass_rms": float(np.sqrt((high[m] ** 2).mean())),
        "hot_fraction": float((v > np.median(v) + 1.5).mean()),
        "volume_ml": float(m.sum() * np.prod(spacing) / 1000),
    }
