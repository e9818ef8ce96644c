"""Load test of a running PD-L1 service on loopback: throughput and p50/p99 latency, HTTP and gRPC.

    python -m bench.load --image IMG --mask MASK [--url http://127.0.0.1:3000] [--grpc 127.0.0.1:8001]
        [--concurrency 1,8,32,64] [--requests 64] [--max-seconds 120] [--out bench/results/load.json]

or let it start the service itself, once with adaptive batching and once with max_batch_size=1, and
report both side by side (same machine, same run):

    python -m bench.load --image IMG --mask MASK --model-dir EXPORT --compare-batching

Two request kinds (``--inputs``): ``upload`` sends the image and mask files (the service reads and
preprocesses them: HTTP ``/predict``, gRPC model ``pdl1``); ``preprocessed`` sends the same patient's
network input, preprocessed here with the export's own config (HTTP ``/predict_preprocessed`` with a
.npy, gRPC model ``pdl1-graph`` with an FP32 tensor), so it measures serving and batching without the
preprocessing that shares the CPUs. With ``--compare-batching``, once the servers are stopped, the bare
graph (``core.runtime.InferenceModel`` on the same export, variant and threads) is timed in this process
at batch 1 and at the batch sizes the service ran: the "same batch size" reference for the service's
throughput, and the ceiling of what batching can gain on this machine (bare graph at batch B / batch 1).

Bounded: each (protocol, concurrency) level sends at most --requests requests and stops starting new
ones after --max-seconds. Loopback only: other hosts are refused. The batch sizes the graph service
actually ran come from BentoML's `bentoml_service_adaptive_batch_size` histogram in /metrics.
"""

from __future__ import annotations

import argparse
import asyncio
import io
import json
import os
import socket
import subprocess
import sys
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
LOOPBACK = {"127.0.0.1", "localhost", "::1"}
BATCH_METRIC = "bentoml_service_adaptive_batch_size"


def _check_loopback(host: str | None) -> None:
    if host not in LOOPBACK:
        raise SystemExit(f"refusing to load-test {host!r}: loopback addresses only ({sorted(LOOPBACK)})")


def batch_histogram(metrics_text: str, service: str = "PDL1Graph") -> tuple[float, float]:
    """(sum, count) of the graph service's adaptive batch size histogram, over all its workers."""
    total = count = 0.0
    for line in metrics_text.splitlines():
        if not line.startswith(BATCH_METRIC) or f'service_name="{service}"' not in line:
            continue
        value = float(line.rsplit(" ", 1)[1])
        if line.startswith(BATCH_METRIC + "_sum"):
            total += value
        elif line.startswith(BATCH_METRIC + "_count"):
            count += value
    return total, count


async def _run_level(call: Any, concurrency: int, n_requests: int, max_seconds: float) -> dict[str, Any]:
    latencies: list[float] = []
    errors: list[str] = []
    next_index = 0
    deadline = time.perf_counter() + max_seconds

    async def worker() -> None:
        nonlocal next_index
        while next_index < n_requests and time.perf_counter() < deadline:
            next_index += 1
            t0 = time.perf_counter()
            try:
                await call()
            except Exception as exc:  # counted and reported, never hidden
                errors.append(f"{type(exc).__name__}: {exc}"[:200])
            else:
                latencies.append(time.perf_counter() - t0)

    t0 = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    wall = time.perf_counter() - t0
    lat = np.asarray(latencies) * 1000.0
    return {
        "concurrency": concurrency,
        "completed": len(latencies),
        "errors": len(errors),
        "first_errors": errors[:3],
        "wall_s": round(wall, 3),
        "throughput_rps": round(len(latencies) / wall, 3) if wall > 0 else None,
        "p50_ms": round(float(np.percentile(lat, 50)), 1) if lat.size else None,
        "p99_ms": round(float(np.percentile(lat, 99)), 1) if lat.size else None,
        "mean_ms": round(float(lat.mean()), 1) if lat.size else None,
    }


@dataclass(frozen=True)
class Payload:
    """One patient, as each request kind sends it."""

    image: bytes
    mask: bytes
    slices: np.ndarray  # network input [S,3,H,W] float32 (preprocessed with the export's config)

    @property
    def npy(self) -> bytes:
        buf = io.BytesIO()
        np.save(buf, self.slices)
        return buf.getvalue()


def network_input(image: Path, mask: Path, model_dir: str | None) -> np.ndarray:
    """The patient's network input, preprocessed with the export's config from its manifest (the
    default config when no export is given)."""
    from core.manifest import MANIFEST_NAME, ModelManifest
    from core.preprocessing import PreprocessConfig, preprocess_files

    config = None
    if model_dir:
        manifest = ModelManifest.read(Path(model_dir) / MANIFEST_NAME)
        config = PreprocessConfig.model_validate(manifest.preprocess)
    return np.ascontiguousarray(preprocess_files(image, mask, config).slices, dtype=np.float32)


async def _http_levels(args: argparse.Namespace, kind: str, payload: Payload) -> list[dict[str, Any]]:
    import httpx

    headers = {"authorization": f"Bearer {args.token}"} if args.token else {}
    limits = httpx.Limits(max_connections=max(args.concurrency) + 4)
    npy = payload.npy
    route, files = (
        ("/predict", {"image": ("image.nii.gz", payload.image), "mask": ("mask.nii.gz", payload.mask)})
        if kind == "upload"
        else ("/predict_preprocessed", {"npy": ("slices.npy", npy)})
    )
    results = []
    async with httpx.AsyncClient(
        base_url=args.url, headers=headers, timeout=args.timeout, limits=limits
    ) as client:

        async def call() -> None:
            response = await client.post(route, files=files)
            if response.status_code != 200:
                raise RuntimeError(f"HTTP {response.status_code}: {response.text[:120]}")

        await call()  # warm the front (first request imports readers)
        for c in args.concurrency:
            before = batch_histogram((await client.get("/metrics")).text)
            level = await _run_level(call, c, args.requests, args.max_seconds)
            after = batch_histogram((await client.get("/metrics")).text)
            level["mean_batch_size"] = _mean_batch(before, after)
            results.append({"protocol": "http", "input": kind, **level})
            print(json.dumps(results[-1]), file=sys.stderr)
    return results


def grpc_request(kind: str, payload: Payload) -> Any:
    """The Open Inference Protocol request for one patient: files to `pdl1`, or the FP32 network input
    (raw little-endian contents, [1,S,3,H,W]) to `pdl1-graph`."""
    from service.oip import grpc_predict_v2_pb2 as pb
    from service.oip.models import FILE_MODEL, GRAPH_MODEL
    from service.oip.tensors import encode_raw_bytes

    if kind == "upload":
        request = pb.ModelInferRequest(model_name=FILE_MODEL)
        for name, data in (("image", payload.image), ("mask", payload.mask)):
            request.inputs.add(name=name, datatype="BYTES", shape=[1])
            request.raw_input_contents.append(encode_raw_bytes([data]))
        return request
    x = payload.slices[None]
    request = pb.ModelInferRequest(model_name=GRAPH_MODEL)
    request.inputs.add(name="slices", datatype="FP32", shape=list(x.shape))
    request.raw_input_contents.append(x.astype("<f4", copy=False).tobytes())
    return request


async def _grpc_levels(args: argparse.Namespace, kind: str, payload: Payload) -> list[dict[str, Any]]:
    import grpc
    import httpx

    from service.oip import grpc_predict_v2_pb2_grpc as pb_grpc

    request = grpc_request(kind, payload)
    metadata = (("authorization", f"Bearer {args.token}"),) if args.token else ()
    limit = 1 << 30
    options = [("grpc.max_receive_message_length", limit), ("grpc.max_send_message_length", limit)]
    results = []
    async with (
        grpc.aio.insecure_channel(args.grpc, options=options) as channel,
        httpx.AsyncClient(base_url=args.url, timeout=30) as http,
    ):
        stub = pb_grpc.GRPCInferenceServiceStub(channel)

        async def call() -> None:
            await stub.ModelInfer(request, metadata=metadata, timeout=args.timeout)

        await call()
        for c in args.concurrency:
            before = batch_histogram((await http.get("/metrics", headers=dict(metadata))).text)
            level = await _run_level(call, c, args.requests, args.max_seconds)
            after = batch_histogram((await http.get("/metrics", headers=dict(metadata))).text)
            level["mean_batch_size"] = _mean_batch(before, after)
            results.append({"protocol": "grpc", "input": kind, **level})
            print(json.dumps(results[-1]), file=sys.stderr)
    return results


def _mean_batch(before: tuple[float, float], after: tuple[float, float]) -> float | None:
    calls = after[1] - before[1]
    return round((after[0] - before[0]) / calls, 2) if calls > 0 else None


def run_against(args: argparse.Namespace, payload: Payload) -> list[dict[str, Any]]:
    results: list[dict[str, Any]] = []
    for kind in args.inputs:
        if "http" in args.protocols:
            results += asyncio.run(_http_levels(args, kind, payload))
        if "grpc" in args.protocols:
            results += asyncio.run(_grpc_levels(args, kind, payload))
    return results


def bare_graph(
    model_dir: str, slices: np.ndarray, batches: list[int], *, repeats: int = 5, budget_s: float = 120.0
) -> dict[str, Any]:
    """The served graph without the service: ``core.runtime.InferenceModel`` on the same export with the
    service's defaults (variant, providers, threads), timed interleaved at each batch (patients)."""
    from bench import common
    from core.runtime import InferenceModel

    model = InferenceModel.load(model_dir)
    inputs = {b: np.ascontiguousarray(np.repeat(slices[None], b, axis=0)) for b in sorted(set(batches))}
    times = common.interleaved(
        {str(b): (lambda x=x: model.predict(x)) for b, x in inputs.items()},
        repeats=repeats,
        budget_s=budget_s,
        min_repeats=3,
    )
    per_patient = int(slices.shape[0])
    rows = []
    for b in inputs:
        st = common.stats(times[str(b)])
        n_slices = b * per_patient
        rows.append(
            {"batch_patients": b, "batch_slices": n_slices, **st, "slices_per_s": n_slices / st["median_s"]}
        )
    return {
        "variant": model.variant,
        "provider": model.provider,
        "slices_per_patient": per_patient,
        "rows": rows,
    }


def observed_batches(runs: list[dict[str, Any]]) -> list[int]:
    """Batch sizes (patients) the batching service actually ran, rounded, plus 1."""
    sizes = {1}
    for r in runs:
        if r.get("mode") == "batching" and r.get("mean_batch_size"):
            sizes.add(max(1, round(float(r["mean_batch_size"]))))
    return sorted(sizes)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextmanager
def serving(model_dir: str, *, max_batch_size: int, max_latency_ms: int, startup_s: float = 600):
    """Start `bentoml serve` on loopback with these batching settings; yields (http_url, grpc_target)."""
    import httpx

    http_port, grpc_port = _free_port(), _free_port()
    env = {
        **os.environ,
        "BENTOML_DO_NOT_TRACK": "1",
        "PDL1_MODEL_DIR": str(Path(model_dir).resolve()),
        "PDL1_GRPC_HOST": "127.0.0.1",
        "PDL1_GRPC_PORT": str(grpc_port),
        "PDL1_MAX_BATCH_SIZE": str(max_batch_size),
        "PDL1_MAX_LATENCY_MS": str(max_latency_ms),
    }
    env.pop("PDL1_API_TOKEN", None)
    bentoml = Path(sys.executable).with_name("bentoml")
    cmd = [str(bentoml), "serve", "service.service:PDL1", "--host", "127.0.0.1", "--port", str(http_port)]
    log = open(ROOT / "bench" / f".load_server_{http_port}.log", "w")  # noqa: SIM115 (closed below)
    proc = subprocess.Popen(
        cmd, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
    )
    url = f"http://127.0.0.1:{http_port}"
    try:
        deadline = time.monotonic() + startup_s
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"server exited with {proc.returncode}; see {log.name}")
            try:
                if httpx.get(url + "/readyz", timeout=5).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                raise TimeoutError(f"server not ready after {startup_s} s; see {log.name}")
            time.sleep(2)
        yield url, f"127.0.0.1:{grpc_port}"
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, 15)
            try:
                proc.wait(60)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, 9)
                proc.wait(30)
        log.close()


def main(argv: list[str] | None = None) -> dict[str, Any]:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--image", required=True)
    p.add_argument("--mask", required=True)
    p.add_argument("--url", default="http://127.0.0.1:3000")
    p.add_argument("--grpc", default="127.0.0.1:8001")
    p.add_argument("--protocols", default="http,grpc")
    p.add_argument("--inputs", default="upload,preprocessed", help="Request kinds: upload, preprocessed.")
    p.add_argument("--concurrency", default="1,8,32,64")
    p.add_argument("--requests", type=int, default=64, help="Most requests per level.")
    p.add_argument("--max-seconds", type=float, default=120.0, help="Stop starting requests after this.")
    p.add_argument("--timeout", type=float, default=600.0, help="Per-request timeout.")
    p.add_argument("--token", default=os.environ.get("PDL1_API_TOKEN"))
    p.add_argument("--model-dir", help="Start the service on this export (with --compare-batching).")
    p.add_argument("--compare-batching", action="store_true", help="Run batching on, then max_batch_size=1.")
    p.add_argument("--max-batch-size", type=int, default=32)
    p.add_argument("--max-latency-ms", type=int, default=60000)
    p.add_argument("--out", default=str(ROOT / "bench" / "results" / "load.json"))
    args = p.parse_args(argv)
    args.concurrency = [int(c) for c in args.concurrency.split(",") if c]
    args.protocols = [x.strip() for x in args.protocols.split(",") if x.strip()]
    args.inputs = [x.strip() for x in args.inputs.split(",") if x.strip()]
    if not set(args.inputs) <= {"upload", "preprocessed"} or not args.inputs:
        raise SystemExit("--inputs must be a subset of upload,preprocessed")
    if not 1 <= args.requests <= 10_000 or not 0 < args.max_seconds <= 3600:
        raise SystemExit("--requests must be 1..10000 and --max-seconds 0..3600 (this is a bounded test)")

    report: dict[str, Any] = {
        "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "host": {"cpus": os.cpu_count(), "platform": sys.platform},
        "settings": {k: v for k, v in vars(args).items() if k not in ("token",)},
        "runs": [],
    }
    image, mask = Path(args.image), Path(args.mask)
    payload = Payload(image.read_bytes(), mask.read_bytes(), network_input(image, mask, args.model_dir))
    if args.compare_batching:
        if not args.model_dir:
            raise SystemExit("--compare-batching needs --model-dir")
        # A fresh server for every (mode, input, protocol): BentoML's adaptive batcher learns how long to
        # hold requests from the queue waits of its last 50 batches, so after an overloaded level (64
        # clients) it kept a lone request waiting: p50 696 ms at 1 client vs 177 ms on a fresh server.
        for label, mbs in (("batching", args.max_batch_size), ("max_batch_size=1", 1)):
            for kind in args.inputs:
                for proto in args.protocols:
                    with serving(args.model_dir, max_batch_size=mbs, max_latency_ms=args.max_latency_ms) as (
                        url,
                        target,
                    ):
                        one = argparse.Namespace(
                            **{
                                **vars(args),
                                "url": url,
                                "grpc": target,
                                "inputs": [kind],
                                "protocols": [proto],
                            }
                        )
                        report["runs"] += [{"mode": label, **r} for r in run_against(one, payload)]
        # After the servers stopped: nothing else competes for the CPUs while the bare graph is timed.
        report["bare_graph"] = bare_graph(args.model_dir, payload.slices, observed_batches(report["runs"]))
    else:
        _check_loopback(urlparse(args.url).hostname)
        _check_loopback(args.grpc.rsplit(":", 1)[0].strip("[]"))
        report["runs"] = [{"mode": "as-running", **r} for r in run_against(args, payload)]
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2))
    print(json.dumps(report["runs"], indent=2))
    return report


if __name__ == "__main__":  # pragma: no cover
    main()
