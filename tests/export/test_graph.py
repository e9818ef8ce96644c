"""The single ONNX graph: parity with torch + scikit-learn, checker, dynamic N, and the in-graph CAM equal to
Grad-CAM (worked constant: cam == pre-ReLU Grad-CAM * h * w)."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from export_fixtures import S
from sklearn.ensemble import RandomForestClassifier
from sklearn.linear_model import LogisticRegression
from sklearn.pipeline import Pipeline
from sklearn.preprocessing import StandardScaler

from export.graph import (
    CAM,
    INPUT,
    PROBABILITY,
    build_graph,
    head_to_onnx,
    linear_logit_head,
)
from export.validate import reference_probabilities


def _session(model: onnx.ModelProto) -> ort.InferenceSession:
    return ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])


def test_graph_matches_torch_and_sklearn_within_1e4_for_any_batch_size(trained, built_lr) -> None:
    session = _session(built_lr.model)
    for sl in (slice(0, 1), slice(1, 4)):  # N is a dynamic axis: 1 and 3 patients
        x = trained.slices[sl]
        probs, cam = session.run([PROBABILITY, CAM], {INPUT: x})
        ref, _ = reference_probabilities(trained.extractor, trained.indices, trained.pipeline, x)
        assert probs.shape == (x.shape[0],) and cam.shape == (x.shape[0], S, 7, 7)
        assert np.max(np.abs(probs - ref)) <= 1e-4
    # the head is not constant: otherwise parity would be trivial
    assert np.ptp(trained.pipeline.predict_proba(trained.pooled[:, trained.indices])[:, 1]) > 0.1


def test_graph_passes_the_full_checker_and_declares_its_interface(built_lr, tmp_path) -> None:
    path = tmp_path / "m.onnx"
    onnx.save(built_lr.model, path)
    onnx.checker.check_model(str(path), full_check=True)
    graph = built_lr.model.graph
    assert [i.name for i in graph.input] == [INPUT]
    assert [o.name for o in graph.output] == [PROBABILITY, CAM]
    dims = [d.dim_param or d.dim_value for d in graph.input[0].type.tensor_type.shape.dim]
    assert dims == ["N", S, 3, 224, 224]
    assert any(o.domain == "ai.onnx.ml" for o in built_lr.model.opset_import)
    assert max(o.version for o in built_lr.model.opset_import if o.domain == "") >= 17
    assert any(n.name.startswith("head/") for n in graph.node)


def _torch_gradcam_pre_relu(extractor, indices, linear, x: np.ndarray) -> dict[str, np.ndarray]:
    """Grad-CAM by autograd, before ReLU/normalisation (alpha_k = spatial mean of d logit / d A_k), plus the
    CAM formula evaluated on the SAME torch maps and the logit."""
    n, s = x.shape[:2]
    maps = extractor.feature_maps(torch.from_numpy(x).reshape(n * s, 3, 224, 224)).detach().double()
    maps.requires_grad_(True)
    pooled = maps.mean(dim=(2, 3)).reshape(n, s, -1).mean(dim=1)
    idx = torch.as_tensor(indices)
    w = torch.as_tensor(linear.weight)
    logit = pooled[:, idx] @ w + linear.bias
    (grads,) = torch.autograd.grad(logit.sum(), maps)
    alpha = grads.mean(dim=(2, 3), keepdim=True)
    gradcam = (alpha * maps).sum(dim=1).reshape(n, s, *maps.shape[2:])
    formula = torch.einsum("bkhw,k->bhw", maps[:, idx], w).reshape(n, s, *maps.shape[2:]) / s
    out = {"gradcam": gradcam, "formula": formula, "logit": logit}
    return {k: v.detach().numpy() for k, v in out.items()}


def test_in_graph_cam_equals_torch_gradcam_times_hw(trained, built_lr) -> None:
    from core.cam import GradCAM, linear_head_score

    x = trained.slices[:1]
    _, cam = _session(built_lr.model).run([PROBABILITY, CAM], {INPUT: x})
    linear = linear_logit_head(trained.pipeline, trained.pooled[:, trained.indices])
    ref = _torch_gradcam_pre_relu(trained.extractor, trained.indices, linear, x)
    h, w = cam.shape[2:]
    scale = np.abs(cam).max()
    assert scale > 0
    # the worked constant, exact in float64 on the same maps: alpha_k = w_k / (S*h*w) and
    # cam = sum_k w_k A_k / S  =>  cam = GradCAM(pre-ReLU) * h * w
    np.testing.assert_allclose(ref["gradcam"] * h * w, ref["formula"], rtol=1e-9, atol=1e-9 * scale)
    # the graph computes that formula (ORT vs torch convolutions: float32 rounding, amplified by the weights)
    np.testing.assert_allclose(cam, ref["formula"], atol=1e-3 * scale, rtol=0)
    # and it decomposes the logit: sum over slices of the spatial mean of cam = logit - bias
    np.testing.assert_allclose(cam.mean(axis=(2, 3)).sum(axis=1) + linear.bias, ref["logit"], atol=1e-3)
    # the project's Grad-CAM (post-ReLU) agrees up to the same constant
    scaler, clf = trained.pipeline[0], trained.pipeline[-1]
    score = linear_head_score(
        trained.indices, clf.coef_[0], clf.intercept_[0], mean=scaler.mean_, scale=scaler.scale_
    )
    with GradCAM(trained.extractor) as gc:
        ours = gc(x, score)
    np.testing.assert_allclose(np.maximum(cam, 0), ours * h * w, atol=1e-3 * scale, rtol=0)


def test_linear_logit_head_reads_lr_exactly_and_rejects_nonlinear_heads(trained) -> None:
    x = trained.pooled[:, trained.indices].astype(np.float64)
    head = linear_logit_head(trained.pipeline, x)
    p = trained.pipeline.predict_proba(x)[:, 1]
    np.testing.assert_allclose(x @ head.weight + head.bias, np.log(p / (1 - p)), atol=1e-6)
    rf = Pipeline([("s", StandardScaler()), ("c", RandomForestClassifier(20, random_state=0))]).fit(
        x, trained.labels
    )
    assert linear_logit_head(rf, x) is None


def test_head_to_onnx_matches_predict_proba_for_the_zoo(trained) -> None:
    from training.models import make_zoo

    rng = np.random.default_rng(0)
    x = rng.normal(size=(40, 12)) * 3 + 1
    y = (x[:, 0] + rng.normal(size=40) > 1).astype(int)
    for name, (pipe, _) in make_zoo().items():
        pipe.fit(x, y)
        model = head_to_onnx(pipe, 12)
        got = _session(model).run([PROBABILITY], {"features": x.astype(np.float32)})[0]
        assert np.max(np.abs(got - pipe.predict_proba(x)[:, 1])) < 1e-4, name


def test_nonlinear_head_gives_a_graph_without_cam(tiny, trained) -> None:
    x = trained.slices[:3]
    with torch.no_grad():
        pooled = tiny(torch.from_numpy(x).reshape(-1, 3, 224, 224)).reshape(3, S, -1).mean(1).numpy()
    idx = trained.indices
    rf = Pipeline([("s", StandardScaler()), ("c", RandomForestClassifier(10, random_state=0))])
    rf.fit(np.vstack([pooled[:, idx]] * 2) + np.random.default_rng(0).normal(size=(6, 12)), [0, 1] * 3)
    built = build_graph(tiny, idx, rf, linear=None, slices=None)  # S dynamic here
    assert [o.name for o in built.model.graph.output] == [PROBABILITY]
    got = _session(built.model).run([PROBABILITY], {INPUT: x})[0]
    np.testing.assert_allclose(got, rf.predict_proba(pooled[:, idx])[:, 1], atol=1e-5)
    one_slice = _session(built.model).run([PROBABILITY], {INPUT: x[:, :1]})[0]  # S=1 also accepted
    assert one_slice.shape == (3,)


def test_positive_class_must_be_label_one(tiny, trained) -> None:
    bad = Pipeline([("s", StandardScaler()), ("c", LogisticRegression())]).fit(
        trained.pooled[:, trained.indices], np.where(trained.labels == 1, 2, 0)
    )
    with pytest.raises(ValueError, match="classes"):
        head_to_onnx(bad, 12)
