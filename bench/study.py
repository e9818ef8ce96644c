"""Study benchmark: per-stage wall time of `pdl1 study run`, cold and with the feature cache warm.

    python -m bench.study --run RUN_DIR [--log RUN_LOG] [--cached-rerun] [--rerun-out DIR]

Reads ``timings_s`` from ``RUN_DIR/run.json`` (written by the study). Whether that run was cold is read
from its console log when given (``--log``; default ``RUN_DIR.log`` next to the run when present): the
features stage prints ``preprocessing: N patients, C computed, K from cache``.

``--cached-rerun`` runs the same study again (same manifest and config.yaml, same PDL1_CACHE_DIR) into a
fresh directory, so preprocessing, batch-norm re-estimation and features come from the cache while every
later stage is recomputed, and puts both columns side by side. It does not start a cold run itself: a
267-patient cold run takes long on a shared CPU and is launched deliberately (`pdl1 study run`).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from bench import common

log = logging.getLogger(__name__)

_PRE = re.compile(r"preprocessing:\s+(\d+)\s+patients,\s+(\d+)\s+computed,\s+(\d+)\s+from\s+cache")
_BN_CACHED = re.compile(r"batch-norm\s+statistics\s+re-estimated\s+earlier")
_FEATURE_TIMINGS = re.compile(r"feature\s+stage\s+timings:\s+(\{[^}]*\})")


def read_run_timings(run_dir: Path) -> dict[str, Any]:
    """run.json's per-stage seconds and identity (raises SystemExit when the run is not finished)."""
    path = Path(run_dir) / "run.json"
    if not path.is_file():
        raise SystemExit(f"{path}: missing (is the study run finished?)")
    info = json.loads(path.read_text())
    timings = info.get("timings_s")
    if not isinstance(timings, dict) or not timings:
        raise SystemExit(f"{path}: no timings_s recorded")
    return {
        "run_dir": str(run_dir),
        "run_id": info.get("run_id"),
        "started": info.get("started"),
        "finished": info.get("finished"),
        "n_patients": info.get("n_patients"),
        "synthetic": info.get("synthetic"),
        "weights": (info.get("weights") or {}).get("kind"),
        "platform": info.get("platform"),
        "timings_s": {k: float(v) for k, v in timings.items()},
        "total_s": round(sum(float(v) for v in timings.values()), 3),
    }


def parse_log(text: str) -> dict[str, Any]:
    """Cache facts from the study's console log (rich wraps lines, so whitespace is collapsed first)."""
    flat = re.sub(r"\s+", " ", text)
    out: dict[str, Any] = {}
    m = _PRE.search(flat)
    if m:
        n, computed, cached = (int(g) for g in m.groups())
        out["preprocessing"] = {"patients": n, "computed": computed, "from_cache": cached}
        out["state"] = "cold" if cached == 0 else ("cached" if computed == 0 else "partly cached")
    out["bn_statistics_from_cache"] = bool(_BN_CACHED.search(flat))
    m = _FEATURE_TIMINGS.search(flat)
    if m:
        out["feature_stage_timings"] = m.group(1).replace(" ", "")
    return out


def cached_rerun(run: dict[str, Any], out_dir: Path) -> tuple[dict[str, Any], dict[str, Any]]:
    """Re-run the study with the same manifest + config into ``out_dir``; returns (timings, log facts)."""
    run_dir = Path(run["run_dir"])
    info = json.loads((run_dir / "run.json").read_text())
    manifest, config = info.get("manifest"), run_dir / "config.yaml"
    if not manifest or not Path(manifest).is_file():
        raise SystemExit(f"{run_dir / 'run.json'}: names no readable manifest to re-run")
    if out_dir.exists() and any(out_dir.iterdir()):
        raise SystemExit(f"{out_dir}: not empty (a re-run into a finished run dir would reuse its stages)")
    pdl1 = Path(sys.executable).with_name("pdl1")
    cmd = [str(pdl1), "study", "run", "--manifest", str(manifest), "--out", str(out_dir)]
    if config.is_file():
        cmd += ["--config", str(config)]
    env = {**os.environ, "COLUMNS": "200"}
    log.info("cached re-run: %s", " ".join(cmd))
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, check=False)
    wall = time.perf_counter() - t0
    (out_dir.parent / f"{out_dir.name}.log").write_text(proc.stdout + proc.stderr)
    if proc.returncode != 0:
        raise SystemExit(f"cached re-run failed ({proc.returncode}): {proc.stderr[-2000:]}")
    rerun = read_run_timings(out_dir)
    rerun["wall_s"] = round(wall, 2)
    return rerun, parse_log(proc.stdout + proc.stderr)


def run(
    *,
    run_dir: Path,
    log_path: Path | None = None,
    rerun: bool = False,
    rerun_out: Path | None = None,
    out_dir: Path | None = None,
) -> dict[str, Any]:
    started, machine = common.now(), common.machine_info()
    cold = read_run_timings(run_dir)
    log_path = log_path or (run_dir.parent / f"{run_dir.name}.log")
    cold_log = parse_log(log_path.read_text(errors="replace")) if log_path.is_file() else {}
    result: dict[str, Any] = {
        "benchmark": "study",
        "started": started,
        "machine": machine,
        "first_run": {**cold, "log": str(log_path) if log_path.is_file() else None, "cache": cold_log},
        "note": "first_run timings were measured by the study itself (machine load at that time unknown)",
    }
    if rerun:
        with tempfile.TemporaryDirectory(prefix="pdl1-bench-study-") as tmp:
            target_dir = rerun_out or Path(tmp) / "rerun"
            again, again_log = cached_rerun(cold, target_dir)
        result["cached_rerun"] = {**again, "cache": again_log, "load_average_end": common.load_average()}
    stages = list(cold["timings_s"])
    rows = []
    for stage in stages:
        row: dict[str, Any] = {"stage": stage, "first_run_s": cold["timings_s"][stage]}
        if rerun:
            c = result["cached_rerun"]["timings_s"].get(stage)
            row["cached_rerun_s"] = c
            row["speedup"] = round(cold["timings_s"][stage] / c, 2) if c else None
        rows.append(row)
    result["rows"] = rows
    result["finished"] = common.now()
    _print(result)
    common.write_result("study", result, out_dir)
    return result


def _print(result: dict[str, Any]) -> None:
    first = result["first_run"]
    state = first["cache"].get("state", "cache state unknown (no log)")
    print(f"\nStudy run {first['run_id']} ({first['n_patients']} patients, first run: {state})")
    has_rerun = "cached_rerun" in result
    print(f"{'stage':<20} {'first s':>9}" + (f" {'cached s':>9} {'x':>6}" if has_rerun else ""))
    for r in result["rows"]:
        line = f"{r['stage']:<20} {r['first_run_s']:>9.1f}"
        if has_rerun:
            c = r["cached_rerun_s"]
            line += f" {'-' if c is None else f'{c:.1f}':>9} {r['speedup'] or '-':>6}"
        print(line)
    print(
        f"{'total':<20} {first['total_s']:>9.1f}"
        + (f" {result['cached_rerun']['total_s']:>9.1f}" if has_rerun else "")
    )


def main(argv: list[str] | None = None) -> dict[str, Any]:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--run", type=Path, required=True, help="A finished `pdl1 study run` directory.")
    p.add_argument("--log", type=Path, default=None, help="Its console log (default RUN_DIR.log).")
    p.add_argument("--cached-rerun", action="store_true", help="Re-run the study with the cache warm.")
    p.add_argument("--rerun-out", type=Path, default=None, help="Where the re-run goes (default: temp).")
    p.add_argument("--out", type=Path, default=None, help="Results folder (default bench/results).")
    a = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    return run(run_dir=a.run, log_path=a.log, rerun=a.cached_rerun, rerun_out=a.rerun_out, out_dir=a.out)


if __name__ == "__main__":
    main()
