"""``pdl1 export``: training run directory -> validated export directory (+ BentoML store entry).

Steps: read the run -> rebuild the extractor from ``models/extractor.pt`` -> ONE fp32 graph (extractor +
selected features + fitted head) -> fp16 and int8 trunks re-merged with the head -> each validated on the
validation cohorts against the torch + scikit-learn reference (failing variants are not published) ->
``head.npz``/``head.onnx``/``extractor.pt`` for the torch Grad-CAM path -> ``validation.csv``,
``MODEL_CARD.md``, ``manifest.json`` (SHA-256 of every file) -> BentoML store.

Validation inputs (the preprocessed slices of the run's patients) come from ``RUN/features/slices/``
(``<patient_id>.npy``, [S,3,H,W]) when the run kept them, else they are re-made with the shared
preprocessing from the manifest recorded in ``run.json`` (``training.features.prepare_inputs``; its
content-addressed cache makes this a cache read when the study ran on this machine). The reference
probabilities recomputed from those slices must match the run's own features (``features.npz``): a
mismatch means the slices are not what the study saw, and the export stops.
"""

from __future__ import annotations

import json
import logging
import os
import platform
import shutil
import tempfile
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from core.errors import InputError
from core.manifest import MANIFEST_NAME, HeadInfo, ModelManifest, VariantInfo, hash_files, write_manifest
from core.runtime import EXTRACTOR_FILE, HEAD_ARRAYS_FILE, HEAD_ONNX_FILE
from export.graph import CAM, PROBABILITY, BuiltGraph, LinearHead, build_graph, linear_logit_head, save_model
from export.validate import CohortSlices, compare, reference_probabilities, run_graph, summarise

log = logging.getLogger(__name__)

DEFAULT_NAME = "pdl1"  # the service and bentofile.yaml load pdl1:latest
TRAINING_COHORT = "training"
VARIANTS = ("fp32", "fp16", "int8")
VARIANT_FILES = {v: f"model.{v}.onnx" for v in VARIANTS}
VALIDATION_FILE = "validation.csv"
CARD_FILE = "MODEL_CARD.md"
RUN_CONSISTENCY_TOL = 1e-3  # reference from the slices vs the run's own features: beyond this, they differ


@dataclass
class Run:
    """What the export needs from a training run directory."""

    run_dir: Path
    run_info: dict[str, Any]
    extractor_info: dict[str, Any]
    model: Any  # training.models.SignatureModel
    ids: np.ndarray
    X: np.ndarray
    cohorts: np.ndarray
    labels: np.ndarray
    metrics: dict[str, Any]

    @property
    def preprocess(self) -> dict[str, Any]:
        return dict(self.extractor_info["preprocessing"])

    @property
    def run_id(self) -> str:
        return str(self.run_info.get("run_id", self.run_dir.name))

    @property
    def synthetic(self) -> bool:
        return bool(self.run_info.get("synthetic", self.metrics.get("synthetic", False)))


@dataclass
class ExportResult:
    out_dir: Path
    manifest: ModelManifest
    tag: str | None
    validation: pd.DataFrame


def _read_json(path: Path) -> dict[str, Any]:
    try:
        return json.loads(path.read_text())
    except FileNotFoundError as exc:
        raise InputError(
            "missing from the run directory (was `pdl1 study run` finished?)", source=str(path)
        ) from exc
    except json.JSONDecodeError as exc:
        raise InputError(f"not valid JSON ({exc})", source=str(path)) from exc


def read_run(run_dir: str | os.PathLike[str]) -> Run:
    """Load run.json, models/extractor.json, models/dfsig.joblib, features/features.npz (+ metrics.json)."""
    import joblib

    run_dir = Path(run_dir).resolve()
    if not run_dir.is_dir():
        raise InputError("run directory not found", source=str(run_dir), field="run")
    run_info = _read_json(run_dir / "run.json")
    extractor_info = _read_json(run_dir / "models" / "extractor.json")
    if "preprocessing" not in extractor_info:
        raise InputError(
            "no preprocessing config",
            source=str(run_dir / "models" / "extractor.json"),
            field="preprocessing",
        )
    model_path = run_dir / "models" / "dfsig.joblib"
    if not model_path.is_file():
        raise InputError("missing", source=str(model_path))
    model = joblib.load(
        model_path
    )  # a pickle of our own training run (trusted); never loaded at serving time
    for attr in ("feature_indices", "feature_names", "pipeline", "model_name"):
        if not hasattr(model, attr):
            raise InputError(f"not a SignatureModel (no {attr!r})", source=str(model_path))
    feats_path = run_dir / "features" / "features.npz"
    try:
        with np.load(feats_path, allow_pickle=False) as z:
            ids, X, cohorts, labels = (z[k] for k in ("ids", "X", "cohort", "label"))
    except FileNotFoundError as exc:
        raise InputError("missing", source=str(feats_path)) from exc
    except KeyError as exc:
        raise InputError(f"needs arrays ids, X, cohort, label ({exc})", source=str(feats_path)) from exc
    metrics_path = run_dir / "metrics.json"
    metrics = _read_json(metrics_path) if metrics_path.is_file() else {}
    return Run(
        run_dir=run_dir,
        run_info=run_info,
        extractor_info=extractor_info,
        model=model,
        ids=ids.astype(str),
        X=X.astype(np.float32),
        cohorts=cohorts.astype(str),
        labels=labels.astype(np.int64),
        metrics=metrics,
    )


def load_extractor(run_dir: Path) -> Any:
    """The extractor with the exact weights the study used (after any BN re-estimation), eval mode."""
    import torch

    from core.network import ResNet50Extractor, load_torchvision_state

    path = Path(run_dir) / "models" / EXTRACTOR_FILE
    if not path.is_file():
        raise InputError("missing", source=str(path))
    extractor = ResNet50Extractor()
    load_torchvision_state(
        extractor, torch.load(path, map_location="cpu", weights_only=True), source=str(path)
    )
    return extractor.eval()


def load_validation_inputs(
    run_dir: str | os.PathLike[str], *, patient_ids: Sequence[str] | None = None, run: Run | None = None
) -> CohortSlices:
    """Preprocessed slices [N,S,3,H,W] of the run's patients (all, or ``patient_ids``) with labels/cohorts.

    Source: ``RUN/features/slices/<patient_id>.npy`` when present for every requested patient, else the
    shared preprocessing re-run from the manifest in ``run.json`` (cached by content).
    """
    run = run or read_run(run_dir)
    wanted = list(run.ids) if patient_ids is None else [str(p) for p in patient_ids]
    pos = {pid: i for i, pid in enumerate(run.ids)}
    unknown = [p for p in wanted if p not in pos]
    if unknown:
        raise InputError(
            f"patients not in features.npz: {unknown[:5]}", source=str(run.run_dir), field="patient_id"
        )
    slice_dir = run.run_dir / "features" / "slices"
    files = [slice_dir / f"{pid}.npy" for pid in wanted]
    if wanted and all(f.is_file() for f in files):
        arrays = [np.load(f, allow_pickle=False) for f in files]
        log.info("validation inputs: %d patients from %s", len(arrays), slice_dir)
    else:
        arrays = _preprocess_from_manifest(run, wanted)
    slices = np.stack(arrays).astype(np.float32, copy=False)
    rows = np.array([pos[p] for p in wanted], dtype=np.int64)
    return CohortSlices(np.array(wanted), slices, run.labels[rows], run.cohorts[rows])


def _preprocess_from_manifest(run: Run, wanted: list[str]) -> list[np.ndarray]:
    from core.preprocessing import PreprocessConfig
    from training.cohort import load_manifest
    from training.features import prepare_inputs
    from training.study import default_cache_dir

    manifest_path = run.run_info.get("manifest")
    if not manifest_path or not Path(manifest_path).is_file():
        raise InputError(
            "run.json names no readable manifest and the run has no features/slices/ to validate on",
            source=str(run.run_dir / "run.json"),
            field="manifest",
        )
    table = load_manifest(Path(manifest_path))
    table = table[table["patient_id"].astype(str).isin(set(wanted))]
    config = PreprocessConfig.model_validate(run.preprocess)
    inputs = prepare_inputs(table, config, cache_dir=default_cache_dir(), progress=False)
    by_id = {item.patient_id: item for item in inputs}
    missing = [p for p in wanted if p not in by_id]
    if missing:
        raise InputError(f"patients missing from the manifest: {missing[:5]}", source=str(manifest_path))
    log.info("validation inputs: %d patients re-preprocessed from %s", len(wanted), manifest_path)
    return [by_id[p].load() for p in wanted]


def _linear_head(run: Run) -> LinearHead | None:
    """Affine logit on raw features: from SignatureModel.linear_coef('raw') when offered, else measured."""
    model = run.model
    x_train = run.X[run.cohorts == TRAINING_COHORT][:, model.feature_indices]
    if getattr(model, "is_linear", False) and hasattr(model, "linear_coef"):
        w, b = model.linear_coef("raw")
        head = LinearHead(weight=np.asarray(w, dtype=np.float64), bias=float(b))
    elif hasattr(model, "is_linear") and not model.is_linear:
        return None
    else:
        head = linear_logit_head(model.pipeline, x_train if len(x_train) else run.X[:, model.feature_indices])
    if head is not None:  # the CAM is only exact if the affine map IS the head: check it
        from export.graph import positive_class_index

        col = positive_class_index(model.pipeline.steps[-1][1])
        xs = (x_train if len(x_train) else run.X[:, model.feature_indices]).astype(np.float64)
        p = np.clip(model.pipeline.predict_proba(xs)[:, col], 1e-12, 1 - 1e-12)
        err = np.max(np.abs(np.log(p / (1 - p)) - (xs @ head.weight + head.bias)))
        if err > 1e-6 * max(1.0, float(np.ptp(xs @ head.weight))):
            raise RuntimeError(
                f"linear head weights do not reproduce the classifier's logit (max error {err:.2e})"
            )
    return head


def _threshold(run: Run, probs: np.ndarray) -> tuple[float, str]:
    """The study's Youden cut-off (metrics.json) or, without one, Youden on the training cohort here."""
    cutoff = (run.metrics.get("cutoffs") or {}).get("dfsig")
    if cutoff is not None:
        return float(cutoff), "youden_training_cohort (metrics.json)"
    from training.stats.thresholds import youden_cutoff

    m = run.cohorts == TRAINING_COHORT
    result = youden_cutoff(run.labels[m], probs[m])
    value = getattr(result, "cutoff", result)
    return float(value), "youden_training_cohort (recomputed)"


def _cohort_aucs(run: Run, probs: np.ndarray) -> tuple[dict[str, float | None], dict[str, int]]:
    from sklearn.metrics import roc_auc_score

    aucs: dict[str, float | None] = {}
    ns: dict[str, int] = {}
    for cohort in sorted(set(run.cohorts.tolist())):
        m = run.cohorts == cohort
        ns[cohort] = int(m.sum())
        aucs[cohort] = float(roc_auc_score(run.labels[m], probs[m])) if len(set(run.labels[m])) == 2 else None
    return aucs, ns


def package_versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    out = {"python": platform.python_version()}
    for pkg in (
        "torch",
        "onnx",
        "onnxruntime-gpu",
        "onnxruntime",
        "skl2onnx",
        "scikit-learn",
        "numpy",
        "bentoml",
    ):
        try:
            out[pkg] = version(pkg)
        except PackageNotFoundError:
            continue
    return out


def make_version() -> str:
    """Sortable, unique store version: UTC timestamp + random suffix (BentoML tag charset)."""
    return f"{datetime.now(UTC):%Y%m%d%H%M%S}-{uuid.uuid4().hex[:6]}"


def _validation_provider(variant: str) -> list[Any]:
    """fp16 is checked where it will run (CUDA) when this machine can; everything else on the CPU."""
    import onnxruntime as ort

    from core.runtime import CPU, CUDA, cuda_provider_options

    if variant == "fp16" and CUDA in ort.get_available_providers():
        return [(CUDA, cuda_provider_options()), CPU]
    return [CPU]


def _write_head_files(out: Path, built: BuiltGraph, run: Run, linear: LinearHead | None) -> None:
    arrays: dict[str, np.ndarray] = {"feature_indices": np.asarray(run.model.feature_indices, dtype=np.int64)}
    if linear is not None:
        arrays["linear_weight"] = linear.weight.astype(np.float64)
        arrays["linear_bias"] = np.array(linear.bias, dtype=np.float64)
    with open(out / HEAD_ARRAYS_FILE, "wb") as fh:
        np.savez(fh, **arrays)
    save_model(built.head, str(out / HEAD_ONNX_FILE))
    shutil.copy2(run.run_dir / "models" / EXTRACTOR_FILE, out / EXTRACTOR_FILE)


def build_export(
    run_dir: str | os.PathLike[str],
    out_dir: str | os.PathLike[str] | None = None,
    *,
    name: str = DEFAULT_NAME,
    variants: Sequence[str] = VARIANTS,
    store: bool = True,
    calibration_patients: int = 16,
    int8_types: Sequence[str] = ("u8s8", "s8s8"),
    validation_cohorts: Sequence[str] | None = None,
    inputs: CohortSlices | None = None,
) -> ExportResult:
    """Build, validate, document and (optionally) store an export; see the module docstring.

    ``inputs`` (all patients needed: validation cohorts + training patients for int8 calibration) can be
    passed to skip :func:`load_validation_inputs`.
    """
    from export.model_card import INTENDED_USE, LIMITATIONS, render_model_card
    from export.validate import write_validation_csv

    unknown = [v for v in variants if v not in VARIANTS]
    if unknown or "fp32" not in variants:
        raise InputError(
            f"variants must include fp32 and be among {VARIANTS}, got {list(variants)}", field="variants"
        )
    run = read_run(run_dir)
    version = make_version()
    out = Path(out_dir) if out_dir is not None else Path("exports") / name / version
    out.mkdir(parents=True, exist_ok=True)
    if any(out.iterdir()):
        raise InputError("output directory is not empty", source=str(out), field="out")
    model = run.model
    idx = np.asarray(model.feature_indices, dtype=np.int64)
    pipeline = model.pipeline
    pre = run.preprocess
    n_slices, size = int(pre.get("n_slices", 3)), int(pre.get("size", 224))

    extractor = load_extractor(run.run_dir)
    linear = _linear_head(run)
    built = build_graph(
        extractor,
        idx,
        pipeline,
        linear=linear,
        image_size=size,
        slices=n_slices,
        metadata={"pdl1.name": name, "pdl1.version": version, "pdl1.run_id": run.run_id},
    )
    save_model(built.model, str(out / VARIANT_FILES["fp32"]))
    _write_head_files(out, built, run, linear)

    # ---- validation inputs and reference
    val_cohorts = list(validation_cohorts or sorted(set(run.cohorts.tolist()) - {TRAINING_COHORT}))
    if not val_cohorts:
        raise InputError(
            "the run has no validation cohort to validate the export on", source=str(run.run_dir)
        )
    val_ids = run.ids[np.isin(run.cohorts, val_cohorts)]
    train_ids = run.ids[run.cohorts == TRAINING_COHORT]
    calib_ids = train_ids[:: max(1, len(train_ids) // calibration_patients)][:calibration_patients]
    if inputs is None:
        need = list(val_ids) + (list(calib_ids) if "int8" in variants else [])
        inputs = load_validation_inputs(run.run_dir, patient_ids=need, run=run)
    val = inputs.subset(np.isin(inputs.ids, val_ids))
    reference, _ = reference_probabilities(extractor, idx, pipeline, val.slices)
    run_probs = model.predict_proba_full(run.X) if hasattr(model, "predict_proba_full") else None
    consistency = _check_against_run(run, val, reference)

    tables: list[pd.DataFrame] = []
    variant_info: dict[str, VariantInfo] = {}

    def validate(variant: str, path: Path, candidate: str = "") -> pd.DataFrame:
        probs, provider, seconds = run_graph(path, val.slices, providers=_validation_provider(variant))
        table = compare(variant, probs, reference, val, provider=provider, seconds=seconds)
        table.insert(1, "candidate", candidate or variant)
        tables.append(table)
        return table

    fp32 = validate("fp32", out / VARIANT_FILES["fp32"])
    if not fp32["passed"].all():
        raise RuntimeError(
            f"fp32 graph differs from the torch + scikit-learn reference by {fp32['max_abs_diff'].max():.2e} "
            f"(> {fp32['tolerance_prob'].iloc[0]}); nothing is exported"
        )
    variant_info["fp32"] = VariantInfo(
        file=VARIANT_FILES["fp32"],
        published=True,
        precision="float32",
        target="CPU/CUDA",
        validation=summarise(fp32),
    )
    if "fp16" in variants:
        variant_info["fp16"] = _fp16_variant(built, out, validate)
    if "int8" in variants:
        calib = inputs.subset(np.isin(inputs.ids, calib_ids))
        variant_info["int8"] = _int8_variant(built, out, calib, val, validate, int8_types)

    validation = pd.concat(tables, ignore_index=True)
    write_validation_csv(tables, out / VALIDATION_FILE)

    probs_all = run_probs if run_probs is not None else pipeline.predict_proba(run.X[:, idx])[:, 1]
    threshold, threshold_method = _threshold(run, probs_all)
    aucs, ns = _cohort_aucs(run, probs_all)
    s_dim: int | str = n_slices
    outputs: dict[str, list[int | str]] = {PROBABILITY: ["N"]}
    if built.has_cam:
        outputs[CAM] = ["N", *built.cam_shape]
    head_info = HeadInfo(
        model_name=str(model.model_name),
        classifier=type(pipeline.steps[-1][1]).__name__,
        type="linear" if linear is not None else "nonlinear",
    )
    files = [VARIANT_FILES[v] for v, info in variant_info.items() if info.published]
    files += [HEAD_ARRAYS_FILE, HEAD_ONNX_FILE, EXTRACTOR_FILE, VALIDATION_FILE, CARD_FILE]
    draft = dict(
        name=name,
        version=version,
        training_run_id=run.run_id,
        source_run=str(run.run_dir),
        preprocess=pre,
        input_shape=["N", s_dim, 3, size, size],
        outputs=outputs,
        feature_names=[str(f) for f in model.feature_names],
        feature_indices=[int(i) for i in idx],
        threshold=threshold,
        threshold_method=threshold_method,
        cohort_auc=aucs,
        cohort_n=ns,
        head=head_info,
        has_graph_cam=built.has_cam,
        cam_note=_cam_note(built.has_cam),
        weights=dict(run.extractor_info.get("weights", {})) | {"run_consistency_max_abs_diff": consistency},
        exporter=built.exporter,
        opset=max(o.version for o in built.model.opset_import if o.domain in ("", "ai.onnx")),
        variants=variant_info,
        versions=package_versions(),
        intended_use=INTENDED_USE,
        limitations=LIMITATIONS + ([_SYNTHETIC_NOTE] if run.synthetic else []),
        synthetic_data=run.synthetic,
    )
    card_manifest = ModelManifest(**draft, files={})
    (out / CARD_FILE).write_text(render_model_card(card_manifest, validation))
    manifest = ModelManifest(**draft, files=hash_files(out, files))
    write_manifest(manifest, out / MANIFEST_NAME)
    log.info("export written to %s (variants: %s)", out, ", ".join(manifest.published_variants))
    tag = None
    if store:
        from export.store import save_to_store

        tag = save_to_store(out, manifest)
    return ExportResult(out_dir=out, manifest=manifest, tag=tag, validation=validation)


_SYNTHETIC_NOTE = (
    "Trained on a SYNTHETIC cohort: the numbers demonstrate the pipeline and carry no clinical evidence."
)


def _cam_note(has_cam: bool) -> str:
    if has_cam:
        return (
            "cam[n,s] = sum_k w_k A[n,s,k] / S over the selected layer4 channels, w = effective logit "
            "weight on the raw pooled features; signed, logit units: sum_s mean_hw cam = logit - bias. "
            "Equals pre-ReLU Grad-CAM of the logit times h*w."
        )
    return "non-linear head: no in-graph CAM; use the torch path (Ablation-CAM through head.onnx)."


def _check_against_run(run: Run, val: CohortSlices, reference: np.ndarray) -> float:
    """Reference from the slices vs from the run's own features: the slices must be the study's."""
    pos = {pid: i for i, pid in enumerate(run.ids)}
    rows = np.array([pos[p] for p in val.ids])
    sel = run.X[rows][:, np.asarray(run.model.feature_indices, dtype=np.int64)].astype(np.float64)
    from export.graph import positive_class_index

    col = positive_class_index(run.model.pipeline.steps[-1][1])
    diff = float(np.max(np.abs(run.model.pipeline.predict_proba(sel)[:, col] - reference)))
    if diff > RUN_CONSISTENCY_TOL:
        raise RuntimeError(
            f"the validation slices do not reproduce the run's features (max |Δp| {diff:.2e} > "
            f"{RUN_CONSISTENCY_TOL}): preprocessing or weights differ from the study; refusing to export"
        )
    log.info("validation slices reproduce the run's predictions (max |Δp| %.2e)", diff)
    return diff


def _fp16_variant(built: BuiltGraph, out: Path, validate: Any) -> VariantInfo:
    from export.variants import to_fp16

    path = out / VARIANT_FILES["fp16"]
    try:
        save_model(built.merge(to_fp16(built.trunk)), str(path))
    except Exception as exc:  # a conversion failure must not stop the fp32 export; it is recorded
        log.warning("fp16 conversion failed: %s", exc)
        return VariantInfo(
            file=path.name, published=False, precision="float16 trunk", target="CUDA", note=str(exc)
        )
    table = validate("fp16", path)
    passed = bool(table["passed"].all())
    if not passed:
        path.unlink()
        log.warning("fp16 variant failed validation: not published")
    return VariantInfo(
        file=path.name,
        published=passed,
        precision="float16 trunk (float32 I/O, pooling and head)",
        target="CUDA",
        validation=summarise(table),
        note=""
        if table["provider"].iloc[0].startswith("CUDA")
        else "validated on the CPU provider (no GPU here)",
    )


def _int8_variant(
    built: BuiltGraph,
    out: Path,
    calib: CohortSlices,
    val: CohortSlices,
    validate: Any,
    types: Sequence[str],
) -> VariantInfo:
    """Quantise with each type pair, validate, keep the fastest that passes."""
    from export.variants import SliceCalibrationReader, time_model, to_int8

    if len(calib.ids) == 0:
        return VariantInfo(
            file=VARIANT_FILES["int8"],
            published=False,
            precision="int8 QDQ",
            target="CPU",
            note="no training slices",
        )
    reader = SliceCalibrationReader(calib.slices, batch_size=1)
    candidates: dict[str, tuple[Path, pd.DataFrame, float]] = {}
    with tempfile.TemporaryDirectory(prefix="pdl1-int8-") as tmp:
        cache = Path(tmp) / "calibration.json"  # second type pair reuses the ranges
        for t in types:
            path = Path(tmp) / f"int8_{t}.onnx"
            try:
                save_model(built.merge(to_int8(built.trunk, reader, types=t, cache_path=cache)), str(path))
            except Exception as exc:
                log.warning("int8 %s quantisation failed: %s", t, exc)
                continue
            table = validate("int8", path, candidate=f"int8-{t}")
            speed = time_model(path, np.ascontiguousarray(val.slices[: min(4, len(val.slices))])).median_s
            table["median_s_batch"] = speed
            candidates[t] = (path, table, speed)
        passing = {t: c for t, c in candidates.items() if c[1]["passed"].all()}
        tried = ", ".join(
            f"{t}: {'pass' if t in passing else 'fail'} {c[2]:.3f}s" for t, c in candidates.items()
        )
        if not passing:
            log.warning("no int8 candidate passed validation (%s): not published", tried)
            worst = min(candidates.values(), key=lambda c: c[1]["max_abs_diff"].max()) if candidates else None
            return VariantInfo(
                file=VARIANT_FILES["int8"],
                published=False,
                precision="int8 QDQ",
                target="CPU",
                validation=summarise(worst[1]) if worst else {},
                note=f"candidates: {tried}",
            )
        best = min(passing, key=lambda t: passing[t][2])
        shutil.copy2(passing[best][0], out / VARIANT_FILES["int8"])
    log.info("int8: kept %s (%s)", best, tried)
    return VariantInfo(
        file=VARIANT_FILES["int8"],
        published=True,
        precision=f"int8 QDQ {best} (per-channel weights; float32 head)",
        target="CPU",
        validation=summarise(passing[best][1]),
        note=f"candidates: {tried}",
    )
