"""training.synth: study-shaped split, determinism, realistic volumes, documented label effect, manifest."""

from __future__ import annotations

import filecmp
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import SimpleITK as sitk

from core import geometry
from training import synth
from training.cohort import CLINICAL_COLUMNS, COHORTS, load_manifest


def test_default_split_mirrors_the_study() -> None:
    plan = synth.plan_cohort(267, seed=0)
    counts = plan["cohort"].value_counts().to_dict()
    assert counts == {"training": 143, "internal_validation": 60, "external_validation": 64}
    assert set(plan.loc[plan["cohort"] != "external_validation", "centre"]) == {"A"}
    assert plan.loc[plan["cohort"] == "external_validation", "centre"].value_counts().to_dict() == {
        "B": 32,
        "C": 32,
    }
    assert 0.40 <= plan["label"].mean() <= 0.60
    a = plan[plan["centre"] == "A"]
    prev = a.groupby("cohort")["label"].mean()
    assert abs(prev["training"] - prev["internal_validation"]) < 0.02  # stratified
    assert plan["patient_id"].is_unique


def test_cohort_sizes_scale_and_validate() -> None:
    assert synth.cohort_sizes(267) == {
        "A": 203,
        "B": 32,
        "C": 32,
        "training": 143,
        "internal_validation": 60,
        "external_validation": 64,
    }
    small = synth.cohort_sizes(12)
    assert small["training"] + small["internal_validation"] + small["external_validation"] == 12
    assert min(small.values()) >= 1
    with pytest.raises(ValueError, match="n_patients"):
        synth.cohort_sizes(5)


def test_clinical_variables_are_realistic_with_missing_values() -> None:
    plan = synth.plan_cohort(267, seed=0)
    assert plan["age"].between(18, 95).all()
    assert set(plan["sex"]) == {"M", "F"}
    assert set(plan["location"]) == {"cardia", "body", "antrum"}
    assert set(plan["ct_stage"]) <= {"T1", "T2", "T3", "T4"}
    assert set(plan["cn_stage"]) <= {"N0", "N1", "N2", "N3"}
    for column in ("lauren", "differentiation", "cea", "ca199"):
        assert plan[column].isna().any(), column
    assert plan["nic"].between(0.1, 0.9).all()
    # The documented weak clinical shifts point the right way.
    hi, lo = plan[plan["label"] == 1], plan[plan["label"] == 0]
    assert hi["nic"].mean() > lo["nic"].mean()
    assert np.nanmedian(hi["cea"].astype(float)) > np.nanmedian(lo["cea"].astype(float))


@pytest.mark.parametrize("index", [0, 210, 250])  # one patient per centre (A, B, C)
def test_volumes_are_plausible_iodine_maps(index: int) -> None:
    plan = synth.plan_cohort(267, seed=0)
    row = plan.iloc[index].to_dict()
    spec = synth.CENTRES[row["centre"]]
    vol = synth.generate_volume(row, seed=0)
    assert vol.image.dtype == np.float32 and vol.mask.dtype == np.uint8
    assert np.isfinite(vol.image).all()
    assert spec.inplane_mm[0] <= vol.spacing[0] <= spec.inplane_mm[1] and vol.spacing[2] in spec.slice_mm
    assert 96 <= vol.image.shape[1] <= 176 and vol.image.shape[0] >= 8
    assert np.abs(vol.origin).max() > 1.0
    assert (vol.direction[4] == -1.0) == spec.flip_y
    tumour = vol.image[vol.mask > 0]
    assert 1.0 < np.median(tumour) < 4.5
    assert vol.image.max() > 6.0  # vessels
    assert -0.6 < np.median(vol.image[vol.mask == 0]) < 1.0  # mostly fat / water / soft tissue
    img = sitk.GetImageFromArray(vol.image)
    img.SetSpacing(vol.spacing)
    img.SetOrigin(vol.origin)
    img.SetDirection(vol.direction)
    pts = geometry.mask_points(img, vol.mask)
    extent = pts.max(axis=0) - pts.min(axis=0)
    assert 10.0 <= extent.max() <= 75.0  # longest tumour extent in mm


def test_label_effect_raises_heterogeneity_for_the_same_patient() -> None:
    """Same anatomy and noise (same seed), only the latent heterogeneity differs."""
    row = synth.plan_cohort(12, seed=1).iloc[0].to_dict()
    low = synth.generate_volume({**row, "gen_h": -1.5, "gen_necrosis": False}, seed=1)
    high = synth.generate_volume({**row, "gen_h": 3.0, "gen_necrosis": False}, seed=1)
    np.testing.assert_array_equal(low.mask, high.mask)
    p_low = synth.texture_proxy(low.image, low.mask, low.spacing)
    p_high = synth.texture_proxy(high.image, high.mask, high.spacing)
    assert p_high["std"] > 1.2 * p_low["std"]
    assert p_high["highpass_rms"] > p_low["highpass_rms"]


def test_write_cohort_is_deterministic_and_worker_independent(tmp_path: Path) -> None:
    m1 = synth.write_cohort(tmp_path / "a", n_patients=12, seed=7, workers=1)
    m2 = synth.write_cohort(tmp_path / "b", n_patients=12, seed=7, workers=2)
    assert m1.read_bytes() == m2.read_bytes()
    table = pd.read_csv(m1)
    for rel in [*table["image"], *table["mask"]]:
        a = sitk.ReadImage(str(tmp_path / "a" / rel))
        b = sitk.ReadImage(str(tmp_path / "b" / rel))
        np.testing.assert_array_equal(sitk.GetArrayViewFromImage(a), sitk.GetArrayViewFromImage(b))
        assert a.GetOrigin() == b.GetOrigin() and a.GetSpacing() == b.GetSpacing()
    assert filecmp.cmp(tmp_path / "a" / "README.md", tmp_path / "b" / "README.md", shallow=False)
    other = synth.plan_cohort(12, seed=8)
    assert not other.drop(columns=["patient_id"]).equals(
        synth.plan_cohort(12, seed=7).drop(columns=["patient_id"])
    )

    # The manifest is complete, loadable, leaks no hidden generator parameter, and the README warns.
    assert list(table.columns[:6]) == ["patient_id", "centre", "cohort", "image", "mask", "label"]
    assert not [c for c in table.columns if c.startswith("gen_")]
    assert set(CLINICAL_COLUMNS) <= set(table.columns) and list(CLINICAL_COLUMNS) == synth.CLINICAL
    loaded = load_manifest(m1)
    assert set(loaded["cohort"]) <= set(COHORTS) and len(loaded) == 12
    readme = (tmp_path / "a" / "README.md").read_text()
    assert "SYNTHETIC" in readme and "never be used as clinical evidence" in readme
    assert "CPS" in readme and f"HETEROGENEITY_SHIFT` = {synth.HETEROGENEITY_SHIFT!r}" in readme
    img = sitk.ReadImage(str(tmp_path / "a" / table["image"][0]))
    assert img.GetPixelID() == sitk.sitkFloat32 and str(table["image"][0]).endswith(".nii.gz")
