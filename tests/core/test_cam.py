"""Grad-CAM / CAM / Ablation-CAM: parity with pytorch-grad-cam, the linear-head identity, localisation."""

from __future__ import annotations

import importlib
import sys
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType

import numpy as np
import pytest
import torch

from core.cam import (
    ABLATION_CAM_LABEL,
    GradCAM,
    ablation_cam,
    class_activation_map,
    effective_linear_weights,
    linear_head_score,
    postprocess,
    upsample_maps,
)
from core.errors import InputError
from core.network import ResNet50Extractor, build_extractor, recalibrate_batchnorm

SHIMS = Path(__file__).resolve().parents[1] / "_shims"


@pytest.fixture(scope="module")
def pytorch_grad_cam() -> Iterator[ModuleType]:
    """pytorch-grad-cam with the test-only torchvision shim on sys.path for this module only."""
    before = set(sys.modules)
    sys.path.insert(0, str(SHIMS))
    try:
        yield importlib.import_module("pytorch_grad_cam")
    finally:
        sys.path.remove(str(SHIMS))
        for name in set(sys.modules) - before:
            if name.split(".")[0] in {"torchvision", "pytorch_grad_cam"}:
                del sys.modules[name]


@pytest.fixture(scope="module")
def extractor() -> ResNet50Extractor:
    return build_extractor("random", seed=0)[0]


@pytest.fixture(scope="module")
def head() -> torch.nn.Linear:
    """A linear score on the pooled features; the positive shift makes most alphas positive, so the
    ReLU'd maps are non-trivial on the random-weight extractor."""
    torch.manual_seed(7)
    linear = torch.nn.Linear(2048, 1)
    with torch.no_grad():
        linear.weight.add_(0.1)
    return linear


def test_gradcam_matches_pytorch_grad_cam(
    pytorch_grad_cam: ModuleType, extractor: ResNet50Extractor, head: torch.nn.Linear
) -> None:
    from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

    x = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(1))
    reference_model = torch.nn.Sequential(extractor, head)
    reference = pytorch_grad_cam.GradCAM(model=reference_model, target_layers=[extractor.layer4])
    try:
        expected = reference(input_tensor=x, targets=[ClassifierOutputTarget(0)] * 2)  # [2,64,64], normalised
        acts = reference.activations_and_grads.activations[0].numpy()
        grads = reference.activations_and_grads.gradients[0].numpy()
    finally:
        reference.activations_and_grads.release()
    expected_raw = np.maximum((grads.mean(axis=(2, 3))[:, :, None, None] * acts).sum(axis=1), 0)

    score = lambda f: head(f)[:, 0]  # noqa: E731
    with GradCAM(extractor) as cam:
        raw = cam.raw(x[:, None], score)  # each image is a one-slice patient
        ours = cam(x[:, None], score, size=(64, 64), normalize="slice", align="resize")
    assert (expected_raw.max(axis=(1, 2)) > expected_raw.min(axis=(1, 2))).all()  # non-trivial maps
    np.testing.assert_allclose(raw[:, 0].numpy(), expected_raw, rtol=1e-4, atol=1e-6 * expected_raw.max())
    np.testing.assert_allclose(ours[:, 0], expected, atol=1e-5)


def test_gradcam_of_linear_head_is_relu_cam_scaled(extractor: ResNet50Extractor) -> None:
    """For score = w . mean_s GAP(A_s) + b: alpha_sk = w_k / (S*h*w), so Grad-CAM = ReLU(CAM) / (S*h*w)."""
    g = torch.Generator().manual_seed(2)
    x = torch.randn(2, 3, 3, 64, 64, generator=g)  # N=2 patients, S=3 slices
    rng = np.random.default_rng(0)
    idx = np.arange(3, 2048, 8)  # 256 selected features, as if from the 2048
    coef, mean, scale = rng.normal(size=256), rng.normal(size=256), rng.uniform(0.5, 2.0, 256)
    score = linear_head_score(idx, coef, intercept=0.3, mean=mean, scale=scale)
    w = effective_linear_weights(idx, coef, scale)
    with GradCAM(extractor) as cam:
        grad_maps = cam.raw(x, score).numpy()
    with torch.inference_mode():
        maps = extractor.feature_maps(x.reshape(6, 3, 64, 64)).reshape(2, 3, 2048, 2, 2)
    linear_cam = class_activation_map(maps, w)
    assert linear_cam.shape == (2, 3, 2, 2) and (linear_cam > 0).any() and (linear_cam < 0).any()
    np.testing.assert_allclose(grad_maps, np.maximum(linear_cam, 0) / (3 * 2 * 2), rtol=1e-4, atol=1e-6)


def test_linear_head_score_is_the_pipeline_logit() -> None:
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    rng = np.random.default_rng(0)
    features = rng.normal(size=(40, 2048)).astype(np.float32)
    idx = [3, 10, 999]
    y = (features[:, 3] + features[:, 10] > 0).astype(int)
    pipe = make_pipeline(StandardScaler(), LogisticRegression()).fit(features[:, idx], y)
    scaler, lr = pipe.steps[0][1], pipe.steps[1][1]
    score = linear_head_score(idx, lr.coef_[0], lr.intercept_[0], mean=scaler.mean_, scale=scaler.scale_)
    ours = score(torch.from_numpy(features)).numpy()
    np.testing.assert_allclose(ours, pipe.decision_function(features[:, idx]), rtol=1e-4, atol=1e-4)
    w = effective_linear_weights(idx, lr.coef_[0], scaler.scale_)
    assert np.count_nonzero(w) == 3
    np.testing.assert_allclose(features @ w - (features @ w)[0], ours - ours[0], rtol=1e-3, atol=1e-3)


def test_hooks_are_released_and_frozen_weights_work(extractor: ResNet50Extractor) -> None:
    x = torch.randn(1, 2, 3, 64, 64)
    for p in extractor.parameters():
        p.grad = None  # the pytorch-grad-cam reference calls loss.backward() on the shared extractor
    with GradCAM(extractor) as cam:
        assert len(extractor.layer4._forward_hooks) == 1
        trainable = cam(x, lambda f: f.sum(dim=1))
    assert len(extractor.layer4._forward_hooks) == 0
    assert all(p.grad is None for p in extractor.parameters())  # no parameter gradients accumulated
    with pytest.raises(RuntimeError, match="released"):
        cam(x, lambda f: f.sum(dim=1))
    for p in extractor.parameters():
        p.requires_grad_(False)
    try:
        with GradCAM(extractor) as cam:
            frozen = cam(x, lambda f: f.sum(dim=1))
    finally:
        for p in extractor.parameters():
            p.requires_grad_(True)
    assert frozen.shape == (1, 2, 2, 2) and frozen.max() > 0
    np.testing.assert_allclose(frozen, trainable, rtol=1e-5)


def test_gradcam_rejects_bad_shapes(extractor: ResNet50Extractor) -> None:
    with GradCAM(extractor) as cam:
        with pytest.raises(InputError, match=r"\[N,S,3,H,W\]"):
            cam(torch.randn(2, 3, 64, 64), lambda f: f.sum(dim=1))
        with pytest.raises(ValueError, match="one scalar per patient"):
            cam(torch.randn(1, 1, 3, 64, 64), lambda f: f[:, :2])


def test_gradcam_works_under_inference_mode(extractor: ResNet50Extractor) -> None:
    with torch.inference_mode():
        x = torch.randn(1, 1, 3, 64, 64)
        with GradCAM(extractor) as cam:
            maps = cam(x, lambda f: f.mean(dim=1), size=(64, 64), normalize="slice")
    assert maps.shape == (1, 1, 64, 64) and maps.max() == pytest.approx(1.0, abs=1e-5)


def test_stride_alignment_puts_cells_at_their_receptive_field_centres() -> None:
    maps = torch.zeros(1, 1, 7, 7)
    maps[0, 0, 2, 5] = 1.0
    up = upsample_maps(maps, (224, 224), align="stride")[0, 0]
    assert tuple(np.unravel_index(int(up.argmax()), (224, 224))) == (64, 160)
    assert up[64, 160] == 1.0 and up[64 + 16, 160] == pytest.approx(0.5)
    resized = upsample_maps(maps, (224, 224), align="resize")[0, 0]
    py, px = np.unravel_index(int(resized.argmax()), (224, 224))
    assert py in {79, 80} and px in {175, 176}  # the naive resize shifts the map by half a cell
    with pytest.raises(ValueError, match="align"):
        upsample_maps(maps, (224, 224), align="corners")  # type: ignore[arg-type]


def test_postprocess_normalises_per_slice_or_per_patient() -> None:
    maps = torch.tensor([[[[0.0, 1.0], [2.0, 4.0]], [[0.0, 0.5], [1.0, 2.0]]]])  # [1,2,2,2]
    per_slice = postprocess(maps, normalize="slice")
    per_patient = postprocess(maps, normalize="patient")
    np.testing.assert_allclose(per_slice[0, 1].max(), 1.0, atol=1e-6)
    np.testing.assert_allclose(per_patient[0, 1].max(), 0.5, atol=1e-6)


def test_ablation_cam_equals_brute_force_ablation(extractor: ResNet50Extractor) -> None:
    """The shortcut (ablate on the pooled features) equals actually zeroing each layer4 channel."""
    x = torch.randn(1, 2, 3, 64, 64, generator=torch.Generator().manual_seed(3))
    w = np.random.default_rng(1).normal(size=2048)

    def score(features: np.ndarray) -> np.ndarray:  # non-linear, numpy only (like a sklearn head)
        return 1 / (1 + np.exp(-np.tanh(features @ w / 50)))

    ours = ablation_cam(extractor, x, score)
    with torch.inference_mode():
        maps = extractor.feature_maps(x[0]).double().numpy()  # [S,K,h,w]
    base = score(maps.mean(axis=(2, 3)).mean(axis=0, keepdims=True))[0]
    expected = np.zeros((2, 2, 2))
    for s in range(2):
        ablated = np.repeat(maps[None], 2048, axis=0)  # [K,S,K,h,w]: copy k zeroes channel k of slice s
        ablated[np.arange(2048), s, np.arange(2048)] = 0
        y = score(ablated.mean(axis=(3, 4)).mean(axis=1))
        weights = (base - y) / abs(base)
        expected[s] = np.maximum(np.einsum("k,khw->hw", weights, maps[s]), 0)
    assert expected.max() > 0
    np.testing.assert_allclose(ours[0], expected, rtol=1e-4, atol=1e-6 * expected.max())
    assert "forward-only" in ABLATION_CAM_LABEL


# ---------------------------------------------------------------- localisation on a synthetic case

SIZE, RADIUS = 224, 24  # the real input size; a radius > 16*sqrt(2) always covers a layer4 cell centre


def blob_image(cy: int, cx: int) -> np.ndarray:
    yy, xx = np.mgrid[:SIZE, :SIZE]
    img = np.zeros((3, SIZE, SIZE), np.float32)
    img[:, (yy - cy) ** 2 + (xx - cx) ** 2 <= RADIUS**2] = 3.0
    return img


@pytest.fixture(scope="module")
def calibrated() -> ResNet50Extractor:
    """Random weights + BN re-estimated on a small 'training set' of blob images, as in the study."""
    net, _ = build_extractor("random", seed=0)
    rng = np.random.default_rng(0)
    batches = [
        torch.from_numpy(np.stack([blob_image(*rng.integers(30, 190, 2)) for _ in range(4)]))
        for _ in range(2)
    ]
    recalibrate_batchnorm(net, batches)
    return net


@pytest.mark.parametrize("centre", [(60, 170), (150, 50), (200, 190)])
def test_cams_peak_inside_the_only_region_with_signal(calibrated: ResNet50Extractor, centre: tuple) -> None:
    """Only the blob carries signal and the head responds to it (w = features(blob) - features(blank)):
    CAM, Grad-CAM and Ablation-CAM, upsampled to the input, must peak inside the blob."""
    img = torch.from_numpy(blob_image(*centre))[None]
    with torch.inference_mode():
        blob_f, blank_f = calibrated(img)[0], calibrated(torch.zeros_like(img))[0]
        maps = calibrated.feature_maps(img)
    w = blob_f - blank_f
    offset, spread = float(blank_f @ w), float((blob_f - blank_f) @ w)

    def numpy_head(features: np.ndarray) -> np.ndarray:
        return 1 / (1 + np.exp(-(features @ w.numpy() - offset) / spread))

    cam = postprocess(torch.from_numpy(class_activation_map(maps[None], w)), size=(SIZE, SIZE))
    with GradCAM(calibrated) as grad_cam:
        gcam = grad_cam(img[None], lambda f: f @ w, size=(SIZE, SIZE))
    acam = ablation_cam(calibrated, img[None], numpy_head, size=(SIZE, SIZE))
    for name, m in {"CAM": cam, "Grad-CAM": gcam, "Ablation-CAM": acam}.items():
        py, px = np.unravel_index(int(m[0, 0].argmax()), (SIZE, SIZE))
        assert np.hypot(py - centre[0], px - centre[1]) <= RADIUS, (name, (py, px))
