"""Grad-CAM panels of the full DFSigM pipeline score, mapped back onto each patient's original image grid.

The score is the whole pipeline from pixels to the head: ResNet-50 -> per-slice GAP -> mean over the
patient's slices -> selected features -> StandardScaler -> classifier. For linear heads it is the
positive-class logit (differentiable, :class:`core.cam.GradCAM` on layer4); other scikit-learn heads are
not differentiable, so they get the forward-only :func:`core.cam.ablation_cam` on the probability, and
every output says which method made it. Maps are min-max normalised per patient (keeps the relative
strength of the slices), upsampled with stride alignment, then mapped onto the input grid with
:meth:`core.preprocessing.Preprocessed.map_to_image` and written as NIfTI with the input's geometry.
"""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import joblib
import numpy as np
import SimpleITK as sitk
import torch

from core.cam import ABLATION_CAM_LABEL, GRADCAM_LABEL, GradCAM, ablation_cam, linear_head_score
from core.errors import InputError
from core.files import atomic_path
from core.network import ResNet50Extractor
from core.preprocessing import PreprocessConfig, Preprocessed, preprocess
from training.artifacts import write_json, write_with
from training.models import SignatureModel

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class PatientCam:
    """One patient's CAM on the network input ([S, size, size], normalised to [0, 1] over the patient)."""

    patient_id: str
    cohort: str
    label: int | None
    score: float  # DFSigM probability of the positive class
    method: str
    maps: np.ndarray
    raw_max: float  # before normalisation; 0 means the score gained nothing from any location
    pre: Preprocessed


def load_cam_model(
    run_dir: Path, preprocess_config: PreprocessConfig | None = None
) -> tuple[ResNet50Extractor, SignatureModel, PreprocessConfig]:
    """The run's extractor (``models/extractor.pt``), head (``models/dfsig.joblib``) and preprocessing.

    The preprocessing is the one recorded in ``models/extractor.json`` (what the features were made with);
    ``preprocess_config`` is used only when the run does not record one.
    """
    models = Path(run_dir) / "models"
    for name in ("extractor.pt", "dfsig.joblib"):
        if not (models / name).is_file():
            raise InputError("missing; run the study first", source=str(models / name))
    extractor = ResNet50Extractor()
    state = torch.load(models / "extractor.pt", map_location="cpu", weights_only=True)
    extractor.load_state_dict(state)
    extractor.eval()
    model = joblib.load(models / "dfsig.joblib")
    if not isinstance(model, SignatureModel):
        raise InputError(f"expected a SignatureModel, got {type(model).__name__}", source=str(models))
    recorded = models / "extractor.json"
    if recorded.is_file() and "preprocessing" in (meta := json.loads(recorded.read_text())):
        config = PreprocessConfig.model_validate(meta["preprocessing"])
    elif preprocess_config is not None:
        log.warning("%s records no preprocessing; using the study config's", recorded)
        config = preprocess_config
    else:
        raise InputError("no preprocessing recorded and none given", source=str(recorded))
    return extractor, model, config


def head_score(model: SignatureModel, extractor: ResNet50Extractor, slices: np.ndarray) -> float:
    """DFSigM probability for one patient's network input ``[S,3,H,W]``."""
    with torch.inference_mode():
        features = extractor(torch.as_tensor(slices, dtype=torch.float32)).mean(dim=0, keepdim=True)
    return float(model.predict_proba_full(features.numpy())[0])


def patient_cam(
    extractor: ResNet50Extractor, model: SignatureModel, pre: Preprocessed
) -> tuple[np.ndarray, str]:
    """Unnormalised CAM ``[S, size, size]`` of the pipeline score and the method's label."""
    x = pre.slices[None]
    size = (pre.config.size, pre.config.size)
    if model.is_linear:
        coef, intercept = model.linear_coef("scaled")
        scaler = model.pipeline[0]
        score = linear_head_score(
            model.feature_indices, coef, intercept, mean=scaler.mean_, scale=scaler.scale_
        )
        with GradCAM(extractor) as cam:
            return cam(x, score, size=size)[0], GRADCAM_LABEL

    def probability(features: np.ndarray) -> np.ndarray:
        return model.predict_proba_full(features)

    return ablation_cam(extractor, x, probability, size=size)[0], ABLATION_CAM_LABEL


def safe_name(patient_id: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", str(patient_id)) or "patient"


def write_nifti(image: sitk.Image, target: Path) -> Path:
    """Compressed NIfTI, written atomically (ITK's NIfTI writer needs the .nii.gz suffix on the temp file)."""
    with atomic_path(target, suffix=".tmp.nii.gz") as tmp:
        sitk.WriteImage(image, str(tmp), useCompression=True)
    return Path(target)


def _load_pair(patient: Mapping[str, Any]) -> tuple[sitk.Image, sitk.Image]:
    image, mask = patient["image"], patient["mask"]
    if isinstance(image, sitk.Image) and isinstance(mask, sitk.Image):
        return image, mask
    from core.io import read_pair

    return read_pair(Path(image), Path(mask))


def compute_patient_cam(
    extractor: ResNet50Extractor, model: SignatureModel, config: PreprocessConfig, patient: Mapping[str, Any]
) -> PatientCam:
    """Preprocess one patient (``image``/``mask`` paths or SimpleITK images) and compute its CAM."""
    image, mask = _load_pair(patient)
    pre = preprocess(image, mask, config)
    raw, method = patient_cam(extractor, model, pre)
    top = float(raw.max(initial=0.0))
    lo = float(raw.min(initial=0.0))
    maps = (raw - lo) / (top - lo) if top > lo else np.zeros_like(raw)
    if top <= 0:
        log.warning("CAM of %s is zero everywhere (no location raised the score)", patient.get("patient_id"))
    label = patient.get("label")
    return PatientCam(
        patient_id=str(patient.get("patient_id", "patient")),
        cohort=str(patient.get("cohort", "")),
        label=None if label is None else int(label),
        score=head_score(model, extractor, pre.slices),
        method=method,
        maps=maps.astype(np.float32),
        raw_max=top,
        pre=pre,
    )


# --------------------------------------------------------------------------------------------- drawing


def _overlay(ax: Any, pre: Preprocessed, maps: np.ndarray, s: int, *, cam: bool) -> None:
    ax.imshow(pre.windowed[s], cmap="gray", vmin=0, vmax=1, interpolation="bilinear")
    if cam:  # the weakest 15 % left transparent so the anatomy under a focal map stays readable
        shown = np.ma.masked_less(maps[s], 0.15)
        ax.imshow(shown, cmap="jet", vmin=0, vmax=1, alpha=0.45, interpolation="bilinear")
    if pre.mask_slices[s].any():
        ax.contour(pre.mask_slices[s], levels=[0.5], colors="#00FF00", linewidths=0.7)
    ax.set_axis_off()


def _title(c: PatientCam) -> str:
    label = "?" if c.label is None else ("PD-L1 high" if c.label == 1 else "PD-L1 low")
    return f"{c.patient_id} · {c.cohort.replace('_', ' ')} · {label} · P={c.score:.2f}"


def _central(pre: Preprocessed) -> int:
    return int(np.argmax(pre.geometry.slice_area_mm2))


def patient_figure(c: PatientCam, target: Path) -> Path:
    """2 x S grid: iodine map with the mask outline (top), the CAM overlaid (bottom)."""
    import matplotlib.pyplot as plt

    from training.figures.style import figure_style

    n_s = c.maps.shape[0]
    with figure_style():
        fig, axes = plt.subplots(2, n_s, figsize=(1.9 * n_s, 4.1), squeeze=False)
        for s in range(n_s):
            _overlay(axes[0, s], c.pre, c.maps, s, cam=False)
            _overlay(axes[1, s], c.pre, c.maps, s, cam=True)
            axes[0, s].set_title(f"slice {s + 1}/{n_s}", fontsize=7)
        fig.suptitle(f"{_title(c)}\n{c.method}", fontsize=8)
        try:
            return write_with(target, lambda p: fig.savefig(p, format="png", dpi=200))
        finally:
            plt.close(fig)


def panel_figure(cams: Sequence[PatientCam], target: Path) -> Path:
    """The report panel: one row per patient (central slice), iodine map | CAM overlay."""
    import matplotlib.pyplot as plt

    from training.figures.style import figure_style

    with figure_style():
        fig, axes = plt.subplots(len(cams), 2, figsize=(4.6, 2.3 * len(cams)), squeeze=False)
        for row, c in zip(axes, cams):
            s = _central(c.pre)
            _overlay(row[0], c.pre, c.maps, s, cam=False)
            _overlay(row[1], c.pre, c.maps, s, cam=True)
            row[0].set_title(_title(c), fontsize=6.5, loc="left")
        methods = sorted({c.method for c in cams})
        fig.suptitle(
            "; ".join(methods) + "\nmask outline green; CAM normalised per patient, weakest 15 % not shown",
            fontsize=7,
        )
        fig.tight_layout()
        try:
            return write_with(target, lambda p: fig.savefig(p, format="png", dpi=200))
        finally:
            plt.close(fig)


def cam_panels(
    run_dir: Path,
    patients: Sequence[Mapping[str, Any]],
    out_dir: Path,
    *,
    preprocess_config: PreprocessConfig | None = None,
) -> list[Path]:
    """CAMs for ``patients`` (dicts with image, mask, patient_id, cohort, label) from the run's models.

    Writes per patient ``<id>_cam.nii.gz`` (on the original image grid) and ``<id>_overlay.png``, plus
    ``cam_panel.png`` (all patients) and ``cam.json`` (index with method, score and files). Returns the
    paths written.
    """
    out_dir = Path(out_dir)
    extractor, model, config = load_cam_model(run_dir, preprocess_config)
    written: list[Path] = []
    cams: list[PatientCam] = []
    index = []
    for patient in patients:
        c = compute_patient_cam(extractor, model, config, patient)
        name = safe_name(c.patient_id)
        nifti = write_nifti(c.pre.map_to_image(c.maps), out_dir / f"{name}_cam.nii.gz")
        overlay = patient_figure(c, out_dir / f"{name}_overlay.png")
        written += [nifti, overlay]
        cams.append(c)
        index.append(
            {
                "patient_id": c.patient_id,
                "cohort": c.cohort,
                "label": c.label,
                "dfsig_probability": c.score,
                "method": c.method,
                "raw_max": c.raw_max,
                "nifti": nifti.name,
                "overlay": overlay.name,
                "slice_indices": list(c.pre.geometry.slice_indices),
            }
        )
    if cams:
        written.append(panel_figure(cams, out_dir / "cam_panel.png"))
    written.append(
        write_json(
            out_dir / "cam.json",
            {
                "score": "DFSigM positive-class logit (Grad-CAM) or probability (Ablation-CAM), "
                "full pipeline",
                "normalisation": "min-max over each patient's slices",
                "target_layer": "ResNet-50 layer4",
                "preprocessing": config.model_dump(mode="json"),
                "patients": index,
                "panel": "cam_panel.png" if cams else None,
            },
        )
    )
    return written


def select_cam_patients(
    ids: Sequence[str],
    cohorts: Sequence[str],
    labels: Sequence[int],
    scores: Sequence[float],
    per_group: int = 1,
) -> list[int]:
    """Row indices of ``per_group`` patients per cohort x class: the most confidently *correct* ones
    (highest score among positives, lowest among negatives), i.e. the typical pattern of each class."""
    cohorts_a, labels_a, scores_a = np.asarray(cohorts).astype(str), np.asarray(labels), np.asarray(scores)
    chosen: list[int] = []
    for cohort in dict.fromkeys(cohorts_a.tolist()):
        for label in (1, 0):
            rows = np.flatnonzero((cohorts_a == cohort) & (labels_a == label))
            order = rows[np.argsort(-scores_a[rows] if label == 1 else scores_a[rows], kind="stable")]
            chosen += order[:per_group].tolist()
    return chosen
