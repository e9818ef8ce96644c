"""Regenerate the Open Inference Protocol stubs: ``python -m service.oip.generate``.

Runs ``grpc_tools.protoc`` on ``grpc_predict_v2.proto`` and then moves the generated descriptors into
a PRIVATE descriptor pool (`grpc_predict_v2_pb2.POOL`). Why: the protocol's messages are named
``inference.*`` — the same full names as Triton's own ``grpc_service.proto`` that ships inside
``tritonclient``. Two files defining the same symbols cannot share protobuf's default pool, so without
this step importing our stubs and ``tritonclient.grpc`` in one process (tests, notebooks) fails with
"duplicate symbol". The wire format is unaffected.
"""

from __future__ import annotations

import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
PROTO = HERE / "grpc_predict_v2.proto"
PB2 = HERE / "grpc_predict_v2_pb2.py"
DEFAULT_POOL = "_descriptor_pool.Default().AddSerializedFile("
PRIVATE_POOL = "POOL.AddSerializedFile("
POOL_LINE = (
    "# A private pool: Triton's grpc_service.proto defines the same `inference.*` names (see generate.py).\n"
    "POOL = _descriptor_pool.DescriptorPool()\n"
)


def generate() -> None:
    """Run protoc (Python messages and gRPC stubs) and patch the pool; raise on any failure."""
    from grpc_tools import protoc

    args = [
        "grpc_tools.protoc",
        f"-I{ROOT}",
        f"--python_out={ROOT}",
        f"--grpc_python_out={ROOT}",
        str(PROTO.relative_to(ROOT)),
    ]
    if protoc.main(args) != 0:
        raise RuntimeError(f"protoc failed on {PROTO}")
    text = PB2.read_text()
    if DEFAULT_POOL not in text:
        raise RuntimeError(f"unexpected protoc output in {PB2}: cannot find {DEFAULT_POOL!r}")
    text = text.replace(DEFAULT_POOL, PRIVATE_POOL, 1)
    text = text.replace("DESCRIPTOR = " + PRIVATE_POOL, POOL_LINE + "DESCRIPTOR = " + PRIVATE_POOL, 1)
    PB2.write_text(text)


if __name__ == "__main__":  # pragma: no cover
    generate()
    sys.stdout.write(f"generated {PB2.name} and {PB2.stem}_grpc.py from {PROTO.name}\n")
