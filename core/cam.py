"""Class activation maps on ResNet-50's last block (layer4) for a patient-level score.

The score is any function of the pooled patient features ``[N,2048]`` (mean over a patient's S slices of
the per-slice GAP of layer4), e.g. the whole pipeline ``select indices -> scaler -> classifier``. One map
per slice, ``[N,S,h,w]`` (7x7 for 224x224 slices), optionally upsampled and normalised.

- :class:`GradCAM` (Selvaraju et al. 2017) for differentiable (torch) scores: per slice s,
  ``cam_s = ReLU(sum_k alpha_sk A_sk)`` with ``alpha_sk`` the spatial mean of ``d score / d A_sk``.
  Same computation as pytorch-grad-cam's ``GradCAM`` (tested against it); ours handles the [N,S] patient
  structure and needs no torchvision.
- :func:`class_activation_map` (Zhou et al. 2016): ``sum_k w_k A_k`` for a linear head on GAP features.
  For ``score = w . mean_s GAP(A_s) + b`` the gradient is ``w_k / (S*h*w)`` everywhere, so Grad-CAM equals
  ``ReLU(CAM) / (S*h*w)``: identical after ReLU and normalisation. This is why a linear head's CAM can
  be computed inside the ONNX graph.
- :func:`ablation_cam` (Desai & Ramaswamy 2020): forward-only, for heads that are not differentiable
  (trees, k-NN, RBF-SVM in scikit-learn). Labelled :data:`ABLATION_CAM_LABEL`; it is not Grad-CAM.

Upsampling (:func:`upsample_maps`): layer4 cell (i, j) sees the input centred on pixel (32i, 32j), not on
the centre of the i-th 32-pixel block, so the default ``align="stride"`` places cells there; the naive
``"resize"`` (OpenCV/pytorch-grad-cam) shifts maps by half a cell (16 px at 224) and is kept for parity.
To map CAMs back onto the image grid, upsample with ``align="stride"`` to the slice size first and pass
the ``[S,224,224]`` maps to ``Preprocessed.map_to_image``.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from core.errors import InputError
from core.network import FEATURE_DIM, ResNet50Extractor

GRADCAM_LABEL = "Grad-CAM (layer4)"
CAM_LABEL = "CAM (linear head, layer4)"
ABLATION_CAM_LABEL = "Ablation-CAM (forward-only; head not differentiable)"

Normalize = Literal["none", "slice", "patient"]
Align = Literal["stride", "resize"]
LAYER4_STRIDE = 32
TorchScore = Callable[[torch.Tensor], torch.Tensor]
NumpyScore = Callable[[np.ndarray], np.ndarray]


def _device(module: nn.Module) -> torch.device:
    return next(module.parameters()).device


def _as_slices(slices: np.ndarray | torch.Tensor) -> torch.Tensor:
    x = torch.as_tensor(slices)
    if x.ndim != 5 or x.shape[2] != 3:
        raise InputError(f"expected slices [N,S,3,H,W], got shape {tuple(x.shape)}", field="slices")
    return x.float()


def upsample_maps(
    maps: torch.Tensor | np.ndarray,
    size: tuple[int, int],
    *,
    align: Align = "stride",
    stride: int = LAYER4_STRIDE,
) -> torch.Tensor:
    """Bilinear upsampling of ``[..., h, w]`` layer maps to the input size ``[..., *size]``.

    ``align="stride"`` (default) puts cell (i, j) at input pixel (stride*i, stride*j), where ResNet's
    receptive fields are centred (every stride-2 conv/pool with padding k//2 keeps output i over input
    2i); beyond the last cell the border value is held. ``align="resize"`` spreads the cells evenly over
    the image (half-pixel centres, as OpenCV/pytorch-grad-cam): simple, but it shifts every map by half
    a cell (16 px at 224) towards the bottom-right.
    """
    m = torch.as_tensor(maps, dtype=torch.float32)
    lead, (h, w) = m.shape[:-2], m.shape[-2:]
    m = m.reshape(-1, 1, h, w)
    if align == "resize":
        out = F.interpolate(m, size=size, mode="bilinear")
    elif align == "stride":

        def axis(n_out: int, n_cells: int) -> torch.Tensor:
            cell = torch.arange(n_out, dtype=torch.float32, device=m.device) / stride  # in cell units
            return cell * 2 / (n_cells - 1) - 1 if n_cells > 1 else torch.zeros(n_out, device=m.device)

        gy, gx = torch.meshgrid(axis(size[0], h), axis(size[1], w), indexing="ij")
        grid = torch.stack((gx, gy), dim=-1).expand(m.shape[0], *size, 2)
        out = F.grid_sample(m, grid, mode="bilinear", padding_mode="border", align_corners=True)
    else:
        raise ValueError(f"align must be 'stride' or 'resize', got {align!r}")
    return out.reshape(*lead, *size)


def postprocess(
    cams: torch.Tensor,
    *,
    size: tuple[int, int] | None = None,
    normalize: Normalize = "none",
    align: Align = "stride",
) -> np.ndarray:
    """``[N,S,h,w]`` maps -> optional upsampling to ``size`` (see :func:`upsample_maps`) -> optional
    min-max normalisation per ``"slice"`` or per ``"patient"`` (keeps the slices' relative strength)."""
    if cams.ndim != 4:
        raise ValueError(f"expected maps [N,S,h,w], got {tuple(cams.shape)}")
    if size is not None:
        cams = upsample_maps(cams, size, align=align)
    if normalize != "none":
        dims = (2, 3) if normalize == "slice" else (1, 2, 3)
        lo = cams.amin(dim=dims, keepdim=True)
        cams = cams - lo
        cams = cams / (cams.amax(dim=dims, keepdim=True) + 1e-7)
    return cams.detach().cpu().numpy().astype(np.float32)


def _check_scores(scores: torch.Tensor | np.ndarray, n: int) -> None:
    if tuple(scores.shape) not in {(n,), (n, 1)}:
        raise ValueError(
            f"the score function must return one scalar per patient ([{n}]), got {tuple(scores.shape)}"
        )


class GradCAM:
    """Grad-CAM over ``extractor.layer4`` for a scalar score of the pooled patient features.

    Use as a context manager (or call :meth:`release`) so the forward hook is removed::

        with GradCAM(extractor) as cam:
            maps = cam(slices, score_fn, size=(224, 224), normalize="slice")

    ``score_fn(features [n,2048]) -> [n]`` must be differentiable torch code. Patients are processed in
    chunks of ``patients_per_pass`` (they are independent in eval mode) to bound memory.
    """

    label = GRADCAM_LABEL

    def __init__(self, extractor: ResNet50Extractor, *, target_layer: nn.Module | None = None) -> None:
        self.extractor = extractor
        self.target_layer = target_layer if target_layer is not None else extractor.layer4
        self._activations: torch.Tensor | None = None
        self._handle = self.target_layer.register_forward_hook(self._save)

    def _save(
        self, module: nn.Module, inputs: tuple[torch.Tensor, ...], output: torch.Tensor
    ) -> torch.Tensor:
        # Frozen weights (requires_grad=False) would leave no graph: make the activation a leaf we can
        # differentiate with respect to. Returning it replaces the layer's output downstream.
        if not output.requires_grad:
            output = output.detach().requires_grad_(True)
        self._activations = output
        return output

    def release(self) -> None:
        """Remove the hook; idempotent."""
        if self._handle is not None:
            self._handle.remove()
            self._handle = None
        self._activations = None

    def __enter__(self) -> GradCAM:
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()

    def raw(self, slices: np.ndarray | torch.Tensor, score_fn: TorchScore) -> torch.Tensor:
        """Unnormalised maps ``[n,S,h,w]`` = ReLU(sum_k alpha_k A_k) for one chunk of patients."""
        if self._handle is None:
            raise RuntimeError("GradCAM hooks were released; create a new GradCAM")
        x = _as_slices(slices)
        n, s = x.shape[:2]
        was_training = self.extractor.training
        self.extractor.eval()
        try:
            with torch.inference_mode(False), torch.enable_grad():
                # clone: inference tensors cannot enter autograd
                x = x.to(_device(self.extractor)).clone().reshape(n * s, *x.shape[2:])
                pooled = self.extractor(x)
                acts = self._activations
                if acts is None:
                    raise RuntimeError("the target layer did not run in the extractor's forward pass")
                patient = pooled.reshape(n, s, pooled.shape[-1]).mean(dim=1)
                scores = score_fn(patient)
                _check_scores(scores, n)
                (grads,) = torch.autograd.grad(scores.sum(), acts)
            alpha = grads.mean(dim=(2, 3), keepdim=True)
            cams = torch.relu((alpha * acts.detach()).sum(dim=1))
        finally:
            self._activations = None
            self.extractor.train(was_training)
        return cams.reshape(n, s, *cams.shape[1:])

    def __call__(
        self,
        slices: np.ndarray | torch.Tensor,
        score_fn: TorchScore,
        *,
        size: tuple[int, int] | None = None,
        normalize: Normalize = "none",
        align: Align = "stride",
        patients_per_pass: int = 1,
    ) -> np.ndarray:
        """Grad-CAM per slice ``[N,S,h,w]`` (or ``[N,S,*size]``) as float32."""
        x = _as_slices(slices)
        chunks = [
            self.raw(x[i : i + patients_per_pass], score_fn) for i in range(0, x.shape[0], patients_per_pass)
        ]
        return postprocess(torch.cat(chunks), size=size, normalize=normalize, align=align)


def class_activation_map(
    feature_maps: torch.Tensor | np.ndarray, weights: torch.Tensor | np.ndarray
) -> np.ndarray:
    """Linear-head CAM ``sum_k w_k A_k`` (no ReLU): ``[...,2048,h,w]`` x ``[2048]`` -> ``[...,h,w]``."""
    a = torch.as_tensor(feature_maps, dtype=torch.float32)
    w = torch.as_tensor(weights, dtype=torch.float32).reshape(-1)
    if a.ndim < 3 or a.shape[-3] != w.shape[0]:
        raise ValueError(f"feature maps {tuple(a.shape)} and weights {tuple(w.shape)} do not match")
    return torch.einsum("...khw,k->...hw", a.cpu(), w.cpu()).numpy()


def effective_linear_weights(
    feature_indices: Sequence[int], coef: Sequence[float], scale: Sequence[float] | None = None
) -> np.ndarray:
    """The 2048-vector ``w`` with ``score = w . features + const`` for ``select -> StandardScaler -> linear``
    (``w[idx_j] = coef_j / scale_j``), to feed :func:`class_activation_map`."""
    idx = np.asarray(feature_indices, dtype=np.int64)
    c = np.asarray(coef, dtype=np.float64).reshape(-1)
    sc = np.ones_like(c) if scale is None else np.asarray(scale, dtype=np.float64).reshape(-1)
    if not (idx.shape == c.shape == sc.shape):
        raise ValueError(
            f"indices {idx.shape}, coef {c.shape} and scale {sc.shape} must have the same length"
        )
    w = np.zeros(FEATURE_DIM, dtype=np.float64)
    np.add.at(w, idx, c / sc)
    return w.astype(np.float32)


def linear_head_score(
    feature_indices: Sequence[int],
    coef: Sequence[float],
    intercept: float = 0.0,
    *,
    mean: Sequence[float] | None = None,
    scale: Sequence[float] | None = None,
) -> TorchScore:
    """A torch score for ``select -> (x - mean) / scale -> linear logit``: the pipeline as a differentiable
    callable for :class:`GradCAM` (the logit, not the probability: its gradient does not saturate)."""
    idx = torch.as_tensor(np.asarray(feature_indices, dtype=np.int64))
    c = torch.as_tensor(np.asarray(coef, dtype=np.float32).reshape(-1))
    mu = torch.zeros_like(c) if mean is None else torch.as_tensor(np.asarray(mean, dtype=np.float32))
    sd = torch.ones_like(c) if scale is None else torch.as_tensor(np.asarray(scale, dtype=np.float32))

    def score(features: torch.Tensor) -> torch.Tensor:
        return ((features[:, idx] - mu) / sd) @ c + float(intercept)

    return score


@torch.no_grad()
def ablation_cam(
    extractor: ResNet50Extractor,
    slices: np.ndarray | torch.Tensor,
    score_fn: NumpyScore,
    *,
    size: tuple[int, int] | None = None,
    normalize: Normalize = "none",
    align: Align = "stride",
    eps: float = 1e-7,
) -> np.ndarray:
    """Forward-only Ablation-CAM per slice ``[N,S,h,w]`` for a non-differentiable head.

    ``score_fn(features: np.ndarray [M,2048]) -> [M]``, e.g.
    ``lambda X: pipe.predict_proba(X[:, idx])[:, 1]`` (a positive score such as a probability, as in the
    paper). For slice s and channel k, zeroing
    ``A_sk`` changes the patient feature k by ``-GAP(A_sk)/S`` only (GAP and the mean over slices are
    linear), so every ablation is evaluated exactly on the head without re-running the network:
    ``w_sk = (y - y_sk) / |y|`` and ``cam_s = ReLU(sum_k w_sk A_sk)``. Cost: N*S*2048 head evaluations.
    Label results with :data:`ABLATION_CAM_LABEL`.
    """
    x = _as_slices(slices)
    n, s = x.shape[:2]
    extractor.eval()
    maps = extractor.feature_maps(x.reshape(n * s, *x.shape[2:]).to(_device(extractor)))
    maps = maps.reshape(n, s, *maps.shape[1:]).double().cpu()  # [N,S,K,h,w]
    pooled = maps.mean(dim=(3, 4)).numpy()  # [N,S,K]
    patient = pooled.mean(axis=1)  # [N,K]
    base = np.asarray(score_fn(patient.astype(np.float32)), dtype=np.float64)
    _check_scores(base, n)
    base = base.reshape(n)
    k = pooled.shape[-1]
    weights = np.empty((n, s, k))
    for i in range(n):
        for j in range(s):
            ablated = np.repeat(patient[i][None, :], k, axis=0)
            ablated[np.arange(k), np.arange(k)] -= pooled[i, j] / s
            y = np.asarray(score_fn(ablated.astype(np.float32)), dtype=np.float64).reshape(k)
            weights[i, j] = (base[i] - y) / max(abs(base[i]), eps)
    cams = torch.relu(torch.einsum("nskhw,nsk->nshw", maps, torch.from_numpy(weights))).float()
    return postprocess(cams, size=size, normalize=normalize, align=align)
