"""Grad-CAM of the full pipeline score, mapped back onto the ORIGINAL image grid, for a synthetic case.

Only the tumour (a textured disc inside a larger VOI box, off the crop centre) carries signal; the head
weights the layer4 channels that respond to it. The map written as NIfTI must share the input's geometry
and peak inside the tumour, in physical coordinates.
"""

from __future__ import annotations

import json
from pathlib import Path

import joblib
import numpy as np
import pytest
import SimpleITK as sitk
import torch
from PIL import Image
from sklearn.linear_model import LogisticRegression
from sklearn.neighbors import KNeighborsClassifier
from sklearn.pipeline import Pipeline
from sklearn.preprocessing import StandardScaler

from core.cam import ABLATION_CAM_LABEL, GRADCAM_LABEL
from core.network import build_extractor, recalibrate_batchnorm
from core.preprocessing import PreprocessConfig, preprocess
from training.explain import cam_panels, select_cam_patients
from training.models import SignatureModel

SHAPE = (8, 64, 64)  # z, y, x voxels
SPACING = (0.8, 0.8, 2.5)
ORIGIN = (-20.0, 30.0, 50.0)
DIRECTION = (1, 0, 0, 0, -1, 0, 0, 0, 1)  # y flipped, as one of the synthetic centres stores it
BOX = (slice(2, 7), slice(8, 56), slice(8, 56))  # the VOI (z, y, x)
RADIUS_VOX = 11  # 8.8 mm = 51 px of the 224 px input: 1.6 layer4 cells (32 px)
# The real input size: at 128 px one layer4 cell is 12 mm here, too coarse to localise an 8.8 mm tumour.
CONFIG = PreprocessConfig(size=224, n_slices=3, margin_mm=0.0, spacing_mm=SPACING)


def volume(cy: int, cx: int, seed: int) -> tuple[sitk.Image, sitk.Image]:
    """Uniform 1.5 mg/mL everywhere; only a disc at (cy, cx) through the VOI slices has texture (same mean,
    SD 1.2 mg/mL), so no intensity step marks the tumour, only its texture."""
    rng = np.random.default_rng(seed)
    arr = np.full(SHAPE, 1.5, np.float32)
    yy, xx = np.mgrid[: SHAPE[1], : SHAPE[2]]
    disc = (yy - cy) ** 2 + (xx - cx) ** 2 <= RADIUS_VOX**2
    for z in range(BOX[0].start, BOX[0].stop):
        arr[z][disc] = 1.5 + rng.normal(0, 1.2, int(disc.sum()))
    mask = np.zeros(SHAPE, np.uint8)
    mask[BOX] = 1
    images = []
    for a in (arr, mask):
        img = sitk.GetImageFromArray(a)
        img.SetSpacing(SPACING)
        img.SetOrigin(ORIGIN)
        img.SetDirection(DIRECTION)
        images.append(img)
    return images[0], images[1]


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory):
    """A run dir with a BN-recalibrated random extractor and heads that respond to the disc texture."""
    torch.manual_seed(0)
    extractor, _ = build_extractor("random", seed=0)
    rng = np.random.default_rng(1)
    train = [preprocess(*volume(*rng.integers(20, 44, 2), seed=i), CONFIG).slices for i in range(4)]
    recalibrate_batchnorm(
        extractor, [torch.from_numpy(np.concatenate(train[:2])), torch.from_numpy(np.concatenate(train[2:]))]
    )
    blob_img, mask = volume(32, 32, seed=99)
    blank = sitk.Image(blob_img) * 0.0 + 1.5
    with torch.inference_mode():
        f_blob = extractor(torch.from_numpy(preprocess(blob_img, mask, CONFIG).slices)).mean(0).numpy()
        f_blank = extractor(torch.from_numpy(preprocess(blank, mask, CONFIG).slices)).mean(0).numpy()
    w = f_blob - f_blank
    idx = np.sort(np.argsort(-w)[:12])
    run = tmp_path_factory.mktemp("cam") / "run"
    (run / "models").mkdir(parents=True)
    torch.save(extractor.state_dict(), run / "models" / "extractor.pt")
    (run / "models" / "extractor.json").write_text(
        json.dumps({"preprocessing": CONFIG.model_dump(mode="json")})
    )
    return run, extractor, idx, w, f_blob, f_blank


def linear_head(idx: np.ndarray, w: np.ndarray, f_blank: np.ndarray) -> SignatureModel:
    scaler = StandardScaler().fit(np.stack([f_blank[idx] - 1, f_blank[idx] + 1]))  # mean = blank, sd = 1
    lr = LogisticRegression()
    lr.coef_, lr.intercept_, lr.classes_ = (
        w[idx][None, :] / np.abs(w[idx]).sum(),
        np.array([0.0]),
        np.array([0, 1]),
    )
    lr.n_features_in_ = idx.size
    return SignatureModel(
        idx, [f"df_{i}" for i in idx], Pipeline([("scaler", scaler), ("clf", lr)]), "lr", 2048
    )


def peak_in_tumour(cam_path: Path, image: sitk.Image, cy: int, cx: int) -> tuple[float, int]:
    cam = sitk.ReadImage(str(cam_path))
    arr = sitk.GetArrayFromImage(cam)
    k, j, i = np.unravel_index(int(arr.argmax()), arr.shape)
    peak = np.array(cam.TransformIndexToPhysicalPoint((int(i), int(j), int(k))))
    centre = np.array(image.TransformIndexToPhysicalPoint((cx, cy, int(k))))
    return float(np.linalg.norm((peak - centre)[:2])), int(k)


@pytest.mark.slow
@pytest.mark.parametrize(("cy", "cx"), [(22, 40), (40, 22)])
def test_gradcam_mapped_back_peaks_inside_the_tumour(setup, tmp_path: Path, cy: int, cx: int) -> None:
    run, _, idx, w, _, f_blank = setup
    joblib.dump(linear_head(idx, w, f_blank), run / "models" / "dfsig.joblib")
    image, mask = volume(cy, cx, seed=5)
    out = tmp_path / "cam"
    written = cam_panels(
        run, [{"image": image, "mask": mask, "patient_id": "P 1/x", "cohort": "training", "label": 1}], out
    )
    assert {p.name for p in written} == {"P_1_x_cam.nii.gz", "P_1_x_overlay.png", "cam_panel.png", "cam.json"}
    cam = sitk.ReadImage(str(out / "P_1_x_cam.nii.gz"))
    assert cam.GetSize() == image.GetSize()
    np.testing.assert_allclose(cam.GetOrigin(), image.GetOrigin())
    np.testing.assert_allclose(cam.GetSpacing(), image.GetSpacing())
    np.testing.assert_allclose(cam.GetDirection(), image.GetDirection())
    arr = sitk.GetArrayFromImage(cam)
    assert 0.9 < arr.max() <= 1.0  # normalised per patient (then bilinear onto the voxel grid)
    assert not arr[: BOX[0].start].any() and not arr[BOX[0].stop :].any()  # nothing outside the VOI slabs
    dist, k = peak_in_tumour(out / "P_1_x_cam.nii.gz", image, cy, cx)
    assert dist <= RADIUS_VOX * SPACING[0], dist
    assert BOX[0].start <= k < BOX[0].stop
    index = json.loads((out / "cam.json").read_text())
    assert index["patients"][0]["method"] == GRADCAM_LABEL
    assert 0.5 < index["patients"][0]["dfsig_probability"] < 1.0  # the tumour raises the score
    for png in ("P_1_x_overlay.png", "cam_panel.png"):
        with Image.open(out / png) as img:
            img.verify()


@pytest.mark.slow
def test_non_differentiable_head_gets_a_labelled_forward_only_cam(setup, tmp_path: Path) -> None:
    run, _, idx, _, f_blob, f_blank = setup
    pipe = Pipeline(
        [("scaler", StandardScaler()), ("clf", KNeighborsClassifier(n_neighbors=2, weights="distance"))]
    )
    pipe.fit(np.stack([f_blank[idx], f_blob[idx]]), [0, 1])
    joblib.dump(
        SignatureModel(idx, [f"df_{i}" for i in idx], pipe, "knn", 2048), run / "models" / "dfsig.joblib"
    )
    image, mask = volume(24, 38, seed=6)
    out = tmp_path / "cam"
    cam_panels(
        run,
        [{"image": image, "mask": mask, "patient_id": "Q", "cohort": "external_validation", "label": 0}],
        out,
    )
    entry = json.loads((out / "cam.json").read_text())["patients"][0]
    assert entry["method"] == ABLATION_CAM_LABEL and "forward-only" in entry["method"]
    arr = sitk.GetArrayFromImage(sitk.ReadImage(str(out / "Q_cam.nii.gz")))
    assert np.isfinite(arr).all() and arr.max() > 0


def test_select_cam_patients_takes_the_most_confident_correct_per_cohort_and_class() -> None:
    ids = ["a", "b", "c", "d", "e", "f"]
    cohorts = ["training"] * 4 + ["external_validation"] * 2
    labels = [1, 1, 0, 0, 1, 0]
    scores = [0.6, 0.9, 0.3, 0.1, 0.7, 0.8]
    rows = select_cam_patients(ids, cohorts, labels, scores, per_group=1)
    assert [ids[r] for r in rows] == ["b", "d", "e", "f"]
