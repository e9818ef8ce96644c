"""Shared benchmark plumbing: machine description, interleaved timing, JSON results, model parts.

Why interleaved timing: the CPUs are shared with other work, so the load changes over a run. Timing the
candidates round-robin (A, B, C, A, B, C, ...) exposes each to the same load, which keeps the RATIOS
meaningful even when absolute numbers drift; the load average before and after is recorded with them.
"""

from __future__ import annotations

import json
import logging
import os
import platform
import random
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    from core.preprocessing import PreprocessConfig

log = logging.getLogger(__name__)

ROOT = Path(__file__).resolve().parents[1]
RESULTS_DIR = ROOT / "bench" / "results"
TRAINING_COHORT = "training"
# Study-like feature columns for the random-weights head (12 selected features, as in the paper).
RANDOM_HEAD_FEATURES = np.array([3, 77, 150, 301, 512, 640, 777, 1024, 1200, 1500, 1800, 2047])


# ------------------------------------------------------------------------------------------- machine


def cpu_model() -> str:
    """CPU model name from /proc/cpuinfo (Linux), else platform.processor()."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def cpu_flags(
    wanted: Sequence[str] = ("avx2", "avx512f", "avx512_vnni", "avx_vnni", "amx_int8"),
) -> list[str]:
    """The SIMD features that decide int8/fp32 kernel speed (VNNI for int8 dot products)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                have = set(line.split(":", 1)[1].split())
                return [f for f in wanted if f in have]
    except OSError:
        pass
    return []


def load_average() -> list[float] | None:
    try:
        return [round(v, 2) for v in os.getloadavg()]
    except OSError:
        return None


def _version(pkg: str) -> str | None:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(pkg)
    except PackageNotFoundError:
        return None


def machine_info() -> dict[str, Any]:
    """What the numbers were measured on (named in BENCHMARKS.md)."""
    try:
        usable = len(os.sched_getaffinity(0))
    except AttributeError:
        usable = os.cpu_count()
    return {
        "cpu_model": cpu_model(),
        "cpu_flags": cpu_flags(),
        "logical_cpus": os.cpu_count(),
        "usable_cpus": usable,
        "load_average_1_5_15": load_average(),
        "python": platform.python_version(),
        "torch": _version("torch"),
        "onnxruntime": _version("onnxruntime-gpu") or _version("onnxruntime"),
        "onnx": _version("onnx"),
        "numpy": _version("numpy"),
        "SimpleITK": _version("SimpleITK"),
    }


def set_threads(threads: int | None) -> int:
    """Give torch the same intra-op thread count ONNX Runtime sessions get (fair comparison)."""
    import torch

    n = threads or os.cpu_count() or 1
    torch.set_num_threads(n)
    return n


# -------------------------------------------------------------------------------------------- timing


def interleaved(
    candidates: dict[str, Callable[[], Any]],
    *,
    repeats: int,
    warmup: int = 1,
    budget_s: float | None = None,
    min_repeats: int = 1,
    seed: int = 0,
) -> dict[str, list[float]]:
    """Seconds per call of each candidate, timed in rounds (every candidate once per round, in a seeded
    random order that changes every round); stops after ``budget_s`` (once every candidate has
    ``min_repeats`` timings). Warm-up calls (allocation, kernel selection) are not timed.

    Why shuffle: a call pays for what ran just before it (ONNX Runtime's and OpenMP's worker threads keep
    spinning for a while after their work). In a fixed cycle the in-graph CAM graph always followed the
    plain graph's call and looked 18-25 % slower at 1 patient; a changing order spreads that cost.
    """
    for fn in candidates.values():
        for _ in range(warmup):
            fn()
    names = list(candidates)
    times: dict[str, list[float]] = {name: [] for name in names}
    rng = random.Random(seed)
    t_start = time.perf_counter()
    for r in range(repeats):
        order = names if r == 0 else rng.sample(names, len(names))
        for name in order:
            t0 = time.perf_counter()
            candidates[name]()
            times[name].append(time.perf_counter() - t0)
        if budget_s is not None and r + 1 >= min_repeats and time.perf_counter() - t_start > budget_s:
            log.info("timing budget %.0f s reached after %d repeats", budget_s, r + 1)
            break
    return times


def stats(seconds: Sequence[float]) -> dict[str, Any]:
    a = np.asarray(seconds, dtype=np.float64)
    return {
        "n": len(a),
        "median_s": round(float(np.median(a)), 5),
        "min_s": round(float(a.min()), 5),
        "mean_s": round(float(a.mean()), 5),
    }


# ------------------------------------------------------------------------------------------- results


def result_header(name: str, started: str, machine: dict[str, Any]) -> dict[str, Any]:
    """The fields every results JSON starts with: what ran, when, where, and the load at the end."""
    return {
        "benchmark": name,
        "started": started,
        "finished": now(),
        "machine": machine,
        "load_average_end": load_average(),
    }


def print_targets(targets: Sequence[dict[str, Any]]) -> None:
    """One line per target check: PASS / FAIL / n/a (not measured in this run)."""
    for t in targets:
        flag = {True: "PASS", False: "FAIL", None: "n/a"}[t["passed"]]
        print(f"  [{flag}] {t['what']}: {t['value']} ({t['op']} {t['threshold']})")


def _jsonable(obj: Any) -> Any:
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    if isinstance(obj, Path):
        return str(obj)
    raise TypeError(f"not JSON serialisable: {type(obj).__name__}")


def now() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")


def write_result(name: str, payload: dict[str, Any], out_dir: Path | None = None) -> Path:
    """Write ``<out_dir>/<name>.json`` (atomically: a half-written file would break the renderer)."""
    out = Path(out_dir) if out_dir is not None else RESULTS_DIR
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"{name}.json"
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(payload, indent=2, default=_jsonable) + "\n")
    tmp.replace(path)
    log.info("wrote %s", path)
    return path


def target(value: float | None, op: str, threshold: float, what: str) -> dict[str, Any]:
    """A target check recorded next to the number (``passed`` is None when not measured)."""
    passed = None if value is None else bool(value >= threshold if op == ">=" else value <= threshold)
    return {"what": what, "value": value, "op": op, "threshold": threshold, "passed": passed}


# ------------------------------------------------------------------------------------- model parts


def synthetic_slices(n: int, s: int, *, seed: int, size: int = 224) -> np.ndarray:
    """Structured ``[n,s,3,size,size]`` network inputs (Gaussian blobs + noise, ImageNet-normalised range):
    activations then look like images rather than white noise, which matters for int8 calibration."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:size, :size].astype(np.float32)
    out = np.empty((n, s, 3, size, size), np.float32)
    for i in range(n):
        for j in range(s):
            img = np.zeros((size, size), np.float32)
            for _ in range(int(rng.integers(1, 5))):
                cy, cx = rng.uniform(0.2, 0.8, 2) * size
                r, a = rng.uniform(0.05, 0.25) * size, rng.uniform(0.3, 2.0)
                img += a * np.exp(-((yy - cy) ** 2 + (xx - cx) ** 2) / (2 * r * r))
            img += rng.normal(0, rng.uniform(0.02, 0.3), img.shape).astype(np.float32)
            out[i, j] = (img - 0.5) / 0.5
    return out


@dataclass
class EvalSet:
    """The run's patients with the study's own (torch eager) probabilities, for agreement and AUC."""

    ids: np.ndarray
    slices: np.ndarray  # [N,S,3,H,W]
    labels: np.ndarray
    cohorts: np.ndarray
    reference: np.ndarray  # P(class 1) from the run's features.npz (what the study computed)
    features: np.ndarray | None = None  # the study's selected raw features [N,K] (features.npz)


@dataclass
class ModelParts:
    """Everything a benchmark needs to build the graph and the torch paths."""

    source: str  # "run:<dir>" or "random (seed N)"
    extractor: Any  # core.network.ResNet50Extractor, eval mode
    indices: np.ndarray
    pipeline: Any  # fitted sklearn Pipeline on the raw selected features
    linear: Any  # export.graph.LinearHead | None
    n_slices: int
    image_size: int
    calibration: np.ndarray  # training-cohort slices [n,S,3,H,W] for int8
    eval_set: EvalSet | None = None
    # the run's preprocessing (window, mean/std that made eval_set.slices); None for random weights,
    # whose synthetic slices are not windowed images
    preprocess: PreprocessConfig | None = None

    def torch_probability(self, slices: np.ndarray) -> np.ndarray:
        """Reference: PatientFeatureNet (torch eager fp32) + the sklearn head (float64)."""
        import torch

        from core.network import PatientFeatureNet
        from export.graph import positive_class_index

        with torch.inference_mode():
            feats = PatientFeatureNet(self.extractor)(torch.from_numpy(slices)).numpy()
        col = positive_class_index(self.pipeline.steps[-1][1])
        return self.pipeline.predict_proba(feats[:, self.indices].astype(np.float64))[:, col]

    def torch_logit_fn(self) -> Callable[[Any], Any]:
        """Differentiable logit of the pooled features for Grad-CAM (linear heads only)."""
        import torch

        if self.linear is None:
            raise ValueError("Grad-CAM of a torch logit needs a linear head")
        idx = torch.as_tensor(self.indices)
        w = torch.as_tensor(self.linear.weight, dtype=torch.float32)
        b = float(self.linear.bias)
        return lambda feats: feats[:, idx] @ w + b


def _linear_of(model: Any, x_train: np.ndarray) -> Any:
    from export.graph import LinearHead, linear_logit_head

    if getattr(model, "is_linear", False) and hasattr(model, "linear_coef"):
        w, b = model.linear_coef("raw")
        return LinearHead(weight=np.asarray(w, dtype=np.float64), bias=float(b))
    return linear_logit_head(model.pipeline, x_train)


def parts_from_run(
    run_dir: str | os.PathLike[str], *, calibration_patients: int = 8, eval_patients: int | None = None
) -> ModelParts:
    """Extractor, head and slices of a finished `pdl1 study run` (through the export code's readers).

    ``eval_patients=None`` takes every patient of the run (all cohorts) for agreement and per-cohort AUC;
    the reference probabilities are the run's own (features.npz), i.e. what the study's torch path gave.
    """
    from core.preprocessing import PreprocessConfig
    from export.build import load_extractor, load_validation_inputs, read_run
    from export.graph import positive_class_index

    run = read_run(run_dir)
    idx = np.asarray(run.model.feature_indices, dtype=np.int64)
    train = run.cohorts == TRAINING_COHORT
    linear = _linear_of(run.model, run.X[train][:, idx])
    pre = run.preprocess
    train_ids = run.ids[train]
    calib_ids = list(train_ids[:: max(1, len(train_ids) // calibration_patients)][:calibration_patients])
    eval_ids = list(run.ids if eval_patients is None else _spread(run, eval_patients))
    wanted = list(dict.fromkeys(calib_ids + eval_ids))
    inputs = load_validation_inputs(run.run_dir, patient_ids=wanted, run=run)
    by_id = {pid: i for i, pid in enumerate(inputs.ids)}
    calibration = inputs.slices[[by_id[p] for p in calib_ids]]
    rows = [by_id[p] for p in eval_ids]
    pos = {pid: i for i, pid in enumerate(run.ids)}
    col = positive_class_index(run.model.pipeline.steps[-1][1])
    x_eval = run.X[[pos[p] for p in eval_ids]][:, idx].astype(np.float64)
    eval_set = EvalSet(
        ids=np.asarray(eval_ids),
        slices=inputs.slices[rows],
        labels=inputs.labels[rows],
        cohorts=inputs.cohorts[rows],
        reference=run.model.pipeline.predict_proba(x_eval)[:, col],
        features=x_eval,
    )
    return ModelParts(
        source=f"run:{run.run_dir} (run_id {run.run_id}, head {run.model.model_name})",
        extractor=load_extractor(run.run_dir),
        indices=idx,
        pipeline=run.model.pipeline,
        linear=linear,
        n_slices=int(pre.get("n_slices", 3)),
        image_size=int(pre.get("size", 224)),
        calibration=calibration,
        eval_set=eval_set,
        preprocess=PreprocessConfig.model_validate(pre),
    )


def _spread(run: Any, n: int) -> list[str]:
    """Up to ``n`` patients, round-robin over cohorts (every cohort represented)."""
    by_cohort = {c: list(run.ids[run.cohorts == c]) for c in sorted(set(run.cohorts.tolist()))}
    out: list[str] = []
    while len(out) < n and any(by_cohort.values()):
        for ids in by_cohort.values():
            if ids and len(out) < n:
                out.append(ids.pop(0))
    return out


def random_parts(
    *, seed: int = 0, n_slices: int = 3, image_size: int = 224, n_patients: int = 8
) -> ModelParts:
    """Random-weight ResNet-50 with batch-norm statistics re-estimated on synthetic slices (so activations
    are sane, as the study does for random weights) and a logistic-regression head fitted on its features."""
    import torch
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import Pipeline
    from sklearn.preprocessing import StandardScaler

    from core.network import PatientFeatureNet, build_extractor, recalibrate_batchnorm

    extractor, _ = build_extractor("random", seed=seed)
    bn = synthetic_slices(2, n_slices, seed=seed + 99, size=image_size)
    recalibrate_batchnorm(extractor, [torch.from_numpy(bn.reshape(-1, 3, image_size, image_size))])
    slices = synthetic_slices(n_patients, n_slices, seed=seed + 1, size=image_size)
    with torch.inference_mode():
        pooled = PatientFeatureNet(extractor.eval())(torch.from_numpy(slices)).numpy()
    labels = np.arange(n_patients) % 2
    idx = RANDOM_HEAD_FEATURES
    pipe = Pipeline([("scaler", StandardScaler()), ("clf", LogisticRegression(C=0.05, max_iter=5000))])
    pipe.fit(pooled[:, idx], labels)
    from export.graph import linear_logit_head

    return ModelParts(
        source=f"random (seed {seed}; synthetic slices)",
        extractor=extractor.eval(),
        indices=idx,
        pipeline=pipe,
        linear=linear_logit_head(pipe, pooled[:, idx]),
        n_slices=n_slices,
        image_size=image_size,
        calibration=slices,
    )


def load_parts(
    run_dir: str | os.PathLike[str] | None,
    *,
    quick: bool = False,
    image_size: int = 224,
    eval_patients: int | None = None,
) -> ModelParts:
    if run_dir:
        return parts_from_run(
            run_dir,
            calibration_patients=2 if quick else 8,
            eval_patients=eval_patients if eval_patients is not None else (4 if quick else None),
        )
    return random_parts(image_size=image_size, n_patients=4 if quick else 8)


# ------------------------------------------------------------------------------------------- graphs


class GraphCache:
    """ONNX graphs built once per process through the export code and shared by the benchmarks
    (building and quantising ResNet-50 costs tens of seconds on this CPU)."""

    def __init__(self, parts: ModelParts, workdir: Path) -> None:
        self.parts = parts
        self.workdir = Path(workdir)
        self.workdir.mkdir(parents=True, exist_ok=True)
        self._built: dict[bool, Any] = {}
        self._paths: dict[tuple[str, bool], Path] = {}
        self._trunk_paths: dict[tuple[str, bool], Path] = {}
        self.build_seconds: dict[str, float] = {}
        self.notes: dict[str, str] = {}

    def built(self, cam: bool) -> Any:
        """export.graph.BuiltGraph with a dynamic S axis (any [N,S] input), with or without the CAM."""
        from export.graph import build_graph

        if cam and self.parts.linear is None:
            raise ValueError("the head is not linear: no in-graph CAM")
        if cam not in self._built:
            t0 = time.perf_counter()
            self._built[cam] = build_graph(
                self.parts.extractor,
                self.parts.indices,
                self.parts.pipeline,
                linear=self.parts.linear if cam else None,
                image_size=self.parts.image_size,
                slices=None,
            )
            self.build_seconds[f"fp32{'+cam' if cam else ''}"] = round(time.perf_counter() - t0, 2)
        return self._built[cam]

    def path(self, variant: str, *, cam: bool) -> Path:
        """Path of the variant ('fp32', 'fp16', 'int8-u8s8', 'int8-s8s8'); built on first use."""
        import onnx

        from export.graph import save_model

        key = (variant, cam)
        if key in self._paths:
            return self._paths[key]
        built = self.built(cam)
        name = f"{variant}{'_cam' if cam else ''}.onnx"
        out = self.workdir / name
        t0 = time.perf_counter()
        if variant == "fp32":
            trunk: onnx.ModelProto = built.trunk
        elif variant == "fp16":
            from export.variants import to_fp16

            trunk = to_fp16(built.trunk)
        elif variant.startswith("int8-"):
            from export.variants import SliceCalibrationReader, to_int8

            reader = SliceCalibrationReader(self.parts.calibration, batch_size=1)
            cache = self.workdir / f"calibration{'_cam' if cam else ''}.json"
            trunk = to_int8(built.trunk, reader, types=variant.split("-", 1)[1], cache_path=cache)
        else:
            raise ValueError(f"unknown variant {variant!r}")
        save_model(built.model if variant == "fp32" else built.merge(trunk), str(out))
        self.build_seconds[name] = round(time.perf_counter() - t0, 2)
        self._paths[key] = out
        self._trunk_paths[key] = out.with_name(f"{out.stem}_trunk.onnx")
        onnx.save_model(trunk, str(self._trunk_paths[key]))
        return out

    def trunk_session(self, variant: str, *, cam: bool, threads: int | None = None) -> Any:
        """The variant's trunk alone (slices -> selected raw features [N,K]): separates the precision's
        effect on the features from the head's sensitivity to it."""
        self.path(variant, cam=cam)
        return self._session(self._trunk_paths[(variant, cam)], threads)

    def session(self, variant: str, *, cam: bool, threads: int | None = None) -> Any:
        return self._session(self.path(variant, cam=cam), threads)

    @staticmethod
    def _session(path: Path, threads: int | None) -> Any:
        import onnxruntime as ort

        opts = ort.SessionOptions()
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        if threads:
            opts.intra_op_num_threads = threads
        return ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
