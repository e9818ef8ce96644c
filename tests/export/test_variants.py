"""fp16 and int8 trunks: interface kept (float32 I/O), precision actually reduced, results close, re-merge ok.

Uses the cheap stand-in extractor: these tests are about the conversion mechanics; accuracy on ResNet-50
is what export validation measures (tests/export/test_build.py).
"""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from export_fixtures import FEATURES, S, blob_slices
from onnx import TensorProto

from export.graph import CAM, INPUT, PROBABILITY, build_graph, linear_logit_head
from export.variants import SliceCalibrationReader, _stride, to_fp16, to_int8


@pytest.fixture(scope="module")
def tiny_built(tiny):
    import torch

    x = blob_slices(6, S, seed=5)
    with torch.no_grad():
        pooled = tiny(torch.from_numpy(x).reshape(-1, 3, 224, 224)).reshape(6, S, -1).mean(1).numpy()
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import Pipeline
    from sklearn.preprocessing import StandardScaler

    idx = FEATURES
    pipe = Pipeline([("s", StandardScaler()), ("c", LogisticRegression())]).fit(pooled[:, idx], [0, 1] * 3)
    built = build_graph(tiny, idx, pipe, linear=linear_logit_head(pipe, pooled[:, idx]), slices=S)
    return built, x


def _run(model: onnx.ModelProto, x: np.ndarray) -> list[np.ndarray]:
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return session.run([PROBABILITY, CAM], {INPUT: x})


def _io_types(model: onnx.ModelProto) -> set[int]:
    return {v.type.tensor_type.elem_type for v in [*model.graph.input, *model.graph.output]}


def test_fp16_trunk_keeps_float32_io_and_stores_fp16_weights(tiny_built) -> None:
    built, x = tiny_built
    trunk16 = to_fp16(built.trunk)
    assert _io_types(trunk16) == {TensorProto.FLOAT}
    assert any(t.data_type == TensorProto.FLOAT16 for t in trunk16.graph.initializer)
    merged = built.merge(trunk16)
    onnx.checker.check_model(merged, full_check=True)
    (p32, c32), (p16, c16) = _run(built.model, x), _run(merged, x)
    assert np.max(np.abs(p16 - p32)) < 2e-2
    assert np.max(np.abs(c16 - c32)) <= 2e-2 * np.abs(c32).max()
    assert not np.array_equal(p16, p32)  # precision really changed


def test_calibration_reader_batches_and_strided_ranges() -> None:
    data = np.zeros((5, S, 3, 8, 8), np.float32)
    reader = SliceCalibrationReader(data, batch_size=2)
    assert len(reader) == 3
    shapes = [b[INPUT].shape[0] for b in iter(reader.get_next, None)]
    assert shapes == [2, 2, 1]
    reader.set_range(1, 3)
    assert len(list(iter(reader.get_next, None))) == 2
    reader.rewind()
    assert len(list(iter(reader.get_next, None))) == 3
    assert [_stride(n) for n in (1, 5, 6, 8, 9)] == [1, 1, 3, 4, 3]


def test_int8_trunk_is_qdq_and_close_to_fp32(tiny_built, tmp_path) -> None:
    built, x = tiny_built
    reader = SliceCalibrationReader(blob_slices(5, S, seed=7), batch_size=1)  # 5 batches: stride 1
    cache = tmp_path / "ranges.json"
    q = to_int8(built.trunk, reader, types="u8s8", cache_path=cache)
    ops = {n.op_type for n in q.graph.node}
    assert {"QuantizeLinear", "DequantizeLinear"} <= ops
    assert cache.is_file()  # a second type pair reuses the calibration
    q2 = to_int8(built.trunk, reader, types="s8s8", cache_path=cache)
    merged = built.merge(q)
    onnx.checker.check_model(merged, full_check=True)
    assert _io_types(merged) == {TensorProto.FLOAT}
    (p32, _), (p8, _) = _run(built.model, x), _run(merged, x)
    assert np.max(np.abs(p8 - p32)) < 0.1
    zero_points = {
        t.data_type for t in q2.graph.initializer if t.name.endswith("zero_point") and "input" not in t.name
    }
    assert TensorProto.INT8 in zero_points
