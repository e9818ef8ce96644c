"""GPU check of the torch CUDA path: throughput, precision variants, Grad-CAM, agreement with the CPU.

Run through ``bench/gpu_check.sh`` on a machine with CUDA torch (it installs the few wheels in ``.whl/``
that ``core.network`` / ``core.cam`` need). Needs no data files and no network: random ResNet-50 weights
with batch-norm statistics re-estimated on synthetic slices (so activations are sane) and a random linear
head on 12 pooled features, scaled so probabilities spread around 0.5.

Measured (``--max-seconds`` caps the whole run; configurations left when it is reached are skipped):

- the graph (ResNet-50 -> GAP -> mean over S -> 12 features -> linear head -> sigmoid) at batch 1..512
  slices, fed as [batch, 1, 3, 224, 224], input already on the GPU, in fp32 (torch defaults: cuDNN TF32
  on), channels_last, fp16 / bf16 autocast, pure fp16 / bf16 weights (``.half()``), and CUDA graphs
  (``torch.cuda.CUDAGraph`` capture; ``--compile`` adds torch.compile(mode="reduce-overhead"));
- host->device input transfer at the largest batch: float32 vs float16 vs uint8 (dequantised on the GPU);
- the Grad-CAM path (``core.cam.GradCAM``), per patient and for a batch of patients;
- onnxruntime's CUDA provider when importable (else recorded as "not available");
- agreement of every configuration with a CPU fp32 reference on a few patients: max |Δprobability| and
  the largest feature difference relative to the largest reference feature.

Timing: CUDA events around back-to-back iterations after warm-up (cuDNN autotuning happens there);
the median over chunks is reported. One table is printed; JSON (and a markdown copy) go to ``$OUT``
(or ``--out``), rewritten after every measurement so a killed run keeps what it measured.

``--cpu-smoke`` runs the same code on the CPU with tiny inputs to check the script itself.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # `core` when run as a script

from core.cam import GradCAM
from core.network import ResNet50Extractor, build_extractor, recalibrate_batchnorm

HEAD_FEATURES = [3, 77, 150, 301, 512, 640, 777, 1024, 1200, 1500, 1800, 2047]
TARGET_SLICES_PER_S = 20_000  # issue 8: fp16 on an H100 at batch >= 256
S_REF = 3  # slices per patient for the reference patients and Grad-CAM


@dataclass(frozen=True)
class Config:
    name: str
    weights: torch.dtype = torch.float32  # dtype of weights and input
    autocast: torch.dtype | None = None
    channels_last: bool = False
    cuda_graph: bool = False
    compile: bool = False
    cuda_only: bool = False


CONFIGS = [
    Config("fp32"),
    Config("fp16 .half() channels_last", weights=torch.float16, channels_last=True, cuda_only=True),
    Config("fp16 autocast channels_last", autocast=torch.float16, channels_last=True, cuda_only=True),
    Config("bf16 autocast channels_last", autocast=torch.bfloat16, channels_last=True),
    Config(
        "fp16 .half() channels_last + CUDA graph",
        weights=torch.float16,
        channels_last=True,
        cuda_graph=True,
        cuda_only=True,
    ),
    Config("fp32 channels_last", channels_last=True),
    Config("fp16 autocast", autocast=torch.float16, cuda_only=True),
    Config("bf16 weights channels_last", weights=torch.bfloat16, channels_last=True, cuda_only=True),
]
COMPILE_CONFIG = Config(
    "fp16 .half() channels_last + torch.compile(reduce-overhead)",
    weights=torch.float16,
    channels_last=True,
    compile=True,
    cuda_only=True,
)


class GraphNet(nn.Module):
    """slices [N,S,3,H,W] -> (probability [N], pooled features [N,2048]); the head runs in float32."""

    def __init__(self, extractor: ResNet50Extractor, idx: torch.Tensor, w: torch.Tensor, b: float, cl: bool):
        super().__init__()
        self.extractor = extractor
        self.register_buffer("idx", idx)
        self.register_buffer("w", w)
        self.b = b
        self.cl = cl

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        n, s = x.shape[0], x.shape[1]
        x = x.reshape(n * s, *x.shape[2:])
        if self.cl:
            x = x.contiguous(memory_format=torch.channels_last)
        maps = self.extractor.feature_maps(x)
        feats = maps.float().mean(dim=(2, 3)).reshape(n, s, -1).mean(dim=1)
        return torch.sigmoid(feats[:, self.idx] @ self.w + self.b), feats


# ------------------------------------------------------------------------------------------- helpers


def synthetic(n: int, size: int, *, seed: int, device: torch.device) -> torch.Tensor:
    """``[n,3,size,size]`` float32 blobs + noise in an ImageNet-normalised range, generated on ``device``."""
    g = torch.Generator(device="cpu").manual_seed(seed)
    k = 4
    centre = (torch.rand(n, k, 2, generator=g) * 0.6 + 0.2) * size
    radius = (torch.rand(n, k, generator=g) * 0.2 + 0.05) * size
    amp = torch.rand(n, k, generator=g) * 1.7 + 0.3
    amp = amp * (torch.rand(n, k, generator=g) < 0.7)
    noise_sd = torch.rand(n, generator=g) * 0.28 + 0.02
    yy, xx = torch.meshgrid(
        torch.arange(size, device=device), torch.arange(size, device=device), indexing="ij"
    )
    yy, xx = yy.float(), xx.float()
    out = torch.empty(n, 3, size, size, device=device)
    for i0 in range(0, n, 64):  # bounded temporary memory
        c, r, a = (t[i0 : i0 + 64].to(device) for t in (centre, radius, amp))
        d2 = (yy - c[..., 0, None, None]) ** 2 + (xx - c[..., 1, None, None]) ** 2
        img = (a[..., None, None] * torch.exp(-d2 / (2 * r[..., None, None] ** 2))).sum(dim=1)
        gn = torch.Generator(device="cpu").manual_seed(seed * 1000 + i0)
        noise = torch.randn(img.shape, generator=gn).to(device) * noise_sd[i0 : i0 + 64, None, None].to(
            device
        )
        out[i0 : i0 + 64] = ((img + noise - 0.5) / 0.5)[:, None].expand(-1, 3, -1, -1)
    return out


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_fn(
    fn: Any, device: torch.device, *, warmup: int = 3, chunk_s: float = 0.1, chunks: int = 5
) -> float:
    """Median seconds per call: back-to-back calls between CUDA events (perf_counter on the CPU)."""
    for _ in range(warmup):
        fn()
    sync(device)
    t0 = time.perf_counter()
    fn()
    sync(device)
    one = max(time.perf_counter() - t0, 1e-5)
    k = int(min(50, max(1, chunk_s / one)))
    per_call = []
    for _ in range(chunks):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            for _ in range(k):
                fn()
            end.record()
            end.synchronize()
            per_call.append(start.elapsed_time(end) / 1000.0 / k)
        else:
            t0 = time.perf_counter()
            for _ in range(k):
                fn()
            per_call.append((time.perf_counter() - t0) / k)
    return float(np.median(per_call))


def peak_gb(device: torch.device) -> float | None:
    return round(torch.cuda.max_memory_allocated(device) / 2**30, 2) if device.type == "cuda" else None


def reset_peak(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def environment(device: torch.device) -> dict[str, Any]:
    env: dict[str, Any] = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "cudnn": torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None,
        "device": str(device),
        "cudnn_allow_tf32": torch.backends.cudnn.allow_tf32,
        "matmul_allow_tf32": torch.backends.cuda.matmul.allow_tf32,
        "cpu_threads": torch.get_num_threads(),
    }
    if device.type == "cuda":
        p = torch.cuda.get_device_properties(device)
        env.update(gpu=p.name, capability=f"{p.major}.{p.minor}", memory_gb=round(p.total_memory / 2**30, 1))
        env["sm_count"] = p.multi_processor_count
    return env


# -------------------------------------------------------------------------------------------- checks


class Check:
    """Collects rows, prints the table, rewrites the JSON after every row (a killed run keeps its data)."""

    def __init__(self, args: argparse.Namespace, device: torch.device) -> None:
        self.args = args
        self.device = device
        self.t0 = time.perf_counter()
        self.rows: list[dict[str, Any]] = []
        self.skipped: list[str] = []
        self.result: dict[str, Any] = {"check": "gpu_check", "started": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
        self.result["environment"] = environment(device)
        self.result["settings"] = {k: v for k, v in vars(args).items() if k != "out"}
        self.out = Path(args.out) if args.out else None

    def elapsed(self) -> float:
        return time.perf_counter() - self.t0

    def out_of_time(self, what: str) -> bool:
        if self.elapsed() > self.args.max_seconds:
            self.skipped.append(f"{what} (time cap {self.args.max_seconds:.0f} s reached)")
            return True
        return False

    def add(self, **row: Any) -> None:
        row.setdefault("note", "")
        self.rows.append(row)
        b, sec = row.get("batch"), row.get("seconds")
        rate = f"{row['slices_per_s']:,.0f}/s" if row.get("slices_per_s") else ""
        print(
            f"  {row['section']:<9} {row['config']:<52} {b!s:>5} {_ms(sec)} {rate} {row['note']}",
            file=sys.stderr,
            flush=True,
        )
        self.save()

    def save(self) -> None:
        self.result.update(rows=self.rows, skipped=self.skipped, elapsed_s=round(self.elapsed(), 1))
        if self.out is None:
            return
        self.out.mkdir(parents=True, exist_ok=True)
        (self.out / "gpu_check.json").write_text(json.dumps(self.result, indent=2, default=str) + "\n")
        (self.out / "gpu_check.md").write_text(markdown(self.result) + "\n")


def build_model(args: argparse.Namespace, device: torch.device) -> tuple[ResNet50Extractor, dict[str, Any]]:
    """Random ResNet-50 with BN statistics re-estimated on synthetic slices, plus a scaled random head."""
    extractor, _ = build_extractor("random", seed=0)
    extractor = extractor.to(device)
    n_bn, per = (2, 4) if args.cpu_smoke else (4, 64)
    batches = [synthetic(per, args.image_size, seed=100 + i, device=device) for i in range(n_bn)]
    recalibrate_batchnorm(extractor, batches)
    with torch.no_grad():
        feats = extractor(synthetic(2 * per, args.image_size, seed=7, device=device)).float()
    idx = torch.tensor(HEAD_FEATURES, device=device)
    sel = feats[:, idx]
    mu, sd = sel.mean(0), sel.std(0) + 1e-6
    g = torch.Generator(device="cpu").manual_seed(1)
    w = (torch.randn(len(HEAD_FEATURES), generator=g).to(device) / (sd * len(HEAD_FEATURES) ** 0.5)).float()
    head = {"idx": idx, "w": w, "b": float(-(mu @ w))}
    return extractor.eval(), head


def make_graph(extractor: nn.Module, head: dict[str, Any], cfg: Config, device: torch.device) -> GraphNet:
    ext = copy.deepcopy(extractor).to(device=device, dtype=cfg.weights)
    if cfg.channels_last:
        ext = ext.to(memory_format=torch.channels_last)
    return GraphNet(ext, head["idx"].to(device), head["w"].to(device), head["b"], cfg.channels_last).eval()


def runner(model: GraphNet, cfg: Config, x: torch.Tensor, device: torch.device) -> tuple[Any, Any]:
    """(call, cleanup) running the config on the static input ``x`` (already the config's dtype)."""
    if cfg.autocast is not None:

        def call() -> Any:
            with torch.no_grad(), torch.autocast(device.type, dtype=cfg.autocast):
                return model(x)

        return call, lambda: None
    if cfg.cuda_graph:
        stream = torch.cuda.Stream(device)
        stream.wait_stream(torch.cuda.current_stream(device))
        with torch.cuda.stream(stream), torch.no_grad():
            for _ in range(3):
                model(x)
        torch.cuda.current_stream(device).wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.no_grad(), torch.cuda.graph(graph):
            model(x)
        return graph.replay, lambda: graph.reset()
    fn = model
    if cfg.compile:
        fn = torch.compile(model, mode="reduce-overhead")

    def plain() -> Any:
        with torch.no_grad():
            return fn(x)

    return plain, lambda: None


def measure_graph(check: Check, extractor: nn.Module, head: dict[str, Any], cfg: Config, x_all: torch.Tensor):
    device = check.device
    if cfg.cuda_only and device.type != "cuda":
        check.skipped.append(f"{cfg.name}: needs CUDA")
        return None
    model = make_graph(extractor, head, cfg, device)
    for b in check.args.batches:
        if check.out_of_time(f"{cfg.name} batch {b}"):
            break
        reset_peak(device)
        x = x_all[:b].to(cfg.weights)[:, None]  # [b,1,3,H,W]
        try:
            t0 = time.perf_counter()
            call, cleanup = runner(model, cfg, x, device)
            seconds = time_fn(call, device, warmup=1 if cfg.cuda_graph else 3)
            setup = time.perf_counter() - t0
            cleanup()
        except torch.cuda.OutOfMemoryError:
            check.add(section="graph", config=cfg.name, batch=b, seconds=None, note="out of memory")
            torch.cuda.empty_cache()
            break
        except Exception as exc:  # e.g. torch.compile unavailable: recorded, next config
            check.add(
                section="graph",
                config=cfg.name,
                batch=b,
                seconds=None,
                note=f"{type(exc).__name__}: {exc}"[:300],
            )
            break
        check.add(
            section="graph",
            config=cfg.name,
            batch=b,
            seconds=seconds,
            slices_per_s=b / seconds,
            peak_gb=peak_gb(device),
            setup_s=round(setup, 2),
        )
    return model


def agreement(check: Check, model: GraphNet | None, cfg: Config, ref: dict[str, torch.Tensor]) -> None:
    if model is None:
        return
    device = check.device
    x = ref["x"].to(device=device, dtype=cfg.weights)
    with torch.no_grad():
        if cfg.autocast is not None:
            with torch.autocast(device.type, dtype=cfg.autocast):
                p, f = model(x)
        else:
            p, f = model(x)
    dp = float((p.float().cpu() - ref["p"]).abs().max())
    df = float((f.float().cpu() - ref["f"]).abs().max() / ref["f"].abs().max())
    check.add(
        section="agreement",
        config=cfg.name,
        batch=f"{x.shape[0]}x{x.shape[1]}",
        seconds=None,
        max_abs_dprob=dp,
        max_rel_dfeature=df,
    )


def cpu_reference(
    extractor: nn.Module, head: dict[str, Any], args: argparse.Namespace
) -> dict[str, torch.Tensor]:
    """CPU fp32 probabilities and features of a few synthetic patients (the agreement baseline)."""
    cpu = torch.device("cpu")
    n = 2 if args.cpu_smoke else 4
    x = synthetic(n * S_REF, args.image_size, seed=4242, device=cpu).reshape(n, S_REF, 3, args.image_size, -1)
    model = make_graph(
        extractor,
        {k: (v.cpu() if torch.is_tensor(v) else v) for k, v in head.items()},
        Config("cpu fp32 reference"),
        cpu,
    )
    with torch.no_grad():
        p, f = model(x)
    return {"x": x, "p": p, "f": f}


def measure_gradcam(
    check: Check, extractor: nn.Module, head: dict[str, Any], ref: dict[str, torch.Tensor]
) -> None:
    """core.cam.GradCAM on the device, as core.runtime runs it (raw maps per pass on the device, then
    upsampled/normalised on the CPU): per patient and a batch of patients; maps compared with the CPU's.
    Also records whether ``GradCAM.__call__(..., size=...)`` works with device tensors."""
    from core.cam import postprocess

    device = check.device
    idx, w, b = head["idx"], head["w"], head["b"]
    size = (check.args.image_size, check.args.image_size)

    def score(feats: torch.Tensor) -> torch.Tensor:
        return feats.float()[:, idx.to(feats.device)] @ w.to(feats.device) + b

    def maps(cam: GradCAM, x: torch.Tensor, dtype: torch.dtype | None, per_pass: int) -> np.ndarray:
        with torch.autocast(device.type, dtype=dtype or torch.float32, enabled=dtype is not None):
            raw = torch.cat([cam.raw(x[i : i + per_pass], score) for i in range(0, len(x), per_pass)])
        return postprocess(raw.float().cpu(), size=size, normalize="patient")

    ext = copy.deepcopy(extractor).to(device).float()
    with GradCAM(copy.deepcopy(extractor).cpu().float()) as cam:
        ref_maps = maps(cam, ref["x"][:1], None, 1)
    n_batch = 2 if check.args.cpu_smoke else 16
    many = synthetic(n_batch * S_REF, size[0], seed=77, device=device).reshape(n_batch, S_REF, 3, *size)
    one_patient = ref["x"][:1].to(device)
    with GradCAM(ext) as cam:
        try:
            cam(one_patient, score, size=size, normalize="patient")
            note = "works"
        except Exception as exc:  # reported: the runtime path moves raw maps to the CPU first
            note = f"{type(exc).__name__}: {exc}"[:300]
        check.add(
            section="gradcam",
            config="GradCAM.__call__(size=...) on device tensors",
            batch=S_REF,
            seconds=None,
            note=note,
        )
    modes: list[tuple[str, torch.dtype | None]] = [("fp32", None)]
    if device.type == "cuda":
        modes.append(("fp16 autocast", torch.float16))
    for label, dtype in modes:
        if check.out_of_time(f"Grad-CAM {label}"):
            return
        with GradCAM(ext) as cam:
            reset_peak(device)
            t1 = time_fn(
                lambda cam=cam, dtype=dtype: maps(cam, one_patient, dtype, 1), device, warmup=2, chunks=3
            )
            diff = float(np.abs(maps(cam, one_patient, dtype, 1) - ref_maps).max())
            check.add(
                section="gradcam",
                config=f"Grad-CAM {label}, 1 patient ({S_REF} slices)",
                batch=S_REF,
                seconds=t1,
                slices_per_s=S_REF / t1,
                peak_gb=peak_gb(device),
                max_abs_dmap_vs_cpu=diff,
            )
            tb = time_fn(
                lambda cam=cam, dtype=dtype: maps(cam, many, dtype, n_batch), device, warmup=1, chunks=3
            )
            check.add(
                section="gradcam",
                config=f"Grad-CAM {label}, {n_batch} patients per pass",
                batch=n_batch * S_REF,
                seconds=tb,
                slices_per_s=n_batch * S_REF / tb,
                peak_gb=peak_gb(device),
            )


def measure_transfer(check: Check, extractor: nn.Module, head: dict[str, Any], x_all: torch.Tensor) -> None:
    """Host->device copy + fp16 channels_last graph at the largest batch: float32 vs float16 vs uint8."""
    device = check.device
    if device.type != "cuda":
        check.skipped.append("input transfer: needs CUDA")
        return
    cfg = Config("transfer", weights=torch.float16, channels_last=True)
    model = make_graph(extractor, head, cfg, device)
    b = max(v for v in check.args.batches if v <= x_all.shape[0])
    host = x_all[:b].cpu()
    lo, hi = float(host.min()), float(host.max())
    variants = {
        "H2D float32 (pinned) + fp16 graph": (host.float().pin_memory(), lambda t: t.half()),
        "H2D float16 (pinned) + fp16 graph": (host.half().pin_memory(), lambda t: t),
        "H2D uint8 (pinned) + dequantise on GPU + fp16 graph": (
            ((host - lo) / (hi - lo) * 255).round().to(torch.uint8).pin_memory(),
            lambda t: t.half() * ((hi - lo) / 255) + lo,
        ),
    }
    for name, (pinned, to_input) in variants.items():
        if check.out_of_time(name):
            return

        def call(pinned: torch.Tensor = pinned, to_input: Any = to_input) -> Any:
            x = to_input(pinned.to(device, non_blocking=True))[:, None]
            with torch.no_grad():
                return model(x)

        seconds = time_fn(call, device)
        check.add(
            section="transfer",
            config=name,
            batch=b,
            seconds=seconds,
            slices_per_s=b / seconds,
            note=f"{pinned.element_size() * pinned.numel() / 2**20:.0f} MiB per batch",
        )


def measure_ort(check: Check, extractor: nn.Module, head: dict[str, Any], x_all: torch.Tensor) -> None:
    """onnxruntime's CUDA provider on the fp32 graph, when this machine has it."""
    try:
        import onnxruntime as ort
    except ImportError:
        check.skipped.append("onnxruntime CUDA provider: not available (onnxruntime not importable)")
        return
    providers = ort.get_available_providers()
    want = "CPUExecutionProvider" if check.args.cpu_smoke else "CUDAExecutionProvider"
    if want not in providers:
        check.skipped.append(f"onnxruntime CUDA provider: not available (providers: {providers})")
        return
    cpu = torch.device("cpu")
    model = make_graph(
        extractor,
        {k: (v.cpu() if torch.is_tensor(v) else v) for k, v in head.items()},
        Config("onnx export"),
        cpu,
    )
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "graph.onnx"
        example = torch.zeros(2, 1, 3, check.args.image_size, check.args.image_size)
        torch.onnx.export(
            model,
            (example,),
            str(path),
            dynamo=False,
            input_names=["slices"],
            output_names=["probability", "features"],
            dynamic_axes={"slices": {0: "N"}},
            opset_version=17,
        )
        session = ort.InferenceSession(str(path), providers=[want])
        for b in check.args.batches:
            if b > 256 or check.out_of_time(f"onnxruntime batch {b}"):
                break
            x = x_all[:b].cpu().numpy()[:, None]
            seconds = time_fn(lambda x=x: session.run(["probability"], {"slices": x}), cpu, chunks=3)
            check.add(
                section="ort",
                config=f"onnxruntime {want} fp32 (numpy I/O)",
                batch=b,
                seconds=seconds,
                slices_per_s=b / seconds,
            )


def summarise(check: Check) -> None:
    graph = [r for r in check.rows if r["section"] == "graph" and r.get("slices_per_s")]
    fp16 = [r for r in graph if "fp16" in r["config"] and r["batch"] >= 256]
    best = max(fp16, key=lambda r: r["slices_per_s"]) if fp16 else None
    check.result["target"] = {
        "what": f"fp16 torch CUDA path >= {TARGET_SLICES_PER_S} slices/s at batch >= 256",
        "best": None if best is None else {k: best[k] for k in ("config", "batch", "slices_per_s")},
        "passed": None if best is None else best["slices_per_s"] >= TARGET_SLICES_PER_S,
    }
    one = next((r for r in graph if r["config"] == "fp32" and r["batch"] == S_REF), None)
    cam1 = next(
        (r for r in check.rows if r["section"] == "gradcam" and "fp32, 1 patient" in r["config"]), None
    )
    if cam1 and one:
        check.result["gradcam_vs_inference_fp32_same_slices"] = round(cam1["seconds"] / one["seconds"], 2)
    check.result["finished"] = time.strftime("%Y-%m-%dT%H:%M:%S%z")
    check.save()


def _ms(seconds: float | None) -> str:
    return "" if seconds is None else f"{seconds * 1e3:.2f} ms"


def _sci(value: float | None) -> str:
    return "" if value is None else f"{value:.2e}"


def markdown(result: dict[str, Any]) -> str:
    env = result["environment"]
    head = (
        f"GPU check: {env.get('gpu', env['device'])} (capability {env.get('capability', '-')}, "
        f"{env.get('memory_gb', '-')} GiB), torch {env['torch']}, CUDA {env['cuda']}, cuDNN {env['cudnn']}, "
        f"TF32 conv {env['cudnn_allow_tf32']}; {result.get('started', '')}"
    )
    lines = [
        head,
        "",
        "| section | config | batch | ms | slices/s | peak GiB | max abs Δp | max rel Δfeature | note |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in result.get("rows", []):
        sec = r.get("seconds")
        rate = r.get("slices_per_s")
        dp = r.get("max_abs_dprob", r.get("max_abs_dmap_vs_cpu"))
        df = r.get("max_rel_dfeature")
        lines.append(
            f"| {r['section']} | {r['config']} | {'' if r['batch'] is None else r['batch']} | {_ms(sec)} | "
            f"{'' if rate is None else f'{rate:,.0f}'} | {r.get('peak_gb') or ''} | "
            f"{_sci(dp)} | {_sci(df)} | {r.get('note', '')} |"
        )
    if result.get("skipped"):
        lines += ["", "Skipped:", *(f"- {s}" for s in result["skipped"])]
    t = result.get("target")
    if t:
        flag = {True: "PASS", False: "FAIL", None: "not measured"}[t["passed"]]
        lines += ["", f"Target [{flag}] {t['what']}: best {t['best']}"]
    if "gradcam_vs_inference_fp32_same_slices" in result:
        lines.append(
            f"Grad-CAM / fp32 inference (1 patient, {S_REF} slices): "
            f"{result['gradcam_vs_inference_fp32_same_slices']}"
        )
    return "\n".join(lines)


def parse(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--cpu-smoke", action="store_true", help="Tiny CPU run that checks the script itself.")
    p.add_argument("--batches", default=None, help="Slices per call (default 1,2,4,...,512; smoke 1,2,3).")
    p.add_argument("--max-seconds", type=float, default=390.0, help="Skip what is left after this (6.5 min).")
    p.add_argument("--compile", action="store_true", help="Also torch.compile(mode='reduce-overhead').")
    p.add_argument("--image-size", type=int, default=None, help="Default 224 (smoke: 64).")
    p.add_argument(
        "--out", default=os.environ.get("OUT"), help="Folder for gpu_check.json/.md (default $OUT)."
    )
    a = p.parse_args(argv)
    a.image_size = a.image_size or (64 if a.cpu_smoke else 224)
    default = "1,2,3" if a.cpu_smoke else "1,2,3,4,8,16,32,64,128,256,512"
    a.batches = [int(v) for v in (a.batches or default).split(",")]
    return a


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse(argv)
    if not args.cpu_smoke and not torch.cuda.is_available():
        raise SystemExit("no CUDA device visible to torch; use --cpu-smoke to check the script on a CPU")
    device = torch.device("cpu" if args.cpu_smoke else "cuda")
    torch.backends.cudnn.benchmark = True
    check = Check(args, device)
    print(f"gpu_check: {check.result['environment']}", file=sys.stderr, flush=True)
    extractor, head = build_model(args, device)
    ref = cpu_reference(extractor, head, args)
    x_all = synthetic(max(args.batches), args.image_size, seed=5, device=device)
    check.add(
        section="setup",
        config="model + BN re-estimation + CPU reference + inputs",
        batch=None,
        seconds=None,
        note=f"{check.elapsed():.1f} s",
    )
    configs = CONFIGS + ([COMPILE_CONFIG] if args.compile else [])
    for i, cfg in enumerate(configs):
        if check.out_of_time(cfg.name):
            continue
        model = measure_graph(check, extractor, head, cfg, x_all)
        agreement(check, model, cfg, ref)
        del model
        reset_peak(device)
        if i == 3:  # the Grad-CAM path right after the main precision variants
            measure_gradcam(check, extractor, head, ref)
    if not check.out_of_time("input transfer"):
        measure_transfer(check, extractor, head, x_all)
    if not check.out_of_time("onnxruntime"):
        measure_ort(check, extractor, head, x_all)
    summarise(check)
    print(markdown(check.result))
    return check.result


if __name__ == "__main__":
    main()
