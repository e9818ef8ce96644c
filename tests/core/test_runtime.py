"""InferenceModel on a tiny hand-built export (no ResNet): integrity, variant choice, providers, validation.

The graphs: probability = sigmoid(k * mean(slices)) (k = 1 for fp32, 2 for the 'int8' stand-in, so the
tests can tell which file was loaded) and cam = mean over channels. The full ResNet-50 export is tested
in tests/export/test_build.py.
"""

from __future__ import annotations

import logging
import shutil
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

from core.errors import InputError, IntegrityError
from core.manifest import HeadInfo, ModelManifest, VariantInfo, hash_files, write_manifest
from core.runtime import CPU, CUDA, InferenceModel

S, SIZE = 2, 32


def tiny_graph(k: float) -> onnx.ModelProto:
    x = helper.make_tensor_value_info("slices", TensorProto.FLOAT, ["N", S, 3, SIZE, SIZE])
    p = helper.make_tensor_value_info("probability", TensorProto.FLOAT, ["N"])
    cam = helper.make_tensor_value_info("cam", TensorProto.FLOAT, ["N", S, SIZE, SIZE])
    nodes = [
        helper.make_node("ReduceMean", ["slices"], ["m"], axes=[1, 2, 3, 4], keepdims=0),
        helper.make_node("Mul", ["m", "k"], ["km"]),
        helper.make_node("Sigmoid", ["km"], ["probability"]),
        helper.make_node("ReduceMean", ["slices"], ["cam"], axes=[2], keepdims=0),
    ]
    k_init = helper.make_tensor("k", TensorProto.FLOAT, [], [k])
    graph = helper.make_graph(nodes, "tiny", [x], [p, cam], initializer=[k_init])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model, full_check=True)
    return model


@pytest.fixture
def export(tmp_path: Path) -> Path:
    onnx.save(tiny_graph(1.0), tmp_path / "model.fp32.onnx")
    onnx.save(tiny_graph(2.0), tmp_path / "model.int8.onnx")
    np.savez(tmp_path / "head.npz", feature_indices=np.array([1, 2]))
    files = ["model.fp32.onnx", "model.int8.onnx", "head.npz"]
    manifest = ModelManifest(
        name="tiny",
        version="v1",
        training_run_id="run",
        source_run="/run",
        preprocess={"size": SIZE, "n_slices": S},
        input_shape=["N", S, 3, SIZE, SIZE],
        outputs={"probability": ["N"], "cam": ["N", S, SIZE, SIZE]},
        feature_names=["a", "b"],
        feature_indices=[1, 2],
        threshold=0.5,
        head=HeadInfo(model_name="lr", classifier="LogisticRegression", type="linear"),
        has_graph_cam=True,
        files=hash_files(tmp_path, files),
        variants={
            "fp32": VariantInfo(file="model.fp32.onnx", published=True, precision="float32", target="CPU"),
            "fp16": VariantInfo(file="model.fp16.onnx", published=False, precision="float16", target="CUDA"),
            "int8": VariantInfo(file="model.int8.onnx", published=True, precision="int8", target="CPU"),
        },
        intended_use="tests",
        limitations=[],
        synthetic_data=True,
    )
    write_manifest(manifest, tmp_path)
    return tmp_path


def _x(n: int = 3, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).normal(size=(n, S, 3, SIZE, SIZE)).astype(np.float32)


def _sigmoid(v: np.ndarray) -> np.ndarray:
    return 1 / (1 + np.exp(-v))


def test_cpu_default_is_int8_and_fp32_is_selectable(export: Path) -> None:
    x = _x()
    m = InferenceModel.load(export, providers=[CPU])
    assert (m.variant, m.provider, m.fallback) == ("int8", CPU, None)
    expected = _sigmoid(2 * x.mean(axis=(1, 2, 3, 4)))
    np.testing.assert_allclose(m.predict(x)["probability"], expected, atol=1e-6)
    m32 = InferenceModel.load(export / "manifest.json", variant="fp32", providers=[CPU])
    out = m32.predict(x)
    np.testing.assert_allclose(out["probability"], _sigmoid(x.mean(axis=(1, 2, 3, 4))), atol=1e-6)
    np.testing.assert_allclose(out["cam"], x.mean(axis=2), atol=1e-6)
    assert m32.threshold == 0.5 and m32.has_graph_cam and m32.tag == "tiny:v1"
    assert m32.preprocess_config.size == SIZE
    assert m32.warmup((1, 2)) > 0
    bound = m32._run_bound(x, "cpu")  # the IO-binding path CUDA uses, on CPU memory
    for name in ("probability", "cam"):
        np.testing.assert_allclose(bound[name], out[name], atol=1e-7)
    with pytest.raises(InputError, match="not published"):
        InferenceModel.load(export, variant="fp16", providers=[CPU])


def test_a_tampered_graph_or_any_listed_file_is_refused(export: Path, tmp_path_factory) -> None:
    for name in ("model.fp32.onnx", "head.npz"):
        copy = tmp_path_factory.mktemp("copy") / "e"
        shutil.copytree(export, copy)
        data = bytearray((copy / name).read_bytes())
        data[len(data) // 2] ^= 0xFF
        (copy / name).write_bytes(bytes(data))
        with pytest.raises(IntegrityError, match=name.replace(".", r"\.")):
            InferenceModel.load(copy, variant="fp32", providers=[CPU])


def test_cuda_request_reports_the_provider_it_got(export: Path, caplog: pytest.LogCaptureFixture) -> None:
    x = _x(4)
    cpu = InferenceModel.load(export, variant="fp32", providers=[CPU]).predict(x)
    with caplog.at_level(logging.WARNING, logger="core.runtime"):
        m = InferenceModel.load(export, providers=[(CUDA, {"device_id": 0}), CPU])
    assert m.requested_providers == [CUDA, CPU]
    assert m.provider == m.session.get_providers()[0]
    if m.provider == CUDA:  # a GPU machine: IO binding path, fp16 is not published so fp32 runs
        assert m.fallback is None and m.variant == "fp32"
        got = m.predict(x)
        np.testing.assert_allclose(got["probability"], cpu["probability"], atol=1e-5)
        np.testing.assert_allclose(got["cam"], cpu["cam"], atol=1e-5)
    else:  # no usable CUDA: a logged, recorded fallback to the CPU default variant
        assert m.provider == CPU and m.fallback and "CUDA was requested" in m.fallback
        assert any(r.levelno == logging.WARNING and "CUDA was requested" in r.message for r in caplog.records)
        assert m.variant == "int8"


@pytest.mark.parametrize(
    ("bad", "match"),
    [
        (_x().astype(np.float64), "dtype float32"),
        (_x()[:, :1], "expected shape"),
        (np.zeros((1, S, 3, 16, 16), np.float32), "expected shape"),
        (np.zeros((0, S, 3, SIZE, SIZE), np.float32), "expected shape"),
        (_x()[0], "expected shape"),
        (np.where(_x() > 2, np.nan, _x()).astype(np.float32), "NaN"),
        (_x().tolist(), "numpy array"),
    ],
)
def test_bad_inputs_are_input_errors(export: Path, bad, match: str) -> None:
    m = InferenceModel.load(export, variant="fp32", providers=[CPU])
    with pytest.raises(InputError, match=match) as err:
        m.predict(bad)
    assert err.value.field == "slices"


def test_not_an_export_is_an_input_error(tmp_path: Path) -> None:
    with pytest.raises(InputError, match="manifest not found"):
        InferenceModel.load(tmp_path)
    with pytest.raises(InputError, match="not an export directory"):
        InferenceModel.load(tmp_path / "missing")
