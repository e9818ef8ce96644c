"""``manifest.json`` of an exported model: what the graph expects, how it was made and validated, and the
SHA-256 of every file beside it (so a tampered or corrupted artifact is refused at load).

The manifest travels with the model into the BentoML store; the service reads its preprocessing config and
threshold from here, so inference cannot drift from training.
"""

from __future__ import annotations

import hashlib
import json
import os
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from core.errors import InputError, IntegrityError
from core.files import atomic_path

MANIFEST_NAME = "manifest.json"
SCHEMA_VERSION = 1
VariantName = Literal["fp32", "fp16", "int8"]


class _Frozen(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class VariantInfo(_Frozen):
    """One precision variant and its validation verdict (only published variants have a file on disk)."""

    file: str
    published: bool
    precision: str = Field(description="e.g. 'float32', 'float16 trunk', 'int8 QDQ u8s8'")
    target: str = Field(description="The execution provider it is meant for: CUDA or CPU.")
    validation: dict[str, Any] = Field(default_factory=dict, description="Worst case over the cohorts.")
    note: str = ""


class HeadInfo(_Frozen):
    """The classifier on the selected features."""

    model_name: str = Field(description="Zoo key of the DFSigM classifier, e.g. 'lr', 'random_forest'.")
    classifier: str = Field(description="Class name of the fitted estimator.")
    type: Literal["linear", "nonlinear"] = Field(
        description="'linear': logit(P) is affine in the pooled features (weights in head.npz; in-graph CAM)."
    )


class ModelManifest(_Frozen):
    """Everything a consumer of an export needs to know; validated on read."""

    schema_version: int = SCHEMA_VERSION
    name: str
    version: str
    created: str = Field(default_factory=lambda: datetime.now(UTC).isoformat())
    training_run_id: str
    source_run: str = Field(description="Path of the training run directory at export time.")
    preprocess: dict[str, Any] = Field(description="core.preprocessing.PreprocessConfig.model_dump()")
    input_name: str = "slices"
    input_shape: list[int | str] = Field(description="e.g. ['N', 3, 3, 224, 224]")
    outputs: dict[str, list[int | str]] = Field(description="name -> shape, e.g. probability: ['N']")
    feature_names: list[str]
    feature_indices: list[int]
    threshold: float = Field(ge=0, le=1, description="Decision threshold on probability (Youden, training).")
    threshold_method: str = "youden_training_cohort"
    cohort_auc: dict[str, float | None] = Field(default_factory=dict)
    cohort_n: dict[str, int] = Field(default_factory=dict)
    head: HeadInfo
    has_graph_cam: bool
    cam_note: str = ""
    weights: dict[str, Any] = Field(default_factory=dict, description="Extractor weights (WeightsInfo).")
    exporter: str = ""
    opset: int = 17
    files: dict[str, str] = Field(description="relative path -> sha256 of every artifact file")
    variants: dict[str, VariantInfo]
    versions: dict[str, str] = Field(default_factory=dict)
    intended_use: str
    limitations: list[str]
    synthetic_data: bool

    @property
    def published_variants(self) -> list[str]:
        return [name for name, v in self.variants.items() if v.published]

    @classmethod
    def read(cls, path: str | os.PathLike[str]) -> ModelManifest:
        """Read and validate; a missing or malformed manifest is an InputError naming the file and field."""
        path = Path(path)
        try:
            data = json.loads(path.read_text())
        except FileNotFoundError as exc:
            raise InputError("manifest not found (is this an export directory?)", source=str(path)) from exc
        except json.JSONDecodeError as exc:
            raise InputError(f"not valid JSON ({exc})", source=str(path)) from exc
        try:
            return cls.model_validate(data)
        except ValidationError as exc:
            first = exc.errors()[0]
            field = ".".join(str(p) for p in first["loc"])
            raise InputError(first["msg"], source=str(path), field=field) from exc


def sha256_file(path: str | os.PathLike[str], *, chunk: int = 1 << 20) -> str:
    """Hex SHA-256 of a file, streamed (model files are ~100 MB)."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def hash_files(root: str | os.PathLike[str], names: list[str]) -> dict[str, str]:
    """``{relpath: sha256}`` for files under ``root`` (POSIX separators, sorted)."""
    root = Path(root)
    return {name: sha256_file(root / name) for name in sorted(names)}


def write_manifest(manifest: ModelManifest, path: str | os.PathLike[str]) -> Path:
    """Write atomically (temp file + rename): a crash never leaves a half-written manifest."""
    path = Path(path)
    if path.is_dir():
        path = path / MANIFEST_NAME
    with atomic_path(path, mode=0o644) as tmp:  # 0644: the service may run as another user
        tmp.write_text(manifest.model_dump_json(indent=2) + "\n")
    return path


def _safe_relpath(root: Path, name: str) -> Path:
    """A manifest file name must stay inside the export directory (a tampered manifest must not reach out)."""
    rel = Path(name)
    if rel.is_absolute() or ".." in rel.parts or not name:
        raise IntegrityError(f"{name!r}: file names in the manifest must be relative paths inside the export")
    return root / rel


def verify_files(
    root: str | os.PathLike[str], files: dict[str, str], *, only: list[str] | None = None
) -> None:
    """Check every listed file (or ``only`` those) against its SHA-256; IntegrityError names the file."""
    root = Path(root)
    for name in only if only is not None else sorted(files):
        if name not in files:
            raise IntegrityError(f"{name}: not listed in the manifest; refusing to load an unlisted artifact")
        path = _safe_relpath(root, name)
        if not path.is_file():
            raise IntegrityError(f"{name}: listed in the manifest but missing from {root}")
        actual = sha256_file(path)
        if actual != files[name]:
            raise IntegrityError(
                f"{name}: SHA-256 mismatch (manifest {files[name][:16]}..., file {actual[:16]}...); "
                "the artifact was modified or corrupted, refusing to load it"
            )
