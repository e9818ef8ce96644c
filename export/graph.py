"""ONE ONNX inference graph: slices [N,S,3,H,W] -> ResNet-50 -> GAP -> mean over S -> selected
features -> fitted scaler -> fitted classifier -> probability [N] (+ an in-graph CAM for linear heads).

Why one graph: the service runs a single verified artifact, so the feature selection, scaling and classifier
can never drift from the extractor they were fitted on.

How: the torch part (trunk: extractor + pooling + feature gather + CAM) is exported with
``torch.onnx.export`` (TorchScript path first: it is the most robust with dynamic axes on torch 2.x; the
dynamo exporter is the logged fallback), the scikit-learn head is converted with skl2onnx (ZipMap off), its
nodes and edges are prefixed ``head/`` (so variants can exclude them by name) and both are joined with
``onnx.compose.merge_models``.

CAM for linear heads. With ``logit = w . mean_s GAP(A_s)[idx] + b`` (``w`` the effective weight on the RAW
pooled features: ``coef / scaler.scale``), the graph outputs ``cam[n,s] = sum_k w_k A_{s,k} / S`` (7x7, logit
units, signed, before any ReLU). It decomposes the logit exactly: ``sum_s mean_hw cam[n,s] = logit - b``.
Grad-CAM (pre-ReLU) of the logit w.r.t. layer4 gives ``alpha_k = w_k / (S*h*w)``, hence
``cam == GradCAM_preReLU * h * w`` (tests/export/test_graph.py proves it with autograd).
"""

from __future__ import annotations

import io
import logging
import warnings
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
import onnx
import torch
from onnx import TensorProto, helper, numpy_helper
from torch import nn

log = logging.getLogger(__name__)

INPUT = "slices"
PROBABILITY = "probability"
CAM = "cam"
FEATURES = "features"  # internal edge between trunk and head (not a graph output)
HEAD_PREFIX = "head/"
OPSET = 17
ML_OPSET = 3
LINEARITY_TOL = 1e-6  # max |logit - (w.x + b)| (relative to the logit range) to call a head linear


@dataclass(frozen=True)
class LinearHead:
    """The head's logit as an affine function of the RAW pooled (selected) features: ``x @ weight + bias``."""

    weight: np.ndarray  # [K] float64
    bias: float


def positive_class_index(classifier: Any) -> int:
    """Column of P(class 1) in predict_proba; the study labels PD-L1 high as 1."""
    classes = list(getattr(classifier, "classes_", []))
    if len(classes) != 2 or 1 not in classes:
        raise ValueError(f"expected a binary classifier with classes [0, 1], got classes_={classes}")
    return classes.index(1)


def _logit(p: np.ndarray) -> np.ndarray:
    p = np.clip(np.asarray(p, dtype=np.float64), 1e-12, 1 - 1e-12)
    return np.log(p) - np.log1p(-p)


def linear_logit_head(pipeline: Any, x_ref: np.ndarray, *, seed: int = 0) -> LinearHead | None:
    """Effective affine logit of a fitted head on raw selected features, or None when it is not affine.

    Why measure instead of trusting the model type: the in-graph CAM is only exact when logit(P(class 1))
    is affine in the pooled features (LR, or a linear SVM with Platt scaling, but not e.g. an averaged
    calibrator). For a LogisticRegression after a StandardScaler the weights are read analytically
    (``coef / scale``); otherwise they are fitted by least squares on points around ``x_ref`` and accepted
    only if the affine fit reproduces the logit to ``LINEARITY_TOL``.
    """
    from sklearn.linear_model import LogisticRegression
    from sklearn.preprocessing import StandardScaler

    x_ref = np.asarray(x_ref, dtype=np.float64)
    steps = [s for _, s in pipeline.steps] if hasattr(pipeline, "steps") else [pipeline]
    clf = steps[-1]
    col = positive_class_index(clf)
    if (
        isinstance(clf, LogisticRegression)
        and len(steps) == 2
        and isinstance(steps[0], StandardScaler)
        and clf.coef_.shape[0] == 1
    ):
        scaler = steps[0]
        mean = scaler.mean_ if scaler.with_mean else np.zeros(clf.coef_.shape[1])
        scale = scaler.scale_ if scaler.with_std else np.ones(clf.coef_.shape[1])
        sign = 1.0 if col == 1 else -1.0  # coef_ is for classes_[1]
        w = sign * clf.coef_[0] / scale
        b = sign * (clf.intercept_[0] - float(np.sum(clf.coef_[0] * mean / scale)))
        return LinearHead(weight=np.asarray(w, dtype=np.float64), bias=float(b))
    # Generic check: sample around the reference features (in units of their spread) and fit an affine map.
    rng = np.random.default_rng(seed)
    spread = np.std(x_ref, axis=0) + 1e-12
    centre = np.mean(x_ref, axis=0)
    k = x_ref.shape[1]
    pts = centre + rng.normal(size=(max(4 * k, 64), k)) * spread * 0.5
    logit = _logit(pipeline.predict_proba(pts)[:, col])
    design = np.hstack([pts, np.ones((len(pts), 1))])
    coef, *_ = np.linalg.lstsq(design, logit, rcond=None)
    resid = np.max(np.abs(design @ coef - logit)) / max(np.ptp(logit), 1e-12)
    if resid > LINEARITY_TOL:
        log.info(
            "head %s is not affine in logit space (rel. residual %.2e): no in-graph CAM",
            type(clf).__name__,
            resid,
        )
        return None
    return LinearHead(weight=coef[:-1], bias=float(coef[-1]))


class SliceTrunk(nn.Module):
    """slices [N,S,3,H,W] -> selected raw pooled features [N,K] (+ cam [N,S,h,w] given `cam_weight`)."""

    def __init__(
        self, extractor: nn.Module, feature_indices: np.ndarray, cam_weight: np.ndarray | None = None
    ) -> None:
        super().__init__()
        self.extractor = extractor
        self.register_buffer("indices", torch.as_tensor(np.asarray(feature_indices), dtype=torch.long))
        self.with_cam = cam_weight is not None
        weight = np.zeros(len(feature_indices)) if cam_weight is None else np.asarray(cam_weight)
        self.register_buffer("cam_weight", torch.as_tensor(weight, dtype=torch.float32))

    def forward(self, slices: torch.Tensor) -> tuple[torch.Tensor, ...]:
        n, s = slices.shape[0], slices.shape[1]
        maps = self.extractor.feature_maps(
            slices.reshape(-1, slices.shape[2], slices.shape[3], slices.shape[4])
        )
        c, h, w = maps.shape[1], maps.shape[2], maps.shape[3]
        pooled = maps.mean(dim=(2, 3)).reshape(n, s, c).mean(dim=1)
        features = pooled.index_select(1, self.indices)
        if not self.with_cam:
            return (features,)
        selected = maps.index_select(1, self.indices)  # [N*S, K, h, w]: only the K used channels
        cam = torch.einsum("bkhw,k->bhw", selected, self.cam_weight).reshape(n, s, h, w) / s
        return features, cam


def export_trunk(
    extractor: nn.Module,
    feature_indices: np.ndarray,
    *,
    cam_weight: np.ndarray | None = None,
    image_size: int = 224,
    slices: int | None = None,
    opset: int = OPSET,
) -> tuple[onnx.ModelProto, Literal["torchscript", "dynamo"], tuple[int, int]]:
    """Export the torch part alone (standard ONNX ops only): returns (model, exporter, (h, w) of the maps).

    Kept separate from the head so precision variants convert/quantise only this part.
    """
    trunk = SliceTrunk(extractor.eval(), feature_indices, cam_weight).eval()
    example = torch.randn(2, slices or 2, 3, image_size, image_size)
    dynamic_s = slices is None
    outputs = [FEATURES, CAM] if trunk.with_cam else [FEATURES]
    axes: dict[str, dict[int, str]] = {INPUT: {0: "N"}, FEATURES: {0: "N"}}
    if dynamic_s:
        axes[INPUT][1] = "S"
    if trunk.with_cam:
        axes[CAM] = {0: "N", 1: "S"} if dynamic_s else {0: "N"}
    with torch.no_grad():
        h, w = (int(v) for v in extractor.feature_maps(example[0, :1]).shape[2:])
        buf = io.BytesIO()
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # the TorchScript exporter's deprecation notice
                torch.onnx.export(
                    trunk,
                    (example,),
                    buf,
                    dynamo=False,
                    input_names=[INPUT],
                    output_names=outputs,
                    dynamic_axes=axes,
                    opset_version=opset,
                    do_constant_folding=True,
                )
            return onnx.load_from_string(buf.getvalue()), "torchscript", (h, w)
        except Exception as exc:  # the legacy exporter is deprecated; fall back to dynamo, loudly
            log.warning(
                "TorchScript ONNX export failed (%s: %s); falling back to the dynamo exporter",
                type(exc).__name__,
                exc,
            )
        from torch.export import Dim

        shapes = {INPUT: {0: Dim("N", min=1, max=4096)}}
        if dynamic_s:
            shapes[INPUT][1] = Dim("S", min=1, max=512)
        program = torch.onnx.export(
            trunk,
            (example,),
            None,
            dynamo=True,
            input_names=[INPUT],
            output_names=outputs,
            dynamic_shapes=shapes,
            opset_version=max(opset, 18),
            verbose=False,
        )
    return program.model_proto, "dynamo", (h, w)


def head_to_onnx(pipeline: Any, n_features: int, *, opset: int = OPSET) -> onnx.ModelProto:
    """The fitted scaler + classifier as ONNX: ``features`` float32 [N,K] -> ``probability`` float32 [N].

    Used inside the merged graph and alone (head.onnx) by the torch Grad-CAM path of non-linear heads.
    """
    from skl2onnx import convert_sklearn
    from skl2onnx.common.data_types import FloatTensorType

    clf = pipeline.steps[-1][1] if hasattr(pipeline, "steps") else pipeline
    col = positive_class_index(clf)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # sklearn 1.9 deprecations read by the converter
        model = convert_sklearn(
            pipeline,
            initial_types=[(FEATURES, FloatTensorType([None, n_features]))],
            options={id(clf): {"zipmap": False}},
            target_opset={"": opset, "ai.onnx.ml": ML_OPSET},
        )
    graph = model.graph
    probs = next(o.name for o in graph.output if o.type.tensor_type.elem_type == TensorProto.FLOAT)
    col_name = "positive_class_column"
    graph.initializer.append(numpy_helper.from_array(np.array(col, dtype=np.int64), col_name))
    graph.node.append(
        helper.make_node("Gather", [probs, col_name], [PROBABILITY], axis=1, name="positive_class")
    )
    del graph.output[:]
    graph.output.append(helper.make_tensor_value_info(PROBABILITY, TensorProto.FLOAT, ["N"]))
    return model


def _set_output_shape(model: onnx.ModelProto, name: str, dims: list[int | str]) -> None:
    out = next(o for o in model.graph.output if o.name == name)
    out.type.tensor_type.ClearField("shape")
    shape = out.type.tensor_type.shape
    for d in dims:
        dim = shape.dim.add()
        if isinstance(d, str):
            dim.dim_param = d
        else:
            dim.dim_value = d


def _opset(model: onnx.ModelProto, domain: str = "") -> int:
    return max(
        o.version for o in model.opset_import if o.domain == domain or (not domain and o.domain == "ai.onnx")
    )


def _tidy_opsets(model: onnx.ModelProto) -> None:
    """One opset entry per domain (the highest), only for domains some node uses (plus the default).

    merge_models concatenates imports and refuses differing versions; quant_pre_process adds imports of
    every domain onnxruntime knows.
    """
    used = {"" if n.domain == "ai.onnx" else n.domain for n in model.graph.node} | {""}
    best: dict[str, int] = {}
    for o in model.opset_import:
        dom = "" if o.domain == "ai.onnx" else o.domain
        if dom in used:
            best[dom] = max(best.get(dom, 0), o.version)
    del model.opset_import[:]
    model.opset_import.extend(helper.make_opsetid(d, v) for d, v in best.items())


def merge_trunk_and_head(
    trunk: onnx.ModelProto,
    head: onnx.ModelProto,
    *,
    has_cam: bool,
    cam_shape: tuple[int | str, int, int] = ("S", 7, 7),
    metadata: dict[str, str] | None = None,
) -> onnx.ModelProto:
    """Join a (possibly converted) trunk and the head on the ``features`` edge; check the result.

    Head nodes and internal edges get the ``head/`` prefix; outputs are ``probability`` [N] then ``cam``.
    """
    head = onnx.compose.add_prefix(head, HEAD_PREFIX, rename_inputs=False, rename_outputs=False)
    trunk = onnx.ModelProto.FromString(trunk.SerializeToString())
    _tidy_opsets(trunk)
    _tidy_opsets(head)
    if _opset(trunk) != _opset(head):
        raise ValueError(f"trunk opset {_opset(trunk)} != head opset {_opset(head)}")
    ir = max(trunk.ir_version, head.ir_version)
    trunk.ir_version = head.ir_version = ir
    merged = onnx.compose.merge_models(
        trunk, head, io_map=[(FEATURES, FEATURES)], producer_name="pdl1-export", name="pdl1_dfsig"
    )
    _tidy_opsets(merged)
    outs = {o.name: o for o in merged.graph.output}
    ordered = [outs[PROBABILITY]] + ([outs[CAM]] if has_cam else [])
    del merged.graph.output[:]
    merged.graph.output.extend(ordered)
    _set_output_shape(merged, PROBABILITY, ["N"])
    if has_cam:
        _set_output_shape(merged, CAM, ["N", *cam_shape])
    if metadata:
        helper.set_model_props(merged, metadata)
    onnx.checker.check_model(merged, full_check=True)
    return merged


@dataclass(frozen=True)
class BuiltGraph:
    """The merged fp32 model plus its parts (variants convert the trunk and re-merge with the head)."""

    model: onnx.ModelProto
    trunk: onnx.ModelProto
    head: onnx.ModelProto
    exporter: Literal["torchscript", "dynamo"]
    has_cam: bool
    slices: int | None  # fixed S, or None when S is a dynamic axis
    image_size: int
    cam_shape: tuple[int | str, int, int]
    metadata: dict[str, str]

    def merge(self, trunk: onnx.ModelProto) -> onnx.ModelProto:
        """The full graph with another version of the trunk (fp16, int8)."""
        return merge_trunk_and_head(
            trunk, self.head, has_cam=self.has_cam, cam_shape=self.cam_shape, metadata=self.metadata
        )


def build_graph(
    extractor: nn.Module,
    feature_indices: np.ndarray,
    pipeline: Any,
    *,
    linear: LinearHead | None = None,
    image_size: int = 224,
    slices: int | None = None,
    opset: int = OPSET,
    metadata: dict[str, str] | None = None,
) -> BuiltGraph:
    """Build and check the single inference graph.

    ``extractor`` must offer ``feature_maps(x[B,3,H,W]) -> [B,C,h,w]`` (core.network.ResNet50Extractor);
    ``pipeline`` is the fitted sklearn head on the raw selected features; ``linear`` (from
    :func:`linear_logit_head`) adds the ``cam`` output; ``slices`` fixes S (None: S is dynamic).
    """
    indices = np.asarray(feature_indices, dtype=np.int64)
    if indices.ndim != 1 or len(indices) == 0:
        raise ValueError(f"feature_indices must be a non-empty 1-D array, got shape {indices.shape}")
    if linear is not None and linear.weight.shape != indices.shape:
        raise ValueError(f"linear head has {linear.weight.shape} weights for {len(indices)} features")
    trunk, exporter, (h, w) = export_trunk(
        extractor,
        indices,
        cam_weight=None if linear is None else linear.weight,
        image_size=image_size,
        slices=slices,
        opset=opset,
    )
    head = head_to_onnx(pipeline, len(indices), opset=_opset(trunk))
    meta = {
        "pdl1.feature_indices": ",".join(map(str, indices.tolist())),
        "pdl1.has_cam": str(linear is not None),
        **(metadata or {}),
    }
    cam_shape: tuple[int | str, int, int] = (slices if slices is not None else "S", h, w)
    merged = merge_trunk_and_head(trunk, head, has_cam=linear is not None, cam_shape=cam_shape, metadata=meta)
    log.info("built ONNX graph (%s exporter, opset %d, cam=%s)", exporter, _opset(merged), linear is not None)
    return BuiltGraph(
        model=merged,
        trunk=trunk,
        head=head,
        exporter=exporter,
        has_cam=linear is not None,
        slices=slices,
        image_size=image_size,
        cam_shape=cam_shape,
        metadata=meta,
    )


def save_model(model: onnx.ModelProto, path: str) -> None:
    """Write a model and re-check it from disk (catches >2 GB/external-data surprises early)."""
    onnx.save_model(model, path)
    onnx.checker.check_model(path, full_check=True)
