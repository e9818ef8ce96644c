"""The BentoML model store: an export saved as ``NAME:VERSION`` so the service can load ``NAME:latest``.

Each ``pdl1 export`` saves a new version (re-exporting a retrained run never overwrites an older one). The
model's files are the export directory's files, unchanged, so ``core.runtime.InferenceModel`` verifies
them against the manifest exactly as it does for a plain directory.

``BENTOML_HOME`` is read at each call (BentoML itself reads it once at import), so tests and tools can
point at another store within one process; it is passed to BentoML as an explicit ``ModelStore``.
"""

from __future__ import annotations

import logging
import os
import shutil
from pathlib import Path
from typing import Any

from core.errors import InputError
from core.manifest import MANIFEST_NAME, ModelManifest

log = logging.getLogger(__name__)

MODULE = "pdl1.export"  # recorded as the model's creating module


def _store() -> Any:
    from bentoml._internal.configuration.containers import BentoMLContainer
    from bentoml._internal.models.model import ModelStore

    home = os.environ.get("BENTOML_HOME")
    if home:
        return ModelStore(Path(home).expanduser() / "models")
    return BentoMLContainer.model_store.get()


def save_to_store(export_dir: Path, manifest: ModelManifest) -> str:
    """Copy every manifest-listed file plus the manifest into a new store entry; returns ``NAME:VERSION``."""
    import bentoml

    export_dir = Path(export_dir)
    labels = {
        "project": "pdl1",
        "head": manifest.head.model_name,
        "variants": "-".join(manifest.published_variants),
        "synthetic": str(manifest.synthetic_data).lower(),
        "graph_cam": str(manifest.has_graph_cam).lower(),
    }
    metadata = {
        "training_run_id": manifest.training_run_id,
        "source_run": manifest.source_run,
        "threshold": manifest.threshold,
        "cohort_auc": {k: v for k, v in manifest.cohort_auc.items() if v is not None},
        "variants": manifest.published_variants,
        "features": len(manifest.feature_indices),
        "created": manifest.created,
    }
    tag = bentoml.Tag(manifest.name, manifest.version)
    with bentoml.models.create(
        tag, labels=labels, metadata=metadata, module=MODULE, _model_store=_store()
    ) as model:
        dest = Path(model.path)
        for name in [*manifest.files, MANIFEST_NAME]:
            target = dest / name
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(export_dir / name, target)
    log.info("saved %s to the BentoML model store", model.tag)
    return str(model.tag)


def get_model(ref: str) -> Any:
    """The store entry for ``NAME``, ``NAME:latest`` or ``NAME:VERSION``."""
    import bentoml
    from bentoml.exceptions import BentoMLException, NotFound

    try:
        return bentoml.models.get(ref, _model_store=_store())
    except NotFound as exc:
        raise InputError(f"no model {ref!r} in the BentoML model store", field="model") from exc
    except BentoMLException as exc:  # malformed tags
        raise InputError(f"not a model tag or directory: {ref!r} ({exc})", field="model") from exc


def resolve_model(ref: str | os.PathLike[str]) -> tuple[Path, str]:
    """(local directory, display tag) for an export directory path or a store tag."""
    path = Path(ref)
    if path.is_dir():
        if not (path / MANIFEST_NAME).is_file():
            raise InputError(
                "directory has no manifest.json (not an export)", source=str(path), field="model"
            )
        manifest = ModelManifest.read(path / MANIFEST_NAME)
        return path, f"{manifest.name}:{manifest.version}"
    model = get_model(str(ref))
    return Path(model.path), str(model.tag)


def list_models(name: str | None = None) -> list[dict[str, Any]]:
    """Store entries created by ``pdl1 export`` (newest first): tag, created, labels, metadata, path."""
    import bentoml

    models = bentoml.models.list(name, _model_store=_store())
    rows = [
        {
            "tag": str(m.tag),
            "created": m.info.creation_time.isoformat(),
            "labels": dict(m.info.labels),
            "metadata": dict(m.info.metadata),
            "path": str(m.path),
        }
        for m in models
        if m.info.module == MODULE
    ]
    return sorted(rows, key=lambda r: r["created"], reverse=True)
