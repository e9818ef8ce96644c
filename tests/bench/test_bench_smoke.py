"""Smoke tests of the benchmarks: each runs in a tiny mode and writes valid JSON with what it promises.

Tiny inputs (32-64 px slices, a 128x128x24 volume, 1 repeat) keep them fast; the ones that export and
quantise ResNet-50 or run the GPU check on the CPU are marked slow. Results go to tmp_path, never to
bench/results.
"""

from __future__ import annotations

import io
import json
import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:  # `bench` is not an installed package (run from the repository root)
    sys.path.insert(0, str(ROOT))

from bench import common, run_all, study  # noqa: E402


def _json(path: Path) -> dict:
    assert path.is_file(), f"{path} was not written"
    return json.loads(path.read_text())


def test_interleaved_times_every_candidate_once_per_round_in_changing_orders() -> None:
    order: list[str] = []
    fns = {k: (lambda k=k: order.append(k)) for k in "abcd"}
    times = common.interleaved(fns, repeats=12, warmup=1, seed=3)
    assert order[:8] == list("abcd") * 2  # one warm-up each, then the first round in the given order
    rounds = [order[i : i + 4] for i in range(4, len(order), 4)]
    assert len(rounds) == 12 and all(sorted(r) == list("abcd") for r in rounds)
    # the predecessor of a candidate changes between rounds (a fixed or rotated cycle would not do that)
    before_b = {r[r.index("b") - 1] for r in rounds if r.index("b") > 0}
    assert len(before_b) >= 2
    again: list[str] = []
    common.interleaved({k: (lambda k=k: again.append(k)) for k in "abcd"}, repeats=12, warmup=1, seed=3)
    assert again == order  # seeded: the same schedule every time
    assert {k: len(v) for k, v in times.items()} == {k: 12 for k in "abcd"}
    assert common.stats([3.0, 1.0, 2.0])["median_s"] == 2.0


def test_preprocess_tiny_volume_writes_json(tmp_path: Path) -> None:
    from bench import preprocess

    result = preprocess.run(
        size=(128, 128, 24), upload_margin_mm=20, repeats=1, budget_s=5, quick=True, out_dir=tmp_path
    )
    data = _json(tmp_path / "preprocess.json")
    assert data["benchmark"] == "preprocess" and result["benchmark"] == "preprocess"
    paths = {r["path"] for r in data["rows"]}
    assert {"full, crop_first=True", "full, crop_first=False", "voi upload"} <= paths
    assert all(r["median_s"] > 0 for r in data["rows"])
    # crop_first must not change the network input, and the lattice-aligned upload gives the same slices
    assert data["agreement"]["max_abs_diff_full_crop_first_false_vs_true"] < 1e-4
    assert data["agreement"]["max_abs_diff_voi_upload_vs_full"] < 1e-4
    assert data["inputs"]["voi"]["voxels"] < data["inputs"]["full"]["voxels"]
    assert data["machine"]["cpu_model"]


def _fake_run(tmp_path: Path) -> Path:
    run = tmp_path / "run_x"
    run.mkdir()
    timings = {"hash data": 0.5, "features": 120.0, "report": 4.0}
    (run / "run.json").write_text(json.dumps({"run_id": "r1", "n_patients": 267, "timings_s": timings}))
    # rich wraps console lines: the parser must survive the line break
    (tmp_path / "run_x.log").write_text(
        "[11/26/26 16:27:04] INFO     preprocessing: 267 patients, 237 computed, 30 from \n"
        "                             cache\n"
    )
    return run


def test_study_reads_run_json_and_log(tmp_path: Path) -> None:
    result = study.run(run_dir=_fake_run(tmp_path), out_dir=tmp_path / "out")
    data = _json(tmp_path / "out" / "study.json")
    assert [r["stage"] for r in data["rows"]] == ["hash data", "features", "report"]
    assert data["first_run"]["total_s"] == pytest.approx(124.5)
    assert data["first_run"]["cache"]["preprocessing"] == {"patients": 267, "computed": 237, "from_cache": 30}
    assert data["first_run"]["cache"]["state"] == "partly cached"
    assert result["rows"][1]["first_run_s"] == 120.0


def test_study_refuses_unfinished_run(tmp_path: Path) -> None:
    (tmp_path / "empty").mkdir()
    with pytest.raises(SystemExit, match=r"run\.json"):
        study.run(run_dir=tmp_path / "empty", out_dir=tmp_path)


def _fake_load(results: Path) -> None:
    runs = [
        {
            "mode": mode,
            "protocol": proto,
            "input": kind,
            "concurrency": 32,
            "completed": 32,
            "errors": 0,
            "throughput_rps": rps * (1.5 if kind == "preprocessed" else 1.0),
            "mean_batch_size": 8.2 if mode == "batching" else None,
        }
        for mode, rps in (("batching", 6.0), ("max_batch_size=1", 2.0))
        for proto in ("http", "grpc")
        for kind in ("upload", "preprocessed")
    ]
    bare = {
        "variant": "fp32",
        "provider": "CPUExecutionProvider",
        "slices_per_patient": 3,
        "rows": [
            {"batch_patients": 1, "batch_slices": 3, "median_s": 0.15, "n": 5, "slices_per_s": 20.0},
            {"batch_patients": 8, "batch_slices": 24, "median_s": 1.0, "n": 5, "slices_per_s": 24.0},
        ],
    }
    (results / "load.json").write_text(
        json.dumps({"settings": {"concurrency": [32]}, "runs": runs, "bare_graph": bare})
    )


def test_render_keeps_hand_written_text_and_is_idempotent(tmp_path: Path) -> None:
    study.run(run_dir=_fake_run(tmp_path), out_dir=tmp_path / "res")
    _fake_load(tmp_path / "res")
    md = tmp_path / "B.md"
    md.write_text(f"# Bench\n\nintro text\n\n{run_all.START}\nold\n{run_all.END}\n\n## GPU\nkept\n")
    run_all.render(tmp_path / "res", md)
    once = md.read_text()
    run_all.render(tmp_path / "res", md)
    assert md.read_text() == once
    assert once.startswith("# Bench\n\nintro text") and once.rstrip().endswith("## GPU\nkept")
    assert "old" not in once
    assert "| features | 120.000 |" in once
    ceiling = "(this machine's ceiling, bare graph at 8 patients / at 1: 1.20x)"
    # 6.0 / 2.0 req/s; the ceiling is 24 / 20 slices/s of the bare graph at the service's batch (8.2 -> 8)
    assert f"**pass** http, upload: batching / max_batch_size=1 at 32 clients {ceiling}: 3.000" in once
    # 6 req/s x 3 slices / 24 slices/s = 0.75 (upload); x 1.5 for preprocessed = 1.125
    assert (
        "**FAIL** grpc, upload: service slices/s at 32 clients / bare graph at the same batch (8 patients"
        in once
    )
    assert ": 0.750 (target >= 0.8)" in once
    assert "**pass** grpc, preprocessed: service slices/s at 32 clients / bare graph" in once
    assert ": 1.125 (target >= 0.8)" in once
    assert "| preprocessed |" in once and "| batch_patients |" in once


def test_observed_batches_and_payload() -> None:
    from bench import load

    runs = [
        {"mode": "batching", "mean_batch_size": 7.6},
        {"mode": "batching", "mean_batch_size": 1.0},
        {"mode": "batching", "mean_batch_size": None},
        {"mode": "max_batch_size=1", "mean_batch_size": 30.0},  # not a batching run: ignored
    ]
    assert load.observed_batches(runs) == [1, 8]
    x = np.arange(2 * 3 * 4 * 4, dtype=np.float32).reshape(2, 3, 4, 4)
    payload = load.Payload(b"img", b"msk", x)
    np.testing.assert_array_equal(np.load(io.BytesIO(payload.npy), allow_pickle=False), x)


def test_grpc_requests_decode_to_what_was_sent() -> None:
    from bench import load
    from service.oip.models import FILE_MODEL, GRAPH_MODEL
    from service.oip.tensors import decode_raw_bytes, grpc_input_to_numpy

    x = np.random.default_rng(0).normal(size=(3, 3, 8, 8)).astype(np.float32)
    payload = load.Payload(b"image-bytes", b"mask-bytes", x)
    graph = load.grpc_request("preprocessed", payload)
    assert graph.model_name == GRAPH_MODEL and [i.name for i in graph.inputs] == ["slices"]
    decoded = grpc_input_to_numpy(graph.inputs[0], graph.raw_input_contents[0], max_elements=10**6)
    np.testing.assert_array_equal(decoded, x[None])
    files = load.grpc_request("upload", payload)
    assert files.model_name == FILE_MODEL and [i.name for i in files.inputs] == ["image", "mask"]
    assert [decode_raw_bytes(r, "x") for r in files.raw_input_contents] == [[b"image-bytes"], [b"mask-bytes"]]


def _add_run_patients(parts: common.ModelParts) -> None:
    """Four 'run patients' made as preprocessing makes them (a [0, 1] window normalised with the config's
    mean/std), two cohorts with both labels, the torch path's probabilities as the study's reference."""
    from core.preprocessing import PreprocessConfig

    pre = PreprocessConfig(size=parts.image_size, n_slices=parts.n_slices)
    x = common.synthetic_slices(4, parts.n_slices, seed=5, size=parts.image_size)
    window = np.clip(x * 0.5 + 0.5, 0.0, 1.0)  # synthetic_slices normalise with mean = std = 0.5
    mean, std = (np.asarray(v, np.float32).reshape(3, 1, 1) for v in (pre.mean, pre.std))
    slices = ((window - mean) / std).astype(np.float32)
    parts.preprocess = pre
    parts.eval_set = common.EvalSet(
        ids=np.array(["a", "b", "c", "d"]),
        slices=slices,
        labels=np.array([0, 1, 0, 1]),
        cohorts=np.array(["training", "training", "validation", "validation"]),
        reference=parts.torch_probability(slices),
    )


@pytest.mark.slow
def test_graph_and_cam_tiny_random_model(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """Export + int8-quantise a random ResNet-50 at 64 px (the export code), time it against torch."""
    from bench import cam, graph

    parts = common.random_parts(image_size=64, n_patients=2, n_slices=2)
    _add_run_patients(parts)
    graphs = common.GraphCache(parts, tmp_path / "graphs")
    graph.run(
        batches=(1, 2),
        variants=("fp32", "int8-u8s8"),
        repeats=1,
        budget_s=5,
        threads=(1,),
        quick=True,
        out_dir=tmp_path,
        parts=parts,
        graphs=graphs,
    )
    g = _json(tmp_path / "graph.json")
    assert {(r["batch_slices"], r["path"]) for r in g["rows"]} == {
        (b, p) for b in (1, 2) for p in ("torch-eager-fp32", "ort-fp32", "ort-int8-u8s8")
    }
    fp32 = [r for r in g["rows"] if r["path"] == "ort-fp32"]
    assert all(r["max_abs_dprob_vs_torch"] < 1e-3 for r in fp32)  # same graph, same numbers
    assert all(r["slices_per_s"] > 0 and r["speedup_vs_torch"] > 0 for r in g["rows"])
    # one thread count: the fastest torch row of a batch is that batch's torch row
    assert all(r["speedup_vs_best_torch"] == r["speedup_vs_torch"] for r in g["rows"])
    assert any("batch 8" in t["what"] and t["passed"] is None for t in g["targets"])  # batch 8 not run
    assert g["agreement_on_run"]["fp32"]["max_abs_dprob"] < 1e-3
    sens = g["input_sensitivity"]
    assert list(sens["perturbations"]) == ["noise 1e-6", "noise 1e-4", "fp16 input", "uint8 window input"]
    assert sens["n_patients"] == 4 and sens["preprocessing"]["std"] == list(parts.preprocess.std)
    for v in sens["perturbations"].values():
        assert 0 <= v["max_abs_dprob"] < 1 and set(v["cohorts"]) == {"training", "validation"}
    # the same graph on the same inputs: the unperturbed pass reproduces the agreement's fp32 AUCs
    fp32_aucs = {c: x["auc"] for c, x in g["agreement_on_run"]["fp32"]["cohorts"].items()}
    assert sens["auc_unperturbed"] == pytest.approx(fp32_aucs)
    printed = capsys.readouterr().out
    assert "input precision sensitivity of the fp32 graph on 4 run patients:" in printed
    assert "  uint8 window input max|Δp|" in printed

    cam.run(
        patients=(1,),
        int8=False,
        repeats=1,
        budget_s=5,
        threads=1,
        quick=True,
        out_dir=tmp_path,
        parts=parts,
        graphs=graphs,
    )
    c = _json(tmp_path / "cam.json")
    assert {r["path"] for r in c["rows"]} == {
        "plain inference (ORT fp32)",
        "in-graph CAM (ORT fp32)",
        "torch eager inference",
        "torch Grad-CAM (core.cam.GradCAM)",
    }
    # the in-graph CAM is Grad-CAM for a linear head (after ReLU and normalisation)
    assert c["agreement"]["1 patients"]["max_abs_diff_normalised_ingraph_fp32_vs_gradcam"] < 1e-3

    md = tmp_path / "B.md"
    run_all.render(tmp_path, md)
    text = md.read_text()
    assert "### Graph" in text and "### Grad-CAM" in text and "ort-int8-u8s8" in text
    assert "Input precision sensitivity of the ONNX Runtime fp32 graph on the same 4 run patients" in text
    assert "| uint8 window input | [0, 1] window quantised to uint8" in text


@pytest.mark.slow
def test_gpu_check_cpu_smoke(tmp_path: Path) -> None:
    from bench import gpu_check

    result = gpu_check.main(["--cpu-smoke", "--batches", "1,2", "--image-size", "32", "--out", str(tmp_path)])
    data = _json(tmp_path / "gpu_check.json")
    assert (tmp_path / "gpu_check.md").read_text().startswith("GPU check:")
    graph_rows = [r for r in data["rows"] if r["section"] == "graph"]
    assert {r["config"] for r in graph_rows} >= {"fp32", "bf16 autocast channels_last"}
    fp32 = next(r for r in data["rows"] if r["section"] == "agreement" and r["config"] == "fp32")
    assert fp32["max_abs_dprob"] < 1e-5  # fp32 on the same CPU reproduces the reference
    assert any(r["section"] == "gradcam" for r in data["rows"])
    assert any("needs CUDA" in s for s in data["skipped"])  # fp16 configs are skipped, and say so
    assert result["target"]["passed"] is None
