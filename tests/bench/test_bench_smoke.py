"""Smoke tests of the benchmarks: each runs in a tiny mode and writes valid JSON with what it promises.

Tiny inputs (32-64 px slices, a 128x128x24 volume, 1 repeat) keep them fast; the ones that export and
quantise ResNet-50 or run the GPU check on the CPU are marked slow. Results go to tmp_path, never to
bench/results.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:  # `bench` is not an installed package (run from the repository root)
    sys.path.insert(0, str(ROOT))

from bench import common, run_all, study  # noqa: E402


def _json(path: Path) -> dict:
    assert path.is_file(), f"{path} was not written"
    return json.loads(path.read_text())


def test_interleaved_times_every_candidate_round_robin() -> None:
    order: list[str] = []
    times = common.interleaved(
        {"a": lambda: order.append("a"), "b": lambda: order.append("b")}, repeats=3, warmup=1
    )
    assert order == ["a", "b"] + ["a", "b"] * 3  # one warm-up each, then strictly alternating
    assert {k: len(v) for k, v in times.items()} == {"a": 3, "b": 3}
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
            "concurrency": 32,
            "completed": 32,
            "errors": 0,
            "throughput_rps": rps,
        }
        for mode, rps in (("batching", 6.0), ("max_batch_size=1", 2.0))
        for proto in ("http", "grpc")
    ]
    (results / "load.json").write_text(json.dumps({"settings": {"concurrency": [32]}, "runs": runs}))


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
    assert "**pass** http: batching / max_batch_size=1 at 32 clients: 3.000" in once  # 6.0 / 2.0 req/s
    assert "| load | grpc: batching / max_batch_size=1 at 32 clients | 3.000 | >= 3.0 | pass |" in once


@pytest.mark.slow
def test_graph_and_cam_tiny_random_model(tmp_path: Path) -> None:
    """Export + int8-quantise a random ResNet-50 at 64 px (the export code), time it against torch."""
    from bench import cam, graph

    parts = common.random_parts(image_size=64, n_patients=2, n_slices=2)
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
