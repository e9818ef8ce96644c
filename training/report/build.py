"""Assemble the paper-style report of a finished run: sections of text, tables and figures.

The report is rebuilt from the run's files only (``pdl1 study report RUN`` recomputes nothing but the
figures and the cohort-characteristics table). Sections whose inputs are absent say so.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd

from training.artifacts import write_csv, write_text
from training.figures import FigureSet, build_figures
from training.figures.style import label_cohort
from training.report.characteristics import characteristics_table, missing_table
from training.report.runfiles import RunFiles, load_run
from training.report.tables import (
    ReportTable,
    calibration_table,
    counts_table,
    cutoff_table,
    dca_table,
    delong_table,
    fmt_num,
    logistic_table,
    model_comparison_table,
    performance_table,
)

log = logging.getLogger(__name__)

TITLE = "Deep-feature signature for PD-L1 status from dual-energy CT iodine maps: study report"


@dataclass
class Block:
    """One item of a section. kind: text | warning | table | figure | details (a collapsed table)."""

    kind: str
    text: str = ""
    table: ReportTable | None = None
    image: Path | None = None  # PNG for figures
    caption: str = ""


@dataclass
class Section:
    id: str
    title: str
    blocks: list[Block] = field(default_factory=list)

    def text(self, text: str) -> None:
        self.blocks.append(Block("text", text=text))

    def warn(self, text: str) -> None:
        self.blocks.append(Block("warning", text=text))

    def table(self, table: ReportTable, *, collapsed: bool = False) -> None:
        self.blocks.append(Block("details" if collapsed else "table", table=table))

    def figure(self, image: Path | None, caption: str, missing: str = "") -> None:
        if image is not None and image.is_file():
            self.blocks.append(Block("figure", image=image, caption=caption))
        else:
            self.warn(f"Figure not available: {caption.split('.')[0]}{f' ({missing})' if missing else ''}.")


@dataclass
class Report:
    title: str
    run_dir: Path
    meta: list[tuple[str, str]]
    banners: list[str]
    sections: list[Section]


def _fig(figs: FigureSet, name: str) -> tuple[Path | None, str]:
    files = figs.files.get(name)
    png = next((p for p in files or [] if p.suffix == ".png"), None)
    return png, figs.skipped.get(name, "")


def _cohorts(rf: RunFiles) -> list[str]:
    from training.figures.style import COHORT_ORDER

    if rf.metrics:
        present = list(rf.metrics["cohorts"])
    elif rf.predictions is not None:
        present = list(dict.fromkeys(rf.predictions["cohort"].astype(str)))
    else:
        return []
    return [c for c in COHORT_ORDER if c in present] + [c for c in present if c not in COHORT_ORDER]


def _csv_section_table(rf: RunFiles, sec: Section, name: str, title: str, note: str = "") -> None:
    frame = rf.tables.get(name)
    if frame is None:
        sec.warn(f"{title}: not available (tables/{name}.csv missing).")
    else:
        sec.table(logistic_table(name, title, frame, note))


# ------------------------------------------------------------------------------------------- sections


def _banners(rf: RunFiles) -> list[str]:
    out = []
    if rf.synthetic:
        out.append(
            "SYNTHETIC COHORT. Every patient in this run is simulated. The results demonstrate the software "
            "pipeline only; they are NOT clinical evidence and must not be used to judge PD-L1 prediction."
        )
    if rf.random_weights:
        seed = rf.weights.get("seed")
        bn = (
            ", batch-norm statistics re-estimated on the training cohort"
            if rf.weights.get("bn_recalibrated")
            else ""
        )
        out.append(
            "RANDOM WEIGHTS. The ResNet-50 feature extractor was NOT pretrained (seeded random "
            f"initialisation{f', seed {seed}' if seed is not None else ''}{bn}). The deep features are "
            "random-projection texture statistics, not ImageNet features as in the paper."
        )
    if rf.metrics is None:
        out.append("metrics.json is missing: performance, calibration and decision-curve sections are empty.")
    return out


def _meta(rf: RunFiles) -> list[tuple[str, str]]:
    run = rf.run or {}
    w = rf.weights
    items = [
        ("Run", str(run.get("run_id", rf.run_dir.name))),
        ("Started", str(run.get("started", "–"))),
        ("Finished", str(run.get("finished", "–"))),
        ("Seed", str(run.get("seed", "–"))),
        ("Manifest", str(run.get("manifest", "–"))),
        ("Extractor weights", f"{w.get('kind', '–')} ({w.get('spec', '')})" if w else "–"),
        ("Synthetic cohort", "yes" if rf.synthetic else "no"),
    ]
    return items


def _characteristics(rf: RunFiles, cohorts: list[str]) -> Section:
    sec = Section("characteristics", "1. Cohort characteristics")
    if rf.predictions is None:
        sec.warn("predictions.csv missing: no cohort table.")
        return sec
    variables = rf.clinical_columns()
    from training.cohort import CATEGORY_LEVELS, CLINICAL_COLUMNS

    frame = characteristics_table(
        rf.predictions, variables, cohorts, kinds=CLINICAL_COLUMNS, level_order=CATEGORY_LEVELS
    )
    write_csv(rf.run_dir / "tables" / "cohort_characteristics.csv", frame, index=False)
    frame = frame.rename(columns={c: label_cohort(c) for c in cohorts})
    frame = frame.rename(
        columns={f"p (training vs {c})": f"p (vs {label_cohort(c).lower()})" for c in cohorts}
    )
    sec.table(
        ReportTable.from_frame(
            "characteristics",
            "Patient characteristics by cohort",
            frame,
            "Continuous: median [IQR], two-sided Mann-Whitney U (training vs each validation cohort). "
            "Categorical: n (% of non-missing), chi-square without continuity correction, or Fisher's exact "
            "test for 2×2 tables with an expected count < 5. Missing values excluded from tests. "
            "Variable types as declared for the manifest (training.cohort.CLINICAL_COLUMNS).",
        )
    )
    return sec


def _clinical(rf: RunFiles) -> Section:
    sec = Section("clinical", "2. Clinical model")
    _csv_section_table(rf, sec, "clinical_univariable", "Univariable logistic regression (training cohort)")
    _csv_section_table(
        rf, sec, "clinical_multivariable", "Multivariable logistic regression (training cohort)"
    )
    return sec


def _signature(rf: RunFiles, figs: FigureSet) -> Section:
    sec = Section("signature", "3. Deep-feature signature (DFSigM)")
    sel = rf.selection
    if sel:
        rows = [
            [
                s.get("step", ""),
                s.get("estimator", ""),
                str(s.get("n_in", "")),
                str(s.get("n_kept", "")),
                str(s.get("fallback") or ""),
            ]
            for s in sel.get("steps", [])
        ]
        sec.table(
            ReportTable(
                "selection_steps",
                "Feature selection on the training cohort",
                ["Step", "Estimator", "Features in", "Features kept", "Fallback / note"],
                rows,
                "Fitted on the training cohort only; validation cohorts never enter selection.",
            )
        )
        lasso = sel.get("lasso") or {}
        if lasso:
            sec.text(
                f"LASSO: C used {fmt_num(lasso.get('C'), 4)}, CV-optimal C {fmt_num(lasso.get('C_cv'), 4)}."
            )
    else:
        sec.warn("selection.json missing.")
    if "selected_features" in rf.tables:
        _csv_section_table(rf, sec, "selected_features", "Selected deep features")
    elif sel and sel.get("final"):
        final = sel["final"]
        frame = pd.DataFrame(
            {
                "feature": final.get("names"),
                "index": final.get("indices"),
                "lasso_coef_scaled": final.get("lasso_coef_scaled"),
            }
        )
        sec.table(
            ReportTable.from_frame("selected_features", "Selected deep features (selection.json)", frame)
        )
    png, why = _fig(figs, "lasso_path")
    sec.figure(png, "LASSO path. Coefficients and cross-validated loss against log10(C).", why)
    if "model_comparison" in rf.tables:
        sec.table(model_comparison_table(rf.tables["model_comparison"]))
    else:
        sec.warn("Model comparison: not available (tables/model_comparison.csv missing).")
    png, why = _fig(figs, "model_comparison")
    sec.figure(
        png, "Model comparison. Mean ± SD cross-validated score; the selected classifier in blue.", why
    )
    return sec


def _fusion(rf: RunFiles, figs: FigureSet) -> Section:
    sec = Section("fusion", "4. Fusion model")
    _csv_section_table(rf, sec, "fusion_coefficients", "Fusion model coefficients (training cohort)")
    png, why = _fig(figs, "nomogram")
    sec.figure(
        png, "Nomogram of the fusion model. Points per predictor, total points, predicted probability.", why
    )
    return sec


def _performance(rf: RunFiles, figs: FigureSet) -> Section:
    sec = Section("performance", "5. Performance")
    if rf.metrics is None:
        sec.warn("metrics.json missing.")
        return sec
    sec.table(cutoff_table(rf.metrics))
    sec.table(performance_table(rf.metrics))
    png, why = _fig(figs, "roc")
    sec.figure(png, "ROC curves per cohort. Legend: AUC (DeLong 95% CI).", why)
    sec.table(delong_table(rf.metrics))
    return sec


def _calibration(rf: RunFiles, figs: FigureSet) -> Section:
    sec = Section("calibration", "6. Calibration and clinical utility")
    if rf.metrics is None:
        sec.warn("metrics.json missing.")
        return sec
    cal = calibration_table(rf.metrics)
    sec.table(cal)
    for note in cal.notes:
        sec.text(f"Note: {note}")
    png, why = _fig(figs, "calibration")
    sec.figure(png, "Calibration curves. Observed proportion (Wilson 95% CI) per risk group.", why)
    sec.table(dca_table(rf.metrics))
    png, why = _fig(figs, "decision_curve")
    sec.figure(png, "Decision curves. Net benefit against threshold probability.", why)
    return sec


def _explain(rf: RunFiles) -> Section:
    sec = Section("explain", "7. Explainability")
    shap = rf.shap
    if shap is None:
        sec.warn("SHAP: not computed (shap/shap.json missing).")
    elif shap.get("status") != "ok":
        sec.warn(f"SHAP: {shap.get('status')}: {shap.get('error', '')}")
    else:
        sec.text(
            f"SHAP ({shap['explainer']}) on the {len(shap['mean_abs_shap_training'])} selected features "
            "of the "
            f"{shap.get('model_name')} head, output in {shap['output_space']}; "
            f"background: {shap.get('background')}. "
            f"Base value {fmt_num(shap.get('base_value'))}; largest additivity error "
            f"|base + Σ SHAP − model output| = {shap.get('additivity_max_error', float('nan')):.2e}."
        )
        ranked = sorted(shap["mean_abs_shap_training"].items(), key=lambda kv: -kv[1])
        sec.table(
            ReportTable(
                "shap_importance",
                "Mean |SHAP| on the training cohort",
                ["Feature", f"mean |SHAP| ({shap['output_space']})"],
                [[k, fmt_num(v, 4)] for k, v in ranked],
            )
        )
        d = rf.run_dir / "shap"
        sec.figure(d / "shap_beeswarm.png", "SHAP summary (beeswarm), training cohort.")
        sec.figure(d / "shap_bar.png", "Mean |SHAP| per feature, training cohort.")
        for name, info in (shap.get("waterfall_patients") or {}).items():
            kind = "Highest" if name.startswith("highest") else "Lowest"
            sec.figure(
                d / f"shap_waterfall_{name}.png",
                f"SHAP waterfall. {kind}-risk {shap.get('waterfall_pool', '')} patient {info['patient_id']} "
                f"({label_cohort(info['cohort'])}).",
            )
    cam = rf.cam
    if cam is None:
        sec.warn("Grad-CAM: not computed (cam/cam.json missing).")
    elif cam.get("status", "ok") != "ok":
        sec.warn(f"Grad-CAM: {cam.get('status')}: {cam.get('error', '')}")
    else:
        methods = sorted({p["method"] for p in cam.get("patients", [])})
        sec.text(
            f"Class activation maps of the full pipeline score ({cam.get('score')}) "
            f"on {cam.get('target_layer')}, "
            f"method: {', '.join(methods) or '–'}; normalisation: {cam.get('normalisation')}. "
            "Each map is also "
            "saved on the original image grid as NIfTI (cam/*_cam.nii.gz)."
        )
        if any("forward-only" in m for m in methods):
            sec.warn(
                "The DFSigM head is not differentiable: maps are Ablation-CAM (forward-only), not Grad-CAM."
            )
        rows = [
            [
                p["patient_id"],
                label_cohort(p["cohort"]),
                str(p.get("label")),
                fmt_num(p.get("dfsig_probability")),
                p["method"],
                p["nifti"],
            ]
            for p in cam.get("patients", [])
        ]
        sec.table(
            ReportTable(
                "cam", "Patients shown", ["Patient", "Cohort", "Label", "DFSigM P", "Method", "NIfTI"], rows
            )
        )
        if cam.get("panel"):
            sec.figure(
                rf.run_dir / "cam" / cam["panel"], "CAM panel. Iodine map with mask outline | CAM overlay."
            )
    return sec


def _tripod(rf: RunFiles, cohorts: list[str]) -> Section:
    sec = Section("tripod", "8. TRIPOD+AI items answered by this run")
    run = rf.run or {}
    n_features = len(((rf.selection or {}).get("final") or {}).get("indices") or []) or None
    items = [
        [
            "Source of data (5a)",
            "SYNTHETIC cohort (simulated)" if rf.synthetic else "as listed in the manifest",
            str(run.get("manifest", "–")),
        ],
        ["Outcome (6a)", "PD-L1 status, binary label (1 = high)", "manifest 'label'"],
        [
            "Predictors (7a)",
            f"{n_features or '–'} deep features (ResNet-50 on iodine-map VOI); clinical variables: "
            f"{', '.join(rf.clinical_columns()) or '–'}",
            "selection.json, predictions.csv",
        ],
        [
            "Sample size (8)",
            "; ".join(
                f"{label_cohort(c)}: n={rf.metrics['cohorts'][c]['n']}, "
                f"events={rf.metrics['cohorts'][c]['events']}"
                for c in cohorts
            )
            if rf.metrics
            else "–",
            "metrics.json",
        ],
        [
            "Missing data (9)",
            "reported per variable below; handling by the clinical model (see its tables)",
            "predictions.csv",
        ],
        [
            "Threshold (12)",
            "Youden index on the training cohort, applied unchanged to the validation cohorts"
            if (rf.metrics or {}).get("cutoff_source") == "training"
            else str((rf.metrics or {}).get("cutoff_source", "–")),
            "metrics.json cutoffs",
        ],
        [
            "Model performance (10d, 16)",
            "AUC with DeLong CI, threshold metrics with bootstrap CI, calibration "
            "(HL, Brier, slope/intercept), decision curves",
            "metrics.json",
        ],
        [
            "Model weights (AI)",
            "RANDOM (not pretrained)" if rf.random_weights else str(rf.weights.get("kind", "–")),
            "run.json weights",
        ],
        ["Software (AI)", f"{len(run.get('versions') or {})} package versions recorded", "run.json versions"],
        [
            "Data provenance (AI)",
            f"SHA-256 of {len(run.get('data_hashes') or {})} files",
            "run.json data_hashes",
        ],
    ]
    sec.table(
        ReportTable(
            "tripod_items", "Items and where the run answers them", ["Item", "This run", "Source"], items
        )
    )
    if rf.metrics:
        sec.table(counts_table(rf.metrics, n_features))
        sec.table(cutoff_table(rf.metrics))
    if rf.predictions is not None and rf.clinical_columns():
        frame = missing_table(rf.predictions, rf.clinical_columns(), cohorts)
        sec.table(
            ReportTable.from_frame(
                "missing",
                "Missing values per variable, n (%)",
                frame.rename(columns={c: label_cohort(c) for c in cohorts}),
            )
        )
    w = rf.weights
    if w:
        rows = [[k, json.dumps(v) if isinstance(v, dict | list) else str(v)] for k, v in w.items()]
        sec.table(ReportTable("weights", "Feature-extractor weights", ["Field", "Value"], rows))
    versions = run.get("versions") or {}
    if versions:
        sec.table(
            ReportTable(
                "versions",
                "Software versions",
                ["Package", "Version"],
                [[k, str(v)] for k, v in versions.items()],
            )
        )
    timings = run.get("timings_s") or {}
    if timings:
        sec.table(
            ReportTable(
                "timings",
                "Stage timings",
                ["Stage", "Seconds"],
                [[k, f"{float(v):.1f}"] for k, v in timings.items()],
            )
        )
    hashes = run.get("data_hashes") or {}
    if hashes:
        sec.text(
            f"Manifest SHA-256: {hashes.get('manifest', '–')}; "
            f"config SHA-256: {run.get('config_sha256', '–')}."
        )
        sec.table(
            ReportTable(
                "hashes",
                f"Data hashes (SHA-256, {len(hashes)} files)",
                ["File", "SHA-256"],
                [[k, str(v)] for k, v in hashes.items()],
            ),
            collapsed=True,
        )
    if rf.missing:
        sec.text("Files not present in this run: " + ", ".join(rf.missing) + ".")
    return sec


def assemble(rf: RunFiles, figs: FigureSet) -> Report:
    cohorts = _cohorts(rf)
    sections = [
        _characteristics(rf, cohorts),
        _clinical(rf),
        _signature(rf, figs),
        _fusion(rf, figs),
        _performance(rf, figs),
        _calibration(rf, figs),
        _explain(rf),
        _tripod(rf, cohorts),
    ]
    return Report(TITLE, rf.run_dir, _meta(rf), _banners(rf), sections)


def build_report(run_dir: Path) -> Path:
    """Rebuild the figures, write ``report.html`` (self-contained) and ``report.md``; return the HTML path."""
    from training.report.render import render_html, render_markdown

    run_dir = Path(run_dir).resolve()
    rf = load_run(run_dir)
    figs = build_figures(run_dir)
    report = assemble(rf, figs)
    write_text(run_dir / "report.md", render_markdown(report))
    html = write_text(run_dir / "report.html", render_html(report))
    log.info("report written: %s", html)
    return html


__all__: list[Any] = ["Block", "Report", "Section", "assemble", "build_report"]
