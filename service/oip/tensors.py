"""Open Inference Protocol tensors <-> numpy, for gRPC (typed or raw contents) and REST (JSON).

BYTES tensors in raw form are a sequence of elements, each a 4-byte little-endian length followed by
the bytes (the protocol's raw encoding, also what tritonclient sends). Over JSON, the protocol carries
BYTES elements as strings; file contents are therefore base64 strings there (see `decode_json_bytes`).
"""

from __future__ import annotations

import base64
import binascii
import struct
from typing import Any

import numpy as np

from service.errors import PayloadTooLarge, RequestError
from service.oip import grpc_predict_v2_pb2 as pb

NUMPY_DTYPES: dict[str, Any] = {
    "BOOL": np.bool_,
    "UINT8": np.uint8,
    "UINT16": np.uint16,
    "UINT32": np.uint32,
    "UINT64": np.uint64,
    "INT8": np.int8,
    "INT16": np.int16,
    "INT32": np.int32,
    "INT64": np.int64,
    "FP16": np.float16,
    "FP32": np.float32,
    "FP64": np.float64,
    "BYTES": np.object_,
}
# Which InferTensorContents field holds each datatype (FP16/BF16 only travel raw).
CONTENTS_FIELD = {
    "BOOL": "bool_contents",
    "INT8": "int_contents",
    "INT16": "int_contents",
    "INT32": "int_contents",
    "INT64": "int64_contents",
    "UINT8": "uint_contents",
    "UINT16": "uint_contents",
    "UINT32": "uint_contents",
    "UINT64": "uint64_contents",
    "FP32": "fp32_contents",
    "FP64": "fp64_contents",
    "BYTES": "bytes_contents",
}


def check_shape(name: str, shape: list[int] | tuple[int, ...], max_elements: int) -> int:
    """Element count of `shape`; rejects negative dimensions and absurd sizes before allocating."""
    dims = [int(d) for d in shape]
    if any(d < 0 for d in dims):
        raise RequestError(f"shape {dims} has a negative dimension", field=name)
    count = int(np.prod(dims, dtype=np.float64)) if dims else 1
    if count > max_elements:
        raise PayloadTooLarge(
            f"shape {dims} has {count:,} elements, above the {max_elements:,} limit", field=name
        )
    return count


def decode_raw_bytes(raw: bytes, name: str) -> list[bytes]:
    """Length-prefixed BYTES elements -> list of bytes."""
    items, offset = [], 0
    while offset < len(raw):
        if offset + 4 > len(raw):
            raise RequestError("raw BYTES content ends inside a length prefix", field=name)
        (length,) = struct.unpack_from("<I", raw, offset)
        offset += 4
        if offset + length > len(raw):
            raise RequestError("raw BYTES element is longer than the remaining content", field=name)
        items.append(raw[offset : offset + length])
        offset += length
    return items


def encode_raw_bytes(items: list[bytes]) -> bytes:
    return b"".join(struct.pack("<I", len(b)) + b for b in items)


def grpc_input_to_numpy(
    tensor: pb.ModelInferRequest.InferInputTensor, raw: bytes | None, *, max_elements: int
) -> np.ndarray:
    """One input tensor (typed `contents` or its `raw_input_contents` entry) -> numpy array of `shape`."""
    name, datatype = tensor.name, tensor.datatype.upper()
    if datatype not in NUMPY_DTYPES:
        raise RequestError(f"unsupported datatype {tensor.datatype!r}", field=name)
    shape = list(tensor.shape)
    count = check_shape(name, shape, max_elements)
    if datatype == "BYTES":
        items = decode_raw_bytes(raw, name) if raw is not None else list(tensor.contents.bytes_contents)
        flat = np.empty(len(items), dtype=np.object_)
        flat[:] = items
    elif raw is not None:
        dtype = np.dtype(NUMPY_DTYPES[datatype]).newbyteorder("<")
        needed = count * dtype.itemsize
        if len(raw) != needed:
            raise RequestError(
                f"raw content has {len(raw)} bytes; shape {shape} of {datatype} needs {needed}",
                field=name,
            )
        flat = np.frombuffer(raw, dtype=dtype).astype(NUMPY_DTYPES[datatype])
    else:
        if datatype not in CONTENTS_FIELD:
            raise RequestError(f"{datatype} tensors must use raw_input_contents", field=name)
        flat = np.asarray(getattr(tensor.contents, CONTENTS_FIELD[datatype]), dtype=NUMPY_DTYPES[datatype])
    if flat.size != count:
        raise RequestError(f"has {flat.size} elements but shape {shape} needs {count}", field=name)
    return flat.reshape(shape)


def numpy_to_grpc_output(
    name: str, datatype: str, array: np.ndarray, *, raw: bool
) -> tuple[pb.ModelInferResponse.InferOutputTensor, bytes | None]:
    """numpy -> output tensor (+ its raw bytes when `raw`, the form tritonclient reads)."""
    tensor = pb.ModelInferResponse.InferOutputTensor(name=name, datatype=datatype, shape=list(array.shape))
    flat = array.reshape(-1)
    if raw:
        if datatype == "BYTES":
            return tensor, encode_raw_bytes([bytes(b) for b in flat])
        dtype = np.dtype(NUMPY_DTYPES[datatype]).newbyteorder("<")
        return tensor, np.ascontiguousarray(flat, dtype=dtype).tobytes()
    getattr(tensor.contents, CONTENTS_FIELD[datatype]).extend(
        [bytes(b) for b in flat] if datatype == "BYTES" else flat.tolist()
    )
    return tensor, None


def json_input_to_numpy(tensor: dict[str, Any], *, max_elements: int) -> np.ndarray:
    """A REST input tensor {"name", "shape", "datatype", "data"} -> numpy (BYTES stay str/bytes objects)."""
    name = str(tensor.get("name", "?"))
    datatype = str(tensor.get("datatype", "")).upper()
    if datatype not in NUMPY_DTYPES or datatype == "FP16":
        raise RequestError(f"unsupported datatype {tensor.get('datatype')!r}", field=name)
    shape = tensor.get("shape")
    if not isinstance(shape, list) or not all(isinstance(d, int) for d in shape):
        raise RequestError("'shape' must be a list of integers", field=name)
    count = check_shape(name, shape, max_elements)
    data = tensor.get("data")
    if data is None:
        raise RequestError("'data' is missing (binary tensor data is not supported over REST)", field=name)
    if datatype == "BYTES":
        flat = np.empty(count, dtype=np.object_)
        items = list(np.asarray(data, dtype=np.object_).reshape(-1))
        if len(items) != count:
            raise RequestError(f"has {len(items)} elements but shape {shape} needs {count}", field=name)
        flat[:] = items
    else:
        try:
            flat = np.asarray(data, dtype=NUMPY_DTYPES[datatype]).reshape(-1)
        except (TypeError, ValueError) as exc:
            raise RequestError(
                f"data is not a {datatype} array ({exc.__class__.__name__})", field=name
            ) from exc
        if flat.size != count:
            raise RequestError(f"has {flat.size} elements but shape {shape} needs {count}", field=name)
    return flat.reshape(shape)


def numpy_to_json_output(name: str, datatype: str, array: np.ndarray) -> dict[str, Any]:
    """numpy -> REST output tensor (BYTES as base64 strings, the only lossless JSON form for files)."""
    flat = array.reshape(-1)
    if datatype == "BYTES":
        data: list[Any] = [base64.b64encode(bytes(b)).decode("ascii") for b in flat]
    else:
        data = flat.tolist()
    return {"name": name, "datatype": datatype, "shape": list(array.shape), "data": data}


def decode_json_bytes(item: Any, name: str) -> bytes:
    """A BYTES element from JSON: a base64 string of the file contents."""
    if isinstance(item, bytes):
        return item
    if not isinstance(item, str):
        raise RequestError("BYTES elements must be base64 strings over JSON", field=name)
    try:
        return base64.b64decode(item, validate=True)
    except (binascii.Error, ValueError) as exc:
        raise RequestError(
            "BYTES elements must be base64-encoded file contents over JSON", field=name
        ) from exc


def param_value(param: pb.InferParameter) -> Any:
    """The Python value of an InferParameter (whichever oneof member is set)."""
    which = param.WhichOneof("parameter_choice")
    return None if which is None else getattr(param, which)
