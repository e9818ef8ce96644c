"""Graph benchmark: torch eager fp32 vs ONNX Runtime fp32 / int8 (/ fp16) on the CPU, side by side.

    python -m bench.graph [--run RUN_DIR] [--batches 1,8,32] [--variants fp32,int8-u8s8,int8-s8s8,fp16]
        [--repeats 5] [--budget-s 90] [--threads 1,2] [--quick] [--out bench/results]

The ONNX graphs are built by the export code (``export.graph.build_graph``, ``export.variants``) from a
training run (its extractor weights, selected features and fitted head; int8 calibrated on its training
patients) or, without ``--run``, from a random-weight ResNet-50 (batch-norm re-estimated) and a small
logistic head. They keep the S axis dynamic so any batch of slices can be fed.

Batch = SLICES through ResNet-50 (the unit of work), fed as ``[batch, 1, 3, 224, 224]`` (``batch``
one-slice patients); throughput is slices/s. Torch eager = ``core.network.PatientFeatureNet`` + the sklearn
head, i.e. what the study runs. Candidates are timed interleaved at each batch size (see bench.common).

Agreement: max |Δprobability| against torch eager on the timed inputs, and, with ``--run``, on the run's
patients ([N,S] as the study saw them) against the study's own probabilities, with the AUC per cohort.

Input precision sensitivity (with ``--run``): the ONNX Runtime fp32 graph on the same patients with its
INPUT perturbed (Gaussian noise σ 1e-6 and 1e-4, rounded to float16, the [0, 1] window quantised to
uint8), against the same graph on the unperturbed input: how much the model itself amplifies tiny input
changes, i.e. how much of a low-precision variant's disagreement is the model's and not the kernels'.
"""

from __future__ import annotations

import argparse
import logging
import tempfile
from collections.abc import Callable, Sequence
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np

from bench import common

log = logging.getLogger(__name__)

TORCH = "torch-eager-fp32"
DEFAULT_VARIANTS = ("fp32", "int8-u8s8", "int8-s8s8", "fp16")
QUICK_VARIANTS = ("fp32", "int8-u8s8")
PROB_TOL = {"fp32": 1e-4, "fp16": 2e-2, "int8": 2e-2}
AUC_TOL = 0.01
SENSITIVITY_SEED = 0
NOISE_SIGMAS = {"noise 1e-6": 1e-6, "noise 1e-4": 1e-4}
PERTURBATIONS = {
    "noise 1e-6": "Gaussian noise σ=1e-6 added to the normalised network input",
    "noise 1e-4": "Gaussian noise σ=1e-4 added to the normalised network input",
    "fp16 input": "network input rounded to float16 (a float16 transfer), back to float32",
    "uint8 window input": "[0, 1] window quantised to uint8 (round(v·255)/255), normalised again",
}


def _family(variant: str) -> str:
    return variant.split("-", 1)[0]


def _slice_pool(parts: common.ModelParts) -> np.ndarray:
    """Real network inputs when a run is given (flattened [M,3,H,W]), else the synthetic ones."""
    src = parts.eval_set.slices if parts.eval_set is not None else parts.calibration
    return src.reshape(-1, *src.shape[2:])


def _batch(pool: np.ndarray, n: int) -> np.ndarray:
    """``[n,1,3,H,W]``: n one-slice patients, cycling through the pool."""
    rows = np.arange(n) % len(pool)
    return np.ascontiguousarray(pool[rows][:, None])


def _auc(labels: np.ndarray, scores: np.ndarray) -> float | None:
    from sklearn.metrics import roc_auc_score

    return float(roc_auc_score(labels, scores)) if len(np.unique(labels)) == 2 else None


def _run_patients(
    session: Any,
    slices: np.ndarray,
    output: str = "probability",
    batch: int = 4,
    transform: Callable[[np.ndarray], np.ndarray] | None = None,
) -> np.ndarray:
    """``output`` for [N,S,...] patients, ``batch`` patients per call (``transform`` applied per call)."""

    def feed(x: np.ndarray) -> np.ndarray:
        return np.ascontiguousarray(x if transform is None else transform(x), dtype=np.float32)

    return np.concatenate(
        [
            session.run([output], {"slices": feed(slices[i : i + batch])})[0]
            for i in range(0, len(slices), batch)
        ]
    )


def _rel(a: np.ndarray, ref: np.ndarray) -> dict[str, float]:
    """Feature differences relative to the reference's scale (max and mean absolute)."""
    d = np.abs(a.astype(np.float64) - ref)
    return {
        "max_rel": float(d.max() / max(np.abs(ref).max(), 1e-12)),
        "mean_rel": float(d.mean() / max(np.abs(ref).mean(), 1e-12)),
    }


def feature_agreement(
    parts: common.ModelParts, graphs: common.GraphCache, variants: list[str]
) -> dict[str, Any]:
    """The trunks alone on the run's patients: how much each precision moves the selected features
    (vs the fp32 trunk, and the fp32 trunk vs the study's features.npz)."""
    ev = parts.eval_set
    if ev is None:
        return {}
    cam = parts.linear is not None
    fp32 = _run_patients(graphs.trunk_session("fp32", cam=cam), ev.slices, output="features").astype(
        np.float64
    )
    out: dict[str, Any] = {}
    if ev.features is not None:
        out["fp32_vs_study_features"] = _rel(fp32, ev.features)
    for v in variants:
        if v != "fp32":
            feats = _run_patients(graphs.trunk_session(v, cam=cam), ev.slices, output="features")
            out[f"{v}_vs_fp32"] = _rel(feats, fp32)
    return out


def agreement_on_run(parts: common.ModelParts, sessions: dict[str, Any]) -> dict[str, Any]:
    """Each variant on the run's patients vs the study's probabilities: max |Δp| and AUC per cohort."""
    ev = parts.eval_set
    if ev is None:
        return {}
    out: dict[str, Any] = {"n_patients": len(ev.ids), "slices_per_patient": int(ev.slices.shape[1])}
    cohorts = sorted(set(ev.cohorts.tolist()))
    out["reference"] = "study probabilities (features.npz, torch eager) + fitted head"
    out["auc_reference"] = {
        c: _auc(ev.labels[ev.cohorts == c], ev.reference[ev.cohorts == c]) for c in cohorts
    }
    for name, sess in sessions.items():
        probs = _run_patients(sess, ev.slices)
        per: dict[str, Any] = {}
        for c in cohorts:
            m = ev.cohorts == c
            auc = _auc(ev.labels[m], probs[m])
            ref = out["auc_reference"][c]
            per[c] = {
                "n": int(m.sum()),
                "max_abs_dprob": float(np.max(np.abs(probs[m] - ev.reference[m]))),
                "auc": auc,
                "dauc": None if auc is None or ref is None else round(auc - ref, 6),
            }
        out[name] = {"max_abs_dprob": float(np.max(np.abs(probs - ev.reference))), "cohorts": per}
    return out


# ------------------------------------------------------------------- input precision sensitivity


def _per_channel(values: Sequence[float]) -> np.ndarray:
    """Per-channel constants shaped to broadcast over ``[..., C, H, W]`` (channel axis -3)."""
    return np.asarray(values, dtype=np.float64).reshape(-1, 1, 1)


def to_window(x: np.ndarray, mean: Sequence[float], std: Sequence[float]) -> np.ndarray:
    """Normalised network input -> the [0, 1] window it was normalised from (v = x·std + mean), float64."""
    return x.astype(np.float64) * _per_channel(std) + _per_channel(mean)


def from_window(v: np.ndarray, mean: Sequence[float], std: Sequence[float]) -> np.ndarray:
    """[0, 1] window -> normalised network input ((v - mean) / std), float32."""
    return ((v - _per_channel(mean)) / _per_channel(std)).astype(np.float32)


def gaussian_noise(x: np.ndarray, sigma: float, rng: np.random.Generator) -> np.ndarray:
    """``x`` plus N(0, sigma²) noise, float32."""
    return (x.astype(np.float64) + rng.normal(0.0, sigma, x.shape)).astype(np.float32)


def fp16_input(x: np.ndarray) -> np.ndarray:
    """What a float16 transfer of the network input delivers: rounded to float16, back to float32."""
    return x.astype(np.float16).astype(np.float32)


def uint8_window_input(x: np.ndarray, mean: Sequence[float], std: Sequence[float]) -> np.ndarray:
    """What a uint8 transfer of the [0, 1] window delivers: 256 levels (clipped), normalised again."""
    levels = np.clip(np.rint(to_window(x, mean, std) * 255.0), 0, 255).astype(np.uint8)
    return from_window(levels / 255.0, mean, std)


def input_perturbations(
    mean: Sequence[float], std: Sequence[float], seed: int = SENSITIVITY_SEED
) -> dict[str, Callable[[np.ndarray], np.ndarray]]:
    """The perturbations of PERTURBATIONS, keyed by name; each noise level draws from its own seeded
    stream, so the result depends only on ``seed`` and the order of the calls."""
    streams = np.random.SeedSequence(seed).spawn(len(NOISE_SIGMAS))
    out: dict[str, Callable[[np.ndarray], np.ndarray]] = {
        name: partial(gaussian_noise, sigma=sigma, rng=np.random.default_rng(stream))
        for (name, sigma), stream in zip(NOISE_SIGMAS.items(), streams)
    }
    out["fp16 input"] = fp16_input
    out["uint8 window input"] = partial(uint8_window_input, mean=mean, std=std)
    return out


def _deltas(probs: np.ndarray, ref: np.ndarray, labels: np.ndarray, cohorts: np.ndarray) -> dict[str, Any]:
    """max |Δp| (all patients and per cohort) and |ΔAUC| per cohort of ``probs`` against ``ref``."""
    per: dict[str, Any] = {}
    for c in sorted(set(cohorts.tolist())):
        m = cohorts == c
        auc, auc_ref = _auc(labels[m], probs[m]), _auc(labels[m], ref[m])
        per[c] = {
            "n": int(m.sum()),
            "max_abs_dprob": float(np.max(np.abs(probs[m] - ref[m]))),
            "abs_dauc": None if auc is None or auc_ref is None else round(abs(auc - auc_ref), 6),
        }
    return {"max_abs_dprob": float(np.max(np.abs(probs - ref))), "cohorts": per}


def _sensitivity_skip(parts: common.ModelParts, session: Any) -> str | None:
    if parts.eval_set is None:
        return "no run patients (random weights, no --run): nothing to measure it on"
    if parts.preprocess is None:
        return "the model parts carry no preprocessing config (window, mean/std)"
    if session is None:
        return "no ONNX Runtime fp32 session (fp32 not among the variants, or it failed to build)"
    return None


def input_sensitivity(
    parts: common.ModelParts, session: Any, *, seed: int = SENSITIVITY_SEED
) -> dict[str, Any]:
    """The fp32 graph ``session`` on the run's patients, each input perturbation vs the unperturbed input:
    max |Δp| and |ΔAUC| per cohort (one unperturbed + one pass per perturbation). ``{"skipped": why}``
    when there are no run patients or no fp32 session."""
    reason = _sensitivity_skip(parts, session)
    if reason is not None:
        return {"skipped": reason}
    ev, pre = parts.eval_set, parts.preprocess
    assert ev is not None and pre is not None  # checked by _sensitivity_skip
    ref = _run_patients(session, ev.slices)
    lo, hi = pre.window_mg_ml
    cohorts = sorted(set(ev.cohorts.tolist()))
    out: dict[str, Any] = {
        "graph": "ort-fp32",
        "reference": "the same graph on the unperturbed inputs",
        "n_patients": len(ev.ids),
        "slices_per_patient": int(ev.slices.shape[1]),
        "seed": seed,
        "preprocessing": {
            "mean": list(pre.mean),
            "std": list(pre.std),
            "window_mg_ml": [lo, hi],
            "uint8_step_mg_ml": round((hi - lo) / 255, 6),
        },
        "auc_unperturbed": {c: _auc(ev.labels[ev.cohorts == c], ref[ev.cohorts == c]) for c in cohorts},
        "gate": {"max_abs_dprob": PROB_TOL["int8"], "abs_dauc": AUC_TOL},
        "perturbations": {},
    }
    for name, fn in input_perturbations(pre.mean, pre.std, seed).items():
        probs = _run_patients(session, ev.slices, transform=fn)
        out["perturbations"][name] = {
            "what": PERTURBATIONS[name],
            **_deltas(probs, ref, ev.labels, ev.cohorts),
        }
    return out


def _time_batch(
    parts: common.ModelParts,
    sessions: dict[str, Any],
    x: np.ndarray,
    n_threads: int,
    repeats: int,
    budget_s: float,
    quick: bool,
) -> list[dict[str, Any]]:
    """One batch size: torch eager and every session, interleaved; rows with ratios and agreement."""
    outputs: dict[str, np.ndarray] = {}

    def torch_fn() -> None:
        outputs[TORCH] = parts.torch_probability(x)

    cands = {TORCH: torch_fn}
    for v, sess in sessions.items():

        def ort_fn(sess: Any = sess, v: str = v) -> None:
            outputs[v] = sess.run(None, {"slices": x})[0]

        cands[f"ort-{v}"] = ort_fn
    load_before = common.load_average()
    times = common.interleaved(
        cands, repeats=repeats, warmup=1, budget_s=budget_s, min_repeats=1 if quick else 2
    )
    # ratios from the reported (rounded) medians, so every ratio in the JSON follows from its columns
    t_torch = common.stats(times[TORCH])["median_s"]
    b = int(x.shape[0] * x.shape[1])
    rows = []
    for name, ts in times.items():
        med = common.stats(ts)["median_s"]
        d = (
            None
            if name == TORCH
            else float(np.max(np.abs(outputs[name.removeprefix("ort-")] - outputs[TORCH])))
        )
        rows.append(
            {
                "threads": n_threads,
                "batch_slices": b,
                "path": name,
                **common.stats(ts),
                "slices_per_s": round(b / med, 3),
                "speedup_vs_torch": round(t_torch / med, 3),
                "max_abs_dprob_vs_torch": d,
                "load_before": load_before,
            }
        )
    return rows


def run(
    *,
    run_dir: str | None = None,
    batches: tuple[int, ...] = (1, 8, 32),
    variants: tuple[str, ...] = DEFAULT_VARIANTS,
    repeats: int = 5,
    budget_s: float = 90.0,
    threads: tuple[int, ...] | None = None,
    quick: bool = False,
    image_size: int = 224,
    agreement_patients: int | None = None,
    out_dir: Path | None = None,
    parts: common.ModelParts | None = None,
    graphs: common.GraphCache | None = None,
) -> dict[str, Any]:
    """Run the benchmark; returns (and writes) the result dict. ``parts``/``graphs`` can be shared."""
    started, machine = common.now(), common.machine_info()
    thread_counts = threads or (common.set_threads(None),)
    parts = parts or common.load_parts(
        run_dir, quick=quick, image_size=image_size, eval_patients=agreement_patients
    )
    with tempfile.TemporaryDirectory(prefix="pdl1-bench-graph-") as tmp:
        graphs = graphs or common.GraphCache(parts, Path(tmp))
        cam = parts.linear is not None  # the shipped graph has the CAM output for linear heads
        pool = _slice_pool(parts)
        rows: list[dict[str, Any]] = []
        failed: dict[str, str] = {}
        agreement: dict[str, Any] = {}
        sensitivity: dict[str, Any] = {}
        for n_threads in thread_counts:
            common.set_threads(n_threads)
            sessions: dict[str, Any] = {}
            for v in variants:
                try:
                    sessions[v] = graphs.session(v, cam=cam, threads=n_threads)
                except Exception as exc:  # recorded (e.g. no fp16 CPU kernels), never hidden
                    failed[v] = f"{type(exc).__name__}: {str(exc)[:300]}"
                    log.warning("variant %s unavailable: %s", v, failed[v])
            for b in batches:
                rows += _time_batch(parts, sessions, _batch(pool, b), n_threads, repeats, budget_s, quick)
                log.info("threads %d, batch %d done", n_threads, b)
            if not agreement:
                agreement = agreement_on_run(parts, sessions)
                sensitivity = input_sensitivity(parts, sessions.get("fp32"))
        if agreement:
            agreement["selected_features"] = feature_agreement(parts, graphs, list(sessions))
        _add_best_torch(rows)
        build_seconds = dict(graphs.build_seconds)
    result = {
        **common.result_header("graph", started, machine),
        "settings": {
            "source": parts.source,
            "batch_unit": "slices, fed as [batch, 1, 3, H, W] (one-slice patients)",
            "image_size": parts.image_size,
            "batches": list(batches),
            "variants": list(variants),
            "repeats": repeats,
            "budget_s_per_batch": budget_s,
            "threads": list(thread_counts),
            "graph_has_cam_output": cam,
            "timing": "interleaved round-robin, 1 warm-up call each; median reported",
            "quick": quick,
        },
        "unavailable": failed,
        "build_seconds": build_seconds,
        "rows": rows,
        "agreement_on_run": agreement,
        "input_sensitivity": sensitivity,
    }
    result["targets"] = _targets(result)
    _print(result)
    common.write_result("graph", result, out_dir)
    return result


def _add_best_torch(rows: list[dict[str, Any]]) -> None:
    """Speed-up against the FASTEST torch eager row of the same batch over all thread counts: the
    conservative ratio when extra threads make torch slower (oversubscribed CPUs)."""
    best = {}
    for r in rows:
        if r["path"] == TORCH:
            b = r["batch_slices"]
            best[b] = min(best.get(b, np.inf), r["median_s"])
    for r in rows:
        r["speedup_vs_best_torch"] = round(best[r["batch_slices"]] / r["median_s"], 3)


def _best_int8(rows: list[dict[str, Any]], batch: int, threads: int) -> dict[str, Any] | None:
    cands = [
        r
        for r in rows
        if r["batch_slices"] == batch and r["threads"] == threads and r["path"].startswith("ort-int8")
    ]
    return max(cands, key=lambda r: r["speedup_vs_torch"]) if cands else None


def _targets(result: dict[str, Any]) -> list[dict[str, Any]]:
    rows = result["rows"]
    out = []
    for t in result["settings"]["threads"]:
        b8 = _best_int8(rows, 8, t)
        speed = b8["speedup_vs_torch"] if b8 else None
        which = f"{b8['path'] if b8 else 'int8'} ({t} thread{'s' if t > 1 else ''})"
        out += [
            common.target(speed, ">=", 6.0, f"issue 5: {which} >= 6x torch eager fp32 at batch 8"),
            common.target(speed, ">=", 8.0, f"issue 8: {which} >= 8x torch eager fp32 at batch 8"),
        ]
        if len(result["settings"]["threads"]) > 1 and b8:
            best = b8["speedup_vs_best_torch"]
            what = f"{which} vs the fastest torch eager (any thread count) at batch 8: >= 8x"
            out.append(common.target(best, ">=", 8.0, what))
    largest = max((r["batch_slices"] for r in rows), default=0)
    for r in rows:
        if r["path"] == TORCH or r["max_abs_dprob_vs_torch"] is None:
            continue
        fam = _family(r["path"].removeprefix("ort-"))
        if r["batch_slices"] == largest and r["threads"] == rows[0]["threads"]:
            out.append(
                common.target(
                    r["max_abs_dprob_vs_torch"],
                    "<=",
                    PROB_TOL[fam],
                    f"{r['path']} max |Δp| vs torch (timed inputs, batch {r['batch_slices']})",
                )
            )
    agree = result["agreement_on_run"]
    for name, v in agree.items():
        if not isinstance(v, dict) or "cohorts" not in v:
            continue
        for cohort, c in v["cohorts"].items():
            if _family(name) != "fp32" and c["dauc"] is not None:
                out.append(common.target(abs(c["dauc"]), "<=", AUC_TOL, f"ort-{name} |ΔAUC| {cohort}"))
    return out


def _print(result: dict[str, Any]) -> None:
    m = result["machine"]
    print(f"\nGraph benchmark on {m['cpu_model']} ({m['usable_cpus']} CPUs), load {m['load_average_1_5_15']}")
    print(f"source: {result['settings']['source']}; batch = slices; threads {result['settings']['threads']}")
    print(
        f"{'thr':>3} {'batch':>5} {'path':<20} {'median s':>9} {'slices/s':>9} {'x torch':>8} {'max|Δp|':>9}"
    )
    for r in result["rows"]:
        d = r["max_abs_dprob_vs_torch"]
        print(
            f"{r['threads']:>3} {r['batch_slices']:>5} {r['path']:<20} {r['median_s']:>9.4f} "
            f"{r['slices_per_s']:>9.2f} {r['speedup_vs_torch']:>8.2f} {'-' if d is None else f'{d:.2e}':>9}"
        )
    for name, reason in result["unavailable"].items():
        print(f"  {name}: unavailable ({reason[:120]})")
    agree = result["agreement_on_run"]
    if agree:
        print(f"agreement on {agree['n_patients']} run patients vs the study's probabilities:")
        for name, v in agree.items():
            if isinstance(v, dict) and "cohorts" in v:
                daucs = {c: x["dauc"] for c, x in v["cohorts"].items()}
                print(f"  {name:<10} max|Δp| {v['max_abs_dprob']:.2e}  ΔAUC {daucs}")
        print(f"  selected features, relative difference: {agree.get('selected_features')}")
    _print_sensitivity(result.get("input_sensitivity") or {})
    common.print_targets(result["targets"])


def _print_sensitivity(sens: dict[str, Any]) -> None:
    if "skipped" in sens:
        print(f"input precision sensitivity: skipped ({sens['skipped']})")
    elif sens:
        print(f"input precision sensitivity of the fp32 graph on {sens['n_patients']} run patients:")
        for name, v in sens["perturbations"].items():
            daucs = {c: x["abs_dauc"] for c, x in v["cohorts"].items()}
            print(f"  {name:<18} max|Δp| {v['max_abs_dprob']:.2e}  |ΔAUC| {daucs}")


def main(argv: list[str] | None = None) -> dict[str, Any]:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--run", help="Training run directory (default: random weights + synthetic slices).")
    p.add_argument("--batches", default=None, help="Slices per call, comma-separated (default 1,8,32).")
    p.add_argument("--variants", default=None, help=f"Default {','.join(DEFAULT_VARIANTS)}.")
    p.add_argument("--repeats", type=int, default=None)
    p.add_argument("--budget-s", type=float, default=None, help="Stop repeating a batch size after this.")
    p.add_argument(
        "--threads",
        default=None,
        help="Intra-op thread counts, comma-separated, e.g. 1,2 (default: all CPUs).",
    )
    p.add_argument("--image-size", type=int, default=224, help="Random mode only (tiny smoke runs).")
    p.add_argument(
        "--agreement-patients", type=int, default=None, help="Run patients for agreement/AUC (default all)."
    )
    p.add_argument("--quick", action="store_true", help="Batches 1,8; fp32 + int8-u8s8; 2 repeats.")
    p.add_argument("--out", type=Path, default=None, help="Results folder (default bench/results).")
    a = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    return run(
        run_dir=a.run,
        batches=tuple(int(b) for b in (a.batches or ("1,8" if a.quick else "1,8,32")).split(",")),
        variants=tuple(a.variants.split(","))
        if a.variants
        else (QUICK_VARIANTS if a.quick else DEFAULT_VARIANTS),
        repeats=a.repeats or (2 if a.quick else 5),
        budget_s=a.budget_s or (20.0 if a.quick else 90.0),
        threads=tuple(int(t) for t in a.threads.split(",")) if a.threads else None,
        quick=a.quick,
        image_size=a.image_size,
        agreement_patients=a.agreement_patients,
        out_dir=a.out,
    )


if __name__ == "__main__":
    main()
