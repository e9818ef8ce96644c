"""Deep features for a cohort: preprocessing -> (BN re-estimation) -> ResNet-50 -> N x 2048, with a cache.

Per patient the feature is the mean over its S slices of the 2048-d global-average-pooled layer4 output
(``core.network.PatientFeatureNet``). Everything expensive is content-addressed under ``cache_dir``:

- ``slices/``: the preprocessed network input ``[S,3,size,size]``, key = sha256(image bytes hash, mask
  bytes hash, PreprocessConfig JSON). BN re-estimation and extraction both read it.
- ``bn/``: the extractor state after batch-norm re-estimation, key = sha256(initial weights hash, the
  training slices' keys in order, batch size). A re-run does not redo the training-cohort pass.
- ``features/``: one ``.npy`` (2048 float32) per patient, key = sha256(slices key, hash of the weights
  actually used, backend).

Entries are written atomically (temporary file + ``os.replace``) as soon as each patient is done, so an
interrupted run resumes where it stopped and a re-run skips finished patients; an unreadable or
malformed entry is logged, discarded and recomputed. Changing the images, masks, preprocessing or
weights changes the keys, so stale entries are never used.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import os
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import pandas as pd
import torch
from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)
from torch import nn

from core.errors import InputError
from core.files import atomic_path
from core.manifest import sha256_file
from core.network import (
    FEATURE_DIM,
    ResNet50Extractor,
    WeightsInfo,
    build_extractor,
    recalibrate_batchnorm,
    state_dict_sha256,
)
from core.preprocessing import PreprocessConfig, preprocess_files

log = logging.getLogger(__name__)

CACHE_VERSION = "1"
TRAINING_COHORT = "training"
REQUIRED_COLUMNS = ("patient_id", "image", "mask", "cohort")
Backend = Literal["torch", "onnx"]
SliceNet = Callable[[torch.Tensor], torch.Tensor]  # [B,3,H,W] -> [B,2048]


# ------------------------------------------------------------------------------------------ hashing


def path_sha256(path: str | os.PathLike[str]) -> str:
    """SHA-256 of a file's bytes; for a folder (DICOM series) of its sorted relative names and file hashes."""
    p = Path(path)
    if p.is_file():
        return sha256_file(p)
    if p.is_dir():
        h = hashlib.sha256(b"dir:")
        for f in sorted(q for q in p.rglob("*") if q.is_file()):
            h.update(f"{f.relative_to(p).as_posix()}:{sha256_file(f)}\n".encode())
        return h.hexdigest()
    raise InputError("file not found", source=str(p))


def content_key(**parts: Any) -> str:
    """A cache key: sha256 of the canonical JSON of ``parts`` (plus the cache format version)."""
    text = json.dumps({"cache_version": CACHE_VERSION, **parts}, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()


# -------------------------------------------------------------------------------------------- cache


class ArrayCache:
    """Content-addressed ``.npy`` files under ``root/<kind>/<key[:2]>/<key>.npy``, written atomically."""

    def __init__(self, root: str | os.PathLike[str]) -> None:
        self.root = Path(root)

    def path(self, kind: str, key: str) -> Path:
        return self.root / kind / key[:2] / f"{key}.npy"

    def get(self, kind: str, key: str, *, check: Callable[[np.ndarray], bool]) -> np.ndarray | None:
        """The stored array, or None when absent; a corrupt or malformed entry is removed (logged)."""
        path = self.path(kind, key)
        if not path.exists():
            return None
        try:
            arr = np.load(path, allow_pickle=False)
            problem = None if check(arr) else "malformed"
        except (OSError, ValueError, EOFError) as exc:
            arr, problem = None, f"unreadable ({exc})"
        if problem is not None:
            log.warning("cache entry %s is %s; recomputing", path, problem)
            path.unlink(missing_ok=True)
            return None
        return arr

    def put(self, kind: str, key: str, arr: np.ndarray) -> Path:
        path = self.path(kind, key)
        with atomic_path(path) as tmp, open(tmp, "wb") as fh:
            np.save(fh, np.ascontiguousarray(arr), allow_pickle=False)
        return path


def _valid_slices(arr: np.ndarray) -> bool:
    return arr.dtype == np.float32 and arr.ndim == 4 and arr.shape[1] == 3 and bool(np.isfinite(arr).all())


def _valid_feature(arr: np.ndarray) -> bool:
    return arr.dtype == np.float32 and arr.shape == (FEATURE_DIM,) and bool(np.isfinite(arr).all())


# ------------------------------------------------------------------------------------------- inputs


@dataclass(frozen=True)
class PatientInput:
    """One patient's network input: a content key and a way to (re)load the slices [S,3,H,W]."""

    patient_id: str
    key: str
    load: Callable[[], np.ndarray] = field(repr=False, compare=False)


def _progress(enabled: bool) -> Progress:
    return Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
        console=Console(stderr=True),
        disable=not enabled,
    )


def prepare_inputs(
    manifest: pd.DataFrame,
    config: PreprocessConfig,
    *,
    cache_dir: str | os.PathLike[str] | None = None,
    progress: bool = True,
) -> list[PatientInput]:
    """Preprocess every manifest row once (shared ``core.preprocessing``), caching the slices.

    With a cache the returned inputs load lazily from disk (memory stays flat for large cohorts);
    without one the slices are kept in memory.
    """
    _check_manifest(manifest)
    cache = ArrayCache(cache_dir) if cache_dir is not None else None
    config_json = config.model_dump(mode="json")
    inputs: list[PatientInput] = []
    computed = 0
    with _progress(progress) as bar:
        task = bar.add_task("preprocess", total=len(manifest))
        for row in manifest.itertuples(index=False):
            pid = str(row.patient_id)
            key = content_key(
                kind="slices", image=path_sha256(row.image), mask=path_sha256(row.mask), config=config_json
            )
            arr = cache.get("slices", key, check=_valid_slices) if cache else None
            if arr is None:
                arr = _preprocess_one(pid, row.image, row.mask, config)
                computed += 1
                if cache:
                    cache.put("slices", key, arr)
            if cache:
                inputs.append(PatientInput(pid, key, _loader(cache, key)))
            else:
                inputs.append(PatientInput(pid, key, lambda a=arr: a))
            bar.advance(task)
    log.info(
        "preprocessing: %d patients, %d computed, %d from cache",
        len(inputs),
        computed,
        len(inputs) - computed,
    )
    return inputs


def _loader(cache: ArrayCache, key: str) -> Callable[[], np.ndarray]:
    def load() -> np.ndarray:
        arr = cache.get("slices", key, check=_valid_slices)
        if arr is None:
            raise RuntimeError(f"preprocessed slices {key[:12]} vanished from the cache during the run")
        return arr

    return load


def _preprocess_one(pid: str, image: str, mask: str, config: PreprocessConfig) -> np.ndarray:
    try:
        slices = preprocess_files(image, mask, config).slices
    except InputError as exc:
        raise InputError(f"patient {pid!r}: {exc.problem}", source=exc.source, field=exc.field) from exc
    return np.ascontiguousarray(slices, dtype=np.float32)


def _check_manifest(manifest: pd.DataFrame) -> None:
    for col in REQUIRED_COLUMNS:
        if col not in manifest.columns:
            raise InputError(f"missing column (needs {', '.join(REQUIRED_COLUMNS)})", field=col)
    dup = manifest["patient_id"].astype(str)
    if dup.duplicated().any():
        raise InputError(
            f"duplicate patient ids {sorted(set(dup[dup.duplicated()]))[:5]}", field="patient_id"
        )


def iter_slice_batches(inputs: Sequence[PatientInput], batch_size: int) -> Iterator[torch.Tensor]:
    """All slices of ``inputs`` in order, in batches of ``batch_size`` (the last one may be smaller)."""
    pending: list[np.ndarray] = []
    n = 0
    for item in inputs:
        pending.append(item.load())
        n += len(pending[-1])
        while n >= batch_size:
            stacked = np.concatenate(pending)
            yield torch.from_numpy(stacked[:batch_size].copy())
            pending, n = [stacked[batch_size:]], n - batch_size
    if n:
        yield torch.from_numpy(np.concatenate(pending))


# --------------------------------------------------------------------------------------- extraction


def onnx_slice_net(extractor: nn.Module, *, image_size: int, threads: int) -> SliceNet:
    """The same extractor (same weights, after any BN re-estimation) as an ONNX Runtime CPU session.

    Why: ONNX Runtime runs ResNet-50 1.5-2.4x faster than torch eager on CPU (bench/graph.py), and it is
    the runtime the exported model is served with. Features agree with torch to ~1e-5.
    """
    import onnxruntime as ort

    buf = io.BytesIO()
    with torch.no_grad():
        torch.onnx.export(
            extractor.cpu().eval(),
            torch.zeros(2, 3, image_size, image_size),
            buf,
            input_names=["x"],
            output_names=["features"],
            dynamic_axes={"x": {0: "B"}, "features": {0: "B"}},
            opset_version=17,
            dynamo=False,
        )
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    session = ort.InferenceSession(buf.getvalue(), options, providers=["CPUExecutionProvider"])
    log.info("feature extraction through ONNX Runtime (CPUExecutionProvider, %d threads)", threads)

    def net(x: torch.Tensor) -> torch.Tensor:
        x = np.ascontiguousarray(x.cpu().numpy(), dtype=np.float32)
        return torch.from_numpy(session.run(None, {"x": x})[0])

    return net


def _net_key(net: nn.Module | SliceNet, weights_key: str | None) -> str:
    if weights_key is not None:
        return weights_key
    if isinstance(net, nn.Module):
        return state_dict_sha256(net)
    raise ValueError("weights_key is required when the net is not a torch module")


def extract_features(
    inputs: Sequence[PatientInput],
    net: nn.Module | SliceNet,
    *,
    batch_size: int = 16,
    cache_dir: str | os.PathLike[str] | None = None,
    progress: bool = True,
    weights_key: str | None = None,
    backend: str = "torch",
) -> np.ndarray:
    """Patient features ``[N,2048]`` float32: per-slice ``net`` outputs averaged over each patient's slices.

    ``net`` maps ``[B,3,H,W] -> [B,2048]`` (a ``ResNet50Extractor``, or any callable with ``weights_key``
    naming its weights). Slices of consecutive patients share batches; each patient's vector is cached as
    soon as it is computed.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    cache = ArrayCache(cache_dir) if cache_dir is not None else None
    wkey = _net_key(net, weights_key)
    keys = [content_key(kind="features", slices=item.key, weights=wkey, backend=backend) for item in inputs]
    out = np.zeros((len(inputs), FEATURE_DIM), dtype=np.float32)
    todo: list[int] = []
    for i, key in enumerate(keys):
        hit = cache.get("features", key, check=_valid_feature) if cache else None
        if hit is None:
            todo.append(i)
        else:
            out[i] = hit
    if isinstance(net, nn.Module):
        net.eval()
    start = time.perf_counter()
    with _progress(progress) as bar, torch.inference_mode():
        task = bar.add_task("features", total=len(inputs), completed=len(inputs) - len(todo))
        group: list[tuple[int, np.ndarray]] = []
        for pos, i in enumerate(todo):
            group.append((i, inputs[i].load()))
            if sum(len(s) for _, s in group) < batch_size and pos < len(todo) - 1:
                continue
            slices = torch.from_numpy(np.concatenate([s for _, s in group]))
            feats = torch.cat([net(slices[j : j + batch_size]) for j in range(0, len(slices), batch_size)])
            for (idx, _), f in zip(group, torch.split(feats, [len(s) for _, s in group])):
                vec = f.mean(dim=0).float().cpu().numpy()  # mean over S, as PatientFeatureNet
                out[idx] = vec
                if cache:
                    cache.put("features", keys[idx], vec)
                bar.advance(task)
            group = []
    elapsed = time.perf_counter() - start
    if todo:
        log.info(
            "features: %d patients computed in %.1f s (%.2f s/patient), %d from cache",
            len(todo),
            elapsed,
            elapsed / len(todo),
            len(inputs) - len(todo),
        )
    return out


# ------------------------------------------------------------------------------------ orchestration


@dataclass(frozen=True)
class FeatureExtraction:
    """What the study needs from this stage (see training.study)."""

    ids: list[str]
    features: np.ndarray  # [N,2048] float32, rows in manifest order
    weights_info: WeightsInfo
    state_dict: dict[str, torch.Tensor]  # the extractor state actually used (after any BN re-estimation)
    state_sha256: str
    preprocess_config: PreprocessConfig
    timings: dict[str, float]


def available_cpus() -> int:
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not on Linux
        return max(1, os.cpu_count() or 1)


def _bn_wanted(mode: str, info: WeightsInfo) -> bool:
    if mode not in {"auto", "on", "off"}:
        raise InputError(f"bn_recalibration must be auto, on or off, got {mode!r}", field="bn_recalibration")
    wanted = mode == "on" or (mode == "auto" and info.kind == "random")
    if info.kind == "random" and not wanted:
        log.warning(
            "random weights WITHOUT batch-norm re-estimation: activations are not normalised and the "
            "features are close to degenerate; set bn_recalibration to 'auto' or 'on'"
        )
    return wanted


def _recalibrate_cached(
    extractor: ResNet50Extractor,
    info: WeightsInfo,
    train_inputs: Sequence[PatientInput],
    *,
    batch_size: int,
    cache_dir: str | os.PathLike[str] | None,
    device: torch.device,
) -> dict[str, Any]:
    """BN re-estimation on the training slices, or its cached result (same weights, slices, batching)."""
    key = content_key(
        kind="bn",
        weights=info.sha256,
        slices=[item.key for item in train_inputs],
        batch_size=batch_size,
        memory_format="channels_last",
        device=device.type,
    )
    path = Path(cache_dir) / "bn" / f"{key}.pt" if cache_dir is not None else None
    if path is not None and path.exists():
        try:
            saved = torch.load(path, map_location=device, weights_only=True)
            extractor.load_state_dict(saved["state_dict"], strict=True)
            if state_dict_sha256(extractor) != saved["state_sha256"]:
                raise ValueError("state hash mismatch")
            log.info("batch-norm statistics re-estimated earlier on the same slices: loaded from %s", path)
            return {**saved["details"], "from_cache": True}
        except Exception as exc:  # corrupt entry: recompute from the untouched initial weights below
            log.warning("BN cache entry %s unusable (%s); recomputing", path, exc)
            path.unlink(missing_ok=True)
            extractor.load_state_dict(_initial_state(info), strict=True)
    details = recalibrate_batchnorm(
        extractor,
        (
            b.contiguous(memory_format=torch.channels_last)
            for b in iter_slice_batches(train_inputs, batch_size)
        ),
    )
    details = {
        **details,
        "n_patients": len(train_inputs),
        "cohort": TRAINING_COHORT,
        "batch_size": batch_size,
    }
    if path is not None:
        buf = io.BytesIO()
        torch.save(
            {
                "state_dict": extractor.state_dict(),
                "state_sha256": state_dict_sha256(extractor),
                "details": details,
            },
            buf,
        )
        with atomic_path(path) as tmp:
            tmp.write_bytes(buf.getvalue())
    return {**details, "from_cache": False}


def _subsample(train_inputs: list[PatientInput], max_slices: int | None) -> list[PatientInput]:
    """Evenly spaced training patients whose slices stay within ``max_slices`` (deterministic)."""
    if max_slices is None:
        return train_inputs
    per_patient = max(1, len(train_inputs[0].load())) if train_inputs else 1
    keep = max(1, max_slices // per_patient)
    if keep >= len(train_inputs):
        return train_inputs
    idx = np.unique(np.round(np.linspace(0, len(train_inputs) - 1, keep)).astype(int))
    return [train_inputs[i] for i in idx]


def _initial_state(info: WeightsInfo) -> dict[str, torch.Tensor]:
    return build_extractor(info.spec, seed=info.seed or 0)[0].state_dict()


def run_feature_extraction(
    manifest: pd.DataFrame,
    preprocess_config: PreprocessConfig,
    *,
    weights: str,
    seed: int = 0,
    training_ids: Sequence[str] | None = None,
    bn_recalibration: Literal["auto", "on", "off"] = "auto",
    batch_size: int = 16,
    backend: Backend = "torch",
    cache_dir: str | os.PathLike[str] | None = None,
    progress: bool = True,
    num_threads: int | None = None,
    device: str = "auto",
    bn_max_slices: int | None = None,
) -> FeatureExtraction:
    """The feature stage of the study, leakage-free: BN statistics (when re-estimated) come from the
    training patients only (``training_ids``, default: rows whose cohort is 'training').

    ``backend``: "torch" (eager) or "onnx" (ONNX Runtime on CPU, see `onnx_slice_net`; BN re-estimation
    stays in torch). ``device``: "auto" = CUDA when available, else CPU (with ``num_threads``, default all
    available cores).
    ``bn_max_slices`` caps the BN pass (evenly spaced training patients, deterministic) to save time on
    large cohorts; None uses every training slice.
    """
    if backend not in ("torch", "onnx"):
        raise InputError(f"feature extraction backend {backend!r}: use 'torch' or 'onnx'", field="backend")
    threads = num_threads or available_cpus()
    torch.set_num_threads(threads)
    dev = torch.device(
        "cuda" if device == "auto" and torch.cuda.is_available() else device.replace("auto", "cpu")
    )
    timings: dict[str, float] = {}
    _check_manifest(manifest)
    extractor, info = build_extractor(weights, seed=seed)
    extractor = extractor.to(dev, memory_format=torch.channels_last)  # ~20 % faster convolutions on CPU
    recalibrate = _bn_wanted(bn_recalibration, info)
    if training_ids is None:
        training_ids = manifest.loc[manifest["cohort"].astype(str) == TRAINING_COHORT, "patient_id"]
    wanted = {str(p) for p in training_ids}
    if recalibrate and not wanted & set(manifest["patient_id"].astype(str)):
        raise InputError("no training-cohort patients for batch-norm re-estimation", field="cohort")

    t0 = time.perf_counter()
    inputs = prepare_inputs(manifest, preprocess_config, cache_dir=cache_dir, progress=progress)
    timings["preprocess_s"] = time.perf_counter() - t0
    if recalibrate:
        train_inputs = _subsample([item for item in inputs if item.patient_id in wanted], bn_max_slices)
        t0 = time.perf_counter()
        details = _recalibrate_cached(
            extractor, info, train_inputs, batch_size=batch_size, cache_dir=cache_dir, device=dev
        )
        details = {**details, "n_training_patients": len(wanted & {i.patient_id for i in inputs})}
        timings["bn_recalibration_s"] = time.perf_counter() - t0
        info = info.model_copy(
            update={"bn_recalibrated": True, "details": {**info.details, "bn_recalibration": details}}
        )
    state_sha = state_dict_sha256(extractor)

    def net(x: torch.Tensor) -> torch.Tensor:
        return extractor(x.to(dev).contiguous(memory_format=torch.channels_last))

    if backend == "onnx" and dev.type != "cpu":
        log.warning("feature backend 'onnx' runs on the CPU provider only; using torch on %s instead", dev)
        backend = "torch"
    if backend == "onnx":
        net = onnx_slice_net(extractor, image_size=preprocess_config.size, threads=threads)

    t0 = time.perf_counter()
    features = extract_features(
        inputs,
        net,
        batch_size=batch_size,
        cache_dir=cache_dir,
        progress=progress,
        weights_key=state_sha,
        backend=f"{backend}-{dev.type}",  # GPU and CPU kernels round differently: separate entries
    )
    timings["extract_s"] = time.perf_counter() - t0
    timings["threads"] = float(threads)
    timings["extract_s_per_patient"] = timings["extract_s"] / max(1, len(inputs))
    log.info("feature stage timings: %s", {k: round(v, 2) for k, v in timings.items()})
    state = {k: v.detach().cpu().contiguous().clone() for k, v in extractor.state_dict().items()}
    return FeatureExtraction(
        ids=[item.patient_id for item in inputs],
        features=features,
        weights_info=info.model_copy(
            update={"details": {**info.details, "device": dev.type, "extraction_backend": backend}}
        ),
        state_dict=state,
        state_sha256=state_sha,
        preprocess_config=preprocess_config,
        timings={k: round(v, 3) for k, v in timings.items()},
    )


def extract_cohort_features(
    cohort: pd.DataFrame,
    config: Any,
    *,
    cache_dir: str | os.PathLike[str] | None = None,
    progress: bool = True,
) -> FeatureExtraction:
    """``run_feature_extraction`` driven by a ``training.config.StudyConfig``."""
    fc = config.features
    return run_feature_extraction(
        cohort,
        config.preprocessing,
        weights=fc.weights,
        seed=config.seed,
        bn_recalibration=fc.bn_recalibration,
        batch_size=fc.batch_size,
        backend=fc.backend,
        cache_dir=cache_dir,
        progress=progress,
        bn_max_slices=getattr(fc, "bn_max_slices", None),
        device=getattr(fc, "device", "auto"),
    )
