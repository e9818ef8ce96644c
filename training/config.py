"""The study configuration: one typed, documented object, loaded from YAML and saved resolved into every run.

`configs/study.yaml` mirrors the published design and documents every option; a run directory keeps the
resolved copy so a study can be repeated exactly.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from core.errors import InputError
from core.preprocessing import PreprocessConfig

DEFAULT_CONFIG = Path(__file__).resolve().parents[1] / "configs" / "study.yaml"


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class FeatureConfig(_Section):
    """How deep features are extracted (ResNet-50, 2-D per slice, mean over slices)."""

    weights: str = Field(
        "imagenet",
        description="'imagenet' (local torchvision checkpoint), 'file:PATH', or 'random' (explicit).",
    )
    bn_recalibration: Literal["auto", "on", "off"] = Field(
        "auto",
        description="Re-estimate batch-norm statistics on training-cohort slices; 'auto' = only for random.",
    )
    bn_max_slices: int | None = Field(
        None, ge=8, description="Cap on training slices used for BN re-estimation (evenly spaced patients)."
    )
    batch_size: int = Field(16, ge=1, le=1024)
    backend: Literal["torch", "onnx"] = Field(
        "onnx", description="onnx: ONNX Runtime (CPU, ~1.4x torch eager here); torch: eager (CPU or CUDA)."
    )
    device: str = Field("auto", description="auto (CUDA when available) | cpu | cuda | cuda:N")


class SelectionConfig(_Section):
    """Feature selection, fitted on the training cohort only."""

    icc_threshold: float = Field(0.75, ge=0, le=1, description="Used only when a second mask column exists.")
    second_mask_column: str | None = Field(None, description="Manifest column with a repeat segmentation.")
    mwu_alpha: float = Field(0.05, gt=0, le=1)
    mwu_correction: Literal["none", "fdr_bh"] = "fdr_bh"
    correlation_threshold: float = Field(0.9, gt=0, le=1, description="Spearman |rho| redundancy cut-off.")
    max_features: int = Field(12, ge=1, le=2048, description="LASSO keeps at most this many features.")
    lasso_cv: int = Field(5, ge=2, le=20)


class ModelSelectionConfig(_Section):
    """The DFSigM classifier zoo and how one is chosen."""

    candidates: list[str] = Field(
        default_factory=lambda: [
            "lr",
            "linear_svm",
            "rbf_svm",
            "random_forest",
            "gradient_boosting",
            "knn",
            "mlp",
        ]
    )
    cv_splits: int = Field(5, ge=2, le=20)
    cv_repeats: int = Field(3, ge=1, le=50)
    metric: str = Field("roc_auc", description="scikit-learn scorer used to pick the model by mean CV score.")
    prefer_linear_within: float = Field(
        0.0, ge=0, le=0.2, description="Pick a linear head if its CV AUC is within this margin of the best."
    )


class ClinicalConfig(_Section):
    """Clinical model: univariable screen, then a multivariable logistic model."""

    variables: list[str] | None = Field(None, description="Clinical columns to screen (None = all known).")
    p_enter: float = Field(0.05, gt=0, le=1, description="Univariable p below which a variable enters.")
    p_keep: float = Field(0.05, gt=0, le=1, description="Multivariable p below which a predictor is kept.")


class EvaluationConfig(_Section):
    """Statistics for every model on every cohort."""

    n_bootstrap: int = Field(1000, ge=0, le=100000)
    hl_groups: int = Field(10, ge=3, le=50)


class ReportConfig(_Section):
    """Explainability and report options."""

    shap: bool = True
    gradcam: bool = True
    cam_patients_per_group: int = Field(1, ge=0, le=10)


class StudyConfig(_Section):
    """Everything a study run depends on, besides the data."""

    seed: int = 0
    preprocessing: PreprocessConfig = Field(default_factory=PreprocessConfig)
    features: FeatureConfig = Field(default_factory=FeatureConfig)
    selection: SelectionConfig = Field(default_factory=SelectionConfig)
    models: ModelSelectionConfig = Field(default_factory=ModelSelectionConfig)
    clinical: ClinicalConfig = Field(default_factory=ClinicalConfig)
    evaluation: EvaluationConfig = Field(default_factory=EvaluationConfig)
    report: ReportConfig = Field(default_factory=ReportConfig)


def _read_yaml(path: Path) -> dict:
    try:
        data = yaml.safe_load(Path(path).read_text()) or {}
    except FileNotFoundError as exc:
        raise InputError("config file not found", source=str(path)) from exc
    except yaml.YAMLError as exc:
        raise InputError(f"not valid YAML ({exc})", source=str(path)) from exc
    if not isinstance(data, dict):
        raise InputError("top level must be a mapping of sections", source=str(path))
    return data


def _validation_error(exc: ValidationError, path: Path | str) -> InputError:
    first = exc.errors()[0]
    field = ".".join(str(p) for p in first["loc"])
    return InputError(
        f"{first['msg']} ({len(exc.errors())} problem(s) in total)", source=str(path), field=field
    )


def load_study_config(path: Path | None = None, overrides: dict | None = None) -> StudyConfig:
    """Load a study YAML (default: configs/study.yaml), apply `overrides` ({'features.weights': 'random'})."""
    source = Path(path) if path is not None else DEFAULT_CONFIG
    data = _read_yaml(source) if source.exists() or path is not None else {}
    for dotted, value in (overrides or {}).items():
        node = data
        *parents, leaf = dotted.split(".")
        for key in parents:
            node = node.setdefault(key, {})
        node[leaf] = value
    try:
        return StudyConfig.model_validate(data)
    except ValidationError as exc:
        raise _validation_error(exc, source) from exc


def load_preprocess_config(path: Path | None = None) -> PreprocessConfig:
    """The `preprocessing:` section of a YAML file, or the defaults when no file is given."""
    if path is None:
        return PreprocessConfig()
    data = _read_yaml(Path(path))
    try:
        return PreprocessConfig.model_validate(data.get("preprocessing", {}))
    except ValidationError as exc:
        raise _validation_error(exc, path) from exc


def dump_config(config: StudyConfig) -> str:
    """YAML of the resolved config (written into each run)."""
    return yaml.safe_dump(config.model_dump(mode="json"), sort_keys=False)
