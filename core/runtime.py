"""Load an exported model for inference: verify it, open ONE ONNX Runtime session, predict, explain.

``InferenceModel.load(dir)`` checks the SHA-256 of every file listed in ``manifest.json`` (a modified
graph raises :class:`~core.errors.IntegrityError`), then builds one session with the CUDA provider when
one is requested and available, else the CPU provider. A CPU fallback when CUDA was requested is logged at
WARNING and visible as ``.provider`` / ``.fallback``.

Default variant (overridable with ``variant=``): ``fp16`` when CUDA is active and fp16 was published,
``int8`` on CPU when int8 was published, else ``fp32``. fp16 needs tensor cores to pay off and has no fast
CPU kernels; static int8 QDQ is fast on CPU (VNNI) but not on the CUDA provider.

``gradcam`` is a torch path (GPU when torch sees one) on ``extractor.pt``: Grad-CAM of the logit for
linear heads (weights from ``head.npz``), Ablation-CAM through ``head.onnx`` for heads that are not
differentiable (trees, k-NN, kernel SVM). No pickles are loaded: the head travels as arrays and ONNX.

This module imports only ``core`` (the service depends on it; training/export must not be needed).
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np

from core.errors import InputError
from core.manifest import MANIFEST_NAME, ModelManifest, verify_files

log = logging.getLogger(__name__)

CUDA = "CUDAExecutionProvider"
CPU = "CPUExecutionProvider"
EXTRACTOR_FILE = "extractor.pt"
HEAD_ARRAYS_FILE = "head.npz"
HEAD_ONNX_FILE = "head.onnx"
ENV_THREADS = "PDL1_ORT_THREADS"

ProviderSpec = str | tuple[str, dict[str, Any]]


def cuda_provider_options(
    device_id: int = 0,
    *,
    conv_algo_search: str = "EXHAUSTIVE",
    arena_extend_strategy: str = "kSameAsRequested",
    use_tf32: bool = False,
) -> dict[str, Any]:
    """CUDA provider options.

    TF32 is off by default: the fp32 graph must match the CPU/torch reference (1e-4 on probabilities), and
    TF32 convolutions moved ResNet-50 Grad-CAM maps by up to 0.25 in torch on an H200 (see ``_no_tf32``).

    EXHAUSTIVE benchmarks cuDNN algorithms once per input shape (slow first call per batch size, fastest
    after; ``warmup`` can pay it up front); HEURISTIC avoids that when batch sizes vary a lot.
    kSameAsRequested keeps the arena from doubling past what the batches need.
    """
    return {
        "device_id": device_id,
        "arena_extend_strategy": arena_extend_strategy,
        "cudnn_conv_algo_search": conv_algo_search,
        "do_copy_in_default_stream": True,
        "use_tf32": int(use_tf32),
    }


def default_providers(device_id: int = 0) -> list[ProviderSpec]:
    """CUDA (with options) then CPU when this onnxruntime build has CUDA; else CPU only."""
    import onnxruntime as ort

    if CUDA in ort.get_available_providers():
        return [(CUDA, cuda_provider_options(device_id)), CPU]
    return [CPU]


def _provider_name(spec: ProviderSpec) -> str:
    return spec if isinstance(spec, str) else spec[0]


def _resolve_dir(path_or_dir: str | os.PathLike[str]) -> Path:
    path = Path(path_or_dir)
    if path.is_file() and path.name == MANIFEST_NAME:
        return path.parent
    if path.is_dir():
        return path
    raise InputError("not an export directory or manifest.json", source=str(path), field="model")


class InferenceModel:
    """A verified export plus one ONNX Runtime session. Build with :meth:`load`."""

    def __init__(
        self,
        root: Path,
        manifest: ModelManifest,
        session: Any,
        variant: str,
        *,
        requested_providers: list[str],
        fallback: str | None,
    ) -> None:
        self.root = root
        self.manifest = manifest
        self.session = session
        self.variant = variant
        self.requested_providers = requested_providers
        self.fallback = fallback  # why CUDA was requested but not used (None when not applicable)
        self._output_names = [o.name for o in session.get_outputs()]
        self._torch_path: _TorchPath | None = None
        size = int(manifest.preprocess.get("size", 224))
        s = manifest.input_shape[1]
        self._expected = (s if isinstance(s, int) else None, 3, size, size)

    # ---------------------------------------------------------------------------------------- loading

    @classmethod
    def load(
        cls,
        path_or_dir: str | os.PathLike[str],
        *,
        variant: str | None = None,
        providers: Sequence[ProviderSpec] | None = None,
        intra_op_threads: int | None = None,
    ) -> InferenceModel:
        """Verify every file hash, pick the variant, open the session (see the module docstring)."""
        import onnxruntime as ort

        root = _resolve_dir(path_or_dir)
        manifest = ModelManifest.read(root / MANIFEST_NAME)
        verify_files(root, manifest.files)
        published = manifest.published_variants
        if variant is not None and variant not in published:
            raise InputError(f"variant {variant!r} is not published; available: {published}", field="variant")
        specs = list(providers) if providers is not None else default_providers()
        # a bare "CUDAExecutionProvider" gets our options (TF32 off, cuDNN search): ORT's defaults differ
        specs = [(CUDA, cuda_provider_options()) if p == CUDA else p for p in specs]
        names = [_provider_name(p) for p in specs]
        wants_cuda = CUDA in names
        chosen = variant or _default_variant(published, cuda=wants_cuda)
        threads = intra_op_threads or int(os.environ.get(ENV_THREADS, "0") or 0)
        session = make_session(root / manifest.variants[chosen].file, specs, threads)
        fallback = None
        if wants_cuda and session.get_providers()[0] != CUDA:
            fallback = (
                f"CUDA was requested but onnxruntime is running on {session.get_providers()[0]} "
                f"(available: {ort.get_available_providers()}; no usable GPU/CUDA libraries)"
            )
            log.warning("%s; variant %s", fallback, chosen)
            if variant is None and chosen != _default_variant(published, cuda=False):
                chosen = _default_variant(published, cuda=False)
                log.warning("falling back to the CPU default variant %s", chosen)
                session = make_session(root / manifest.variants[chosen].file, [CPU], threads)
        model = cls(root, manifest, session, chosen, requested_providers=names, fallback=fallback)
        log.info("loaded %s:%s variant %s on %s", manifest.name, manifest.version, chosen, model.provider)
        return model

    # ------------------------------------------------------------------------------------- properties

    @property
    def provider(self) -> str:
        """The execution provider actually running the graph (first of session.get_providers())."""
        return self.session.get_providers()[0]

    @property
    def tag(self) -> str:
        return f"{self.manifest.name}:{self.manifest.version}"

    @property
    def threshold(self) -> float:
        return self.manifest.threshold

    @property
    def has_graph_cam(self) -> bool:
        return self.manifest.has_graph_cam

    @property
    def preprocess_config(self) -> Any:
        """The training-time ``core.preprocessing.PreprocessConfig`` (imported lazily: SimpleITK is heavy)."""
        from core.preprocessing import PreprocessConfig

        return PreprocessConfig.model_validate(self.manifest.preprocess)

    @property
    def gradcam_method(self) -> str:
        """Label of what :meth:`gradcam` computes for this head."""
        from core.cam import ABLATION_CAM_LABEL, GRADCAM_LABEL

        return GRADCAM_LABEL if self.manifest.head.type == "linear" else ABLATION_CAM_LABEL

    # ------------------------------------------------------------------------------------- inference

    def check_slices(self, slices: Any) -> np.ndarray:
        """Validate the network input: float32 ndarray [N,S,3,size,size], finite; InputError otherwise."""
        if not isinstance(slices, np.ndarray):
            raise InputError(f"expected a numpy array, got {type(slices).__name__}", field="slices")
        if slices.dtype != np.float32:
            raise InputError(f"expected dtype float32, got {slices.dtype}", field="slices")
        s, c, h, w = self._expected
        shape = slices.shape
        if slices.ndim != 5 or shape[0] < 1 or shape[2:] != (c, h, w) or (s is not None and shape[1] != s):
            want = f"[N>=1, {s if s is not None else 'S'}, {c}, {h}, {w}]"
            raise InputError(f"expected shape {want}, got {list(shape)}", field="slices")
        if not np.isfinite(slices).all():
            raise InputError("contains NaN or infinite values", field="slices")
        return np.ascontiguousarray(slices)

    def predict(self, slices: np.ndarray) -> dict[str, np.ndarray]:
        """``{"probability": [N]}`` plus ``"cam": [N,S,h,w]`` (logit units, signed) when the graph has one."""
        x = self.check_slices(slices)
        if self.provider == CUDA:
            outputs = self._run_bound(x, "cuda")
        else:
            outputs = dict(zip(self._output_names, self.session.run(self._output_names, {"slices": x})))
        return {name: np.asarray(outputs[name]) for name in self._output_names}

    def _run_bound(self, x: np.ndarray, device: str = "cuda") -> dict[str, np.ndarray]:
        """IO binding: the input is copied once to ``device``, outputs land in pre-allocated buffers there.

        Used on CUDA (``predict``); the same code runs with ``device="cpu"`` so it is testable anywhere.
        """
        import onnxruntime as ort

        options = self.session.get_provider_options().get(CUDA, {}) if device == "cuda" else {}
        device_id = int(options.get("device_id", 0) or 0)
        binding = self.session.io_binding()
        binding.bind_ortvalue_input("slices", ort.OrtValue.ortvalue_from_numpy(x, device, device_id))
        buffers = {}
        for name in self._output_names:
            dims = [x.shape[0], *(x.shape[1] if d == "S" else d for d in self.manifest.outputs[name][1:])]
            buffers[name] = ort.OrtValue.ortvalue_from_shape_and_type(dims, np.float32, device, device_id)
            binding.bind_ortvalue_output(name, buffers[name])
        self.session.run_with_iobinding(binding)
        return {name: value.numpy() for name, value in buffers.items()}

    def warmup(self, batch_sizes: Sequence[int] = (1,)) -> float:
        """Run zero inputs once per batch size (allocates arenas, tunes cuDNN); returns seconds taken."""
        s, c, h, w = self._expected
        t0 = time.perf_counter()
        for n in batch_sizes:
            self.predict(np.zeros((n, s or 1, c, h, w), dtype=np.float32))
        return time.perf_counter() - t0

    def gradcam(self, slices: np.ndarray, *, normalize: str = "patient") -> np.ndarray:
        """Per-slice maps ``[N,S,size,size]`` in [0, 1] from the torch path (see :attr:`gradcam_method`)."""
        x = self.check_slices(slices)
        if self._torch_path is None:
            self._torch_path = _TorchPath(self.root, self.manifest)
        return self._torch_path.cams(x, normalize=normalize)


def _default_variant(published: list[str], *, cuda: bool) -> str:
    if cuda and "fp16" in published:
        return "fp16"
    if not cuda and "int8" in published:
        return "int8"
    if "fp32" not in published:
        raise InputError(f"the export publishes no usable variant (published: {published})", field="variants")
    return "fp32"


def make_session(path: Path, providers: Sequence[ProviderSpec], threads: int = 0) -> Any:
    """One ORT session: graph optimisation ALL, ``threads`` intra-op threads (0: ORT's default)."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    if threads > 0:
        opts.intra_op_num_threads = threads
    names = [_provider_name(p) for p in providers]
    options = [{} if isinstance(p, str) else dict(p[1]) for p in providers]
    return ort.InferenceSession(str(path), sess_options=opts, providers=names, provider_options=options)


@contextmanager
def _no_tf32() -> Iterator[None]:
    """Full fp32 convolutions/matmuls for the Grad-CAM pass on GPU.

    Why: torch lets cuDNN use TF32 by default; through ResNet-50 that moved normalised Grad-CAM maps by up to
    0.25 (max |Δ| vs CPU, H200, random-weight extractor) against 2e-4 with TF32 off, at ~3x the (tiny) cost.
    """
    import torch

    saved = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = saved


class _TorchPath:
    """extractor.pt + head arrays (linear) or head.onnx (others), loaded on first use."""

    def __init__(self, root: Path, manifest: ModelManifest) -> None:
        import torch

        from core.network import ResNet50Extractor, load_torchvision_state

        self.linear = manifest.head.type == "linear"
        # Ablation-CAM reads the maps back as numpy on every slice: it stays on the CPU.
        self.device = torch.device("cuda" if self.linear and torch.cuda.is_available() else "cpu")
        state = torch.load(root / EXTRACTOR_FILE, map_location="cpu", weights_only=True)
        extractor = ResNet50Extractor()
        load_torchvision_state(extractor, state, source=str(root / EXTRACTOR_FILE))
        self.extractor = extractor.eval().to(self.device)
        with np.load(root / HEAD_ARRAYS_FILE, allow_pickle=False) as arrays:
            self.indices = arrays["feature_indices"].astype(np.int64)
            self.weight = arrays.get("linear_weight", None)
            self.bias = float(arrays["linear_bias"]) if "linear_bias" in arrays else 0.0
        if self.linear and self.weight is None:
            raise InputError("linear head without weights in head.npz", source=str(root), field="head")
        self.head_session = None
        if not self.linear:
            import onnxruntime as ort

            self.head_session = ort.InferenceSession(str(root / HEAD_ONNX_FILE), providers=[CPU])
        self.size = int(manifest.preprocess.get("size", 224))

    def _score_torch(self, features: Any) -> Any:
        import torch

        idx = torch.as_tensor(self.indices, device=features.device)
        w = torch.as_tensor(self.weight, dtype=features.dtype, device=features.device)
        return features[:, idx] @ w + self.bias

    def _score_numpy(self, features: np.ndarray) -> np.ndarray:
        selected = np.ascontiguousarray(features[:, self.indices], dtype=np.float32)
        return self.head_session.run(["probability"], {"features": selected})[0]

    def cams(self, slices: np.ndarray, *, normalize: str) -> np.ndarray:
        import torch

        from core.cam import GradCAM, ablation_cam, postprocess

        size = (self.size, self.size)
        x = torch.from_numpy(slices)
        if not self.linear:
            return ablation_cam(self.extractor, x, self._score_numpy, size=size, normalize=normalize)
        with GradCAM(self.extractor) as cam, _no_tf32():  # a patient per pass bounds memory
            raw = torch.cat(
                [cam.raw(x[i : i + 1].to(self.device), self._score_torch).cpu() for i in range(len(x))]
            )
        return postprocess(raw, size=size, normalize=normalize)
