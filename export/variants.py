"""Precision variants of the fp32 graph: fp16 (GPU; float32 I/O kept) and static int8 QDQ (CPU).

Only the trunk (ResNet-50 + pooling + CAM; standard ONNX ops) changes precision; it is then re-merged
with the float32 scikit-learn head (ai.onnx.ml ops have no fp16/int8 kernels and the quantisation tools'
shape inference does not know them), so the classifier sees what it was fitted on, up to the trunk's
rounding.

int8 is calibrated on training-cohort slices only (validation cohorts stay unseen) and tried with two
type pairs (U8S8: uint8 activations / int8 weights, and S8S8); :mod:`export.build` keeps the faster one
that passes validation.
"""

from __future__ import annotations

import logging
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx

from export.graph import INPUT

log = logging.getLogger(__name__)

INT8_TYPES = {"u8s8": ("QUInt8", "QInt8"), "s8s8": ("QInt8", "QInt8")}


# Kept float32 in the fp16 trunk: the pooling means (sums of 49 x S values lose ~1e-3 relative in fp16) and
# the CAM contraction; both are negligible compute next to the convolutions.
FP16_KEEP_FLOAT32 = ("ReduceMean", "GlobalAveragePool", "Einsum", "Div")


def to_fp16(trunk: onnx.ModelProto) -> onnx.ModelProto:
    """fp16 weights and convolutions for the trunk; float32 inputs/outputs and pooling."""
    from onnxruntime.transformers.float16 import DEFAULT_OP_BLOCK_LIST, convert_float_to_float16
    from onnxruntime.transformers.onnx_model import OnnxModel

    converted = convert_float_to_float16(
        onnx.ModelProto.FromString(trunk.SerializeToString()),
        keep_io_types=True,
        op_block_list=[*DEFAULT_OP_BLOCK_LIST, *FP16_KEEP_FLOAT32],
    )
    wrapped = OnnxModel(converted)
    wrapped.topological_sort()  # the converter appends its I/O casts at the end of the node list
    converted = wrapped.model
    onnx.checker.check_model(converted, full_check=True)
    return converted


class SliceCalibrationReader:
    """Feeds calibration batches ``[n,S,3,H,W]`` (training-cohort patients) to the quantiser.

    Implements onnxruntime.quantization.CalibrationDataReader (duck-typed; the base class only declares
    ``get_next``), and can be rewound so the same data calibrates every type pair.
    """

    def __init__(self, slices: np.ndarray, *, batch_size: int = 1) -> None:
        if slices.ndim != 5:
            raise ValueError(f"calibration slices must be [N,S,3,H,W], got {slices.shape}")
        self.slices = slices
        self.batch_size = batch_size
        self._it: Iterator[dict[str, np.ndarray]] = iter(())
        self.rewind()

    def rewind(self) -> None:
        self.set_range(0, len(self))

    def set_range(self, start_index: int, end_index: int) -> None:
        """Restrict to batches [start, end): onnxruntime's strided calibration (bounded memory) calls it."""
        bs = self.batch_size
        self._it = (
            {INPUT: np.ascontiguousarray(self.slices[i * bs : (i + 1) * bs], dtype=np.float32)}
            for i in range(start_index, min(end_index, len(self)))
        )

    def get_next(self) -> dict[str, np.ndarray] | None:
        return next(self._it, None)

    def __len__(self) -> int:
        return -(-len(self.slices) // self.batch_size)


def _stride(n_batches: int, most: int = 4) -> int:
    """Largest divisor of n_batches <= most (onnxruntime requires the stride to divide the batch count)."""
    return max(d for d in range(1, min(most, n_batches) + 1) if n_batches % d == 0)


def to_int8(
    trunk: onnx.ModelProto,
    calibration: SliceCalibrationReader,
    *,
    types: str = "u8s8",
    per_channel: bool = True,
    cache_path: Path | None = None,
) -> onnx.ModelProto:
    """Static QDQ int8 trunk, calibrated (MinMax) on ``calibration`` (training-cohort slices).

    Pre-processed with ``quant_pre_process`` (symbolic shape inference + optimisation) as onnxruntime
    recommends. Calibration is strided (``CalibStridedMinMax``): min/max are reduced every few batches, so
    memory stays bounded (ResNet-50 keeps ~100 MB of activations per slice). (``CalibMaxIntermediateOutputs``
    is not used: in onnxruntime 1.31 it discards the collected batches without reducing them.)
    ``cache_path`` (a JSON file) lets a second type pair reuse the ranges without re-running calibration.
    """
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    act, wgt = INT8_TYPES[types]
    calibration.rewind()
    with tempfile.TemporaryDirectory(prefix="pdl1-quant-") as tmp:
        src, pre, out = Path(tmp) / "trunk.onnx", Path(tmp) / "pre.onnx", Path(tmp) / "int8.onnx"
        onnx.save_model(trunk, str(src))
        quant_pre_process(str(src), str(pre))
        quantize_static(
            str(pre),
            str(out),
            calibration,
            quant_format=QuantFormat.QDQ,
            per_channel=per_channel,
            activation_type=getattr(QuantType, act),
            weight_type=getattr(QuantType, wgt),
            calibrate_method=CalibrationMethod.MinMax,
            extra_options={"CalibStridedMinMax": _stride(len(calibration))},
            calibration_cache_path=cache_path,
        )
        quantized = onnx.load_model(str(out))
    onnx.checker.check_model(quantized, full_check=True)
    return quantized


@dataclass(frozen=True)
class Timing:
    """Median seconds per batch of one graph on one provider (for choosing between int8 type pairs)."""

    median_s: float
    batch: int


def time_model(path: Path, batch: np.ndarray, *, repeats: int = 3, threads: int | None = None) -> Timing:
    """Median run time of ``path`` on the CPU provider for one input batch (after one warm-up run)."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    if threads:
        opts.intra_op_num_threads = threads
    session = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
    session.run(None, {INPUT: batch})
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        session.run(None, {INPUT: batch})
        times.append(time.perf_counter() - t0)
    return Timing(median_s=float(np.median(times)), batch=int(batch.shape[0]))
