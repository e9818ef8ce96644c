"""Report tables, each built from the run's files with one formatting rule per kind of number.

Numbers are only formatted here, never recomputed: AUCs, CIs, threshold metrics, DeLong tests,
calibration and decision-curve values are read from ``metrics.json``; the clinical and model-comparison
tables are the run's CSVs. (The cohort-characteristics table is the one the report computes itself, from
``predictions.csv``; see :mod:`training.report.characteristics`.)
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd

from training.figures.selection import label_zoo
from training.figures.style import label_cohort, label_model
from training.report.characteristics import fmt_p

THRESHOLD_METRICS = (
    ("accuracy", "ACC"),
    ("sensitivity", "SEN"),
    ("specificity", "SPE"),
    ("ppv", "PPV"),
    ("npv", "NPV"),
)


@dataclass
class ReportTable:
    """A rendered table: string cells only (formatting is done once, here)."""

    id: str
    title: str
    columns: list[str]
    rows: list[list[str]]
    note: str = ""
    notes: list[str] = field(default_factory=list)

    @classmethod
    def from_frame(cls, id: str, title: str, frame: pd.DataFrame, note: str = "") -> ReportTable:
        cols = [str(c) for c in frame.columns]
        rows = [[format_cell(c, v) for c, v in zip(cols, r)] for r in frame.itertuples(index=False)]
        return cls(id=id, title=title, columns=cols, rows=rows, note=note)

    def to_frame(self) -> pd.DataFrame:
        return pd.DataFrame(self.rows, columns=self.columns)


def fmt_num(v: Any, digits: int = 3) -> str:
    if v is None or (isinstance(v, float) and not math.isfinite(v)):
        return "–"
    return f"{float(v):.{digits}f}"


def fmt_ci(value: Any, ci: Sequence[Any] | None, digits: int = 3) -> str:
    """``0.812 (0.741–0.883)``; the CI part is left out when it is not available."""
    if value is None:
        return "–"
    if not ci or ci[0] is None or ci[1] is None:
        return fmt_num(value, digits)
    return f"{fmt_num(value, digits)} ({fmt_num(ci[0], digits)}–{fmt_num(ci[1], digits)})"


def _is_p_column(name: str) -> bool:
    n = name.lower().replace(" ", "_")
    return n in {"p", "p_value", "pvalue", "pr(>|z|)", "p>|z|"} or n.startswith("p_") or n.endswith("_p")


def format_cell(column: str, value: Any) -> str:
    """CSV cell -> text: p-values as ``<0.001``/3 decimals, other floats 3 decimals, NaN as a dash."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "–"
    if isinstance(value, bool | np.bool_):
        return "yes" if value else "no"
    if isinstance(value, float | np.floating):
        return fmt_p(float(value)) if _is_p_column(column) else fmt_num(value)
    return str(value)


def fmt_sig(v: Any, digits: int = 3) -> str:
    """Odds ratios span many decades: 3 significant digits, scientific notation outside 0.001..10^4."""
    if v is None or (isinstance(v, float) and not math.isfinite(v)):
        return "–"
    v = float(v)
    if v != 0 and not 1e-3 <= abs(v) < 1e4:
        return f"{v:.{digits - 1}e}"
    return f"{v:.{digits}g}" if abs(v) >= 1 else f"{v:.{digits}f}"


def logistic_table(id: str, title: str, frame: pd.DataFrame, note: str = "") -> ReportTable:
    """A coefficient table (``training.clinical`` / ``training.fusion`` columns) as Variable | Term |
    β (SE) | OR (95% CI) | p | p (variable) | n | note; other layouts are shown as they are."""
    need = {"OR", "ci_low", "ci_high", "p"}
    if not need <= set(frame.columns):
        return ReportTable.from_frame(id, title, frame, note)
    cols = ["Variable", "Term", "β (SE)", "OR (95% CI)", "p"]
    has = {c: c in frame.columns for c in ("variable", "term", "coef", "se", "p_variable", "n", "note")}
    cols += ["p (variable)"] * has["p_variable"] + ["n"] * has["n"] + ["Note"] * has["note"]
    rows = []
    for r in frame.to_dict("records"):
        beta = f"{fmt_num(r.get('coef'))} ({fmt_num(r.get('se'))})" if has["coef"] else "–"
        row = [
            str(r.get("variable", "")),
            str(r.get("term", "")),
            beta,
            f"{fmt_sig(r['OR'])} ({fmt_sig(r['ci_low'])}–{fmt_sig(r['ci_high'])})",
            fmt_p(r["p"]),
        ]
        if has["p_variable"]:
            row.append(fmt_p(r["p_variable"]))
        if has["n"]:
            row.append(format_cell("n", r["n"]).removesuffix(".000"))
        if has["note"]:
            row.append(format_cell("note", r["note"]))
        rows.append(row)
    return ReportTable(id, title, cols, rows, note)


def _cohorts(metrics: Mapping[str, Any]) -> list[str]:
    from training.figures.style import COHORT_ORDER

    present = list(metrics["cohorts"])
    return [c for c in COHORT_ORDER if c in present] + [c for c in present if c not in COHORT_ORDER]


def performance_table(metrics: Mapping[str, Any]) -> ReportTable:
    """AUC (DeLong 95% CI) and ACC/SEN/SPE/PPV/NPV (bootstrap 95% CI) at the training cut-off."""
    cols = ["Cohort", "Model", "AUC (95% CI)", *[s for _, s in THRESHOLD_METRICS], "Cut-off"]
    rows = []
    boot = None
    for c in _cohorts(metrics):
        for m, e in metrics["cohorts"][c]["models"].items():
            th = e.get("threshold") or {}
            vals = th.get("metrics") or {}
            boot = boot or (th.get("bootstrap") or {}).get("n_boot")
            cells = [
                fmt_ci(vals.get(k, {}).get("value"), vals.get(k, {}).get("ci")) for k, _ in THRESHOLD_METRICS
            ]
            rows.append(
                [
                    label_cohort(c),
                    label_model(m),
                    fmt_ci(e.get("auc"), e.get("auc_ci")),
                    *cells,
                    fmt_num(th.get("cutoff")),
                ]
            )
    note = (
        "AUC with DeLong 95% CI; ACC, SEN, SPE, PPV, NPV at the cut-off fixed on the training cohort "
        f"({metrics.get('cutoff_source', 'see metrics.json')}), with stratified percentile bootstrap "
        f"95% CIs ({boot} replicates)."
    )
    return ReportTable("performance", "Predictive performance", cols, rows, note)


def delong_table(metrics: Mapping[str, Any]) -> ReportTable:
    cols = ["Cohort", "Comparison", "AUC A", "AUC B", "ΔAUC (95% CI)", "z", "p"]
    rows = []
    for c in _cohorts(metrics):
        for t in metrics["cohorts"][c].get("pairwise_delong", []):
            rows.append(
                [
                    label_cohort(c),
                    f"{label_model(t['a'])} vs {label_model(t['b'])}",
                    fmt_num(t.get("auc1")),
                    fmt_num(t.get("auc2")),
                    fmt_ci(t.get("diff"), [t.get("ci_low"), t.get("ci_high")]),
                    fmt_num(t.get("z"), 2),
                    fmt_p(t.get("p")),
                ]
            )
    return ReportTable(
        "delong", "DeLong tests of paired AUCs", cols, rows, "Two-sided paired DeLong test (pROC roc.test)."
    )


def calibration_table(metrics: Mapping[str, Any]) -> ReportTable:
    cols = ["Cohort", "Model", "HL χ² (df)", "HL p", "Brier", "Slope (95% CI)", "Intercept (95% CI)", "ECE"]
    rows, notes = [], []
    for c in _cohorts(metrics):
        for m, e in metrics["cohorts"][c]["models"].items():
            cal = e.get("calibration")
            notes += e.get("notes") or []
            if not cal:
                rows.append([label_cohort(c), label_model(m), *["–"] * 6])
                continue
            hl = cal.get("hosmer_lemeshow") or {}
            chi = f"{fmt_num(hl.get('statistic'), 2)} ({hl.get('df', '–')})" if hl else "–"
            rows.append(
                [
                    label_cohort(c),
                    label_model(m),
                    chi,
                    fmt_p(hl.get("p_value")),
                    fmt_num(cal.get("brier")),
                    fmt_ci(cal.get("slope"), cal.get("slope_ci")),
                    fmt_ci(cal.get("intercept"), cal.get("intercept_ci")),
                    fmt_num(cal.get("ece")),
                ]
            )
    table = ReportTable(
        "calibration",
        "Calibration",
        cols,
        rows,
        "Hosmer–Lemeshow as R ResourceSelection::hoslem.test (10 risk groups); calibration slope and "
        "intercept by logistic recalibration; ECE over the same risk groups.",
    )
    table.notes = list(dict.fromkeys(notes))
    return table


def _ranges(t: np.ndarray, ok: np.ndarray) -> str:
    """Threshold intervals where ``ok`` holds, e.g. ``0.12–0.55, 0.60–0.71``."""
    parts, start = [], None
    for i, flag in enumerate(ok):
        if flag and start is None:
            start = i
        if start is not None and (not flag or i == len(ok) - 1):
            end = i if flag else i - 1
            parts.append(f"{t[start]:.2f}–{t[end]:.2f}" if end > start else f"{t[start]:.2f}")
            start = None
    return ", ".join(parts) or "none"


def dca_table(metrics: Mapping[str, Any], at: Sequence[float] = (0.3, 0.5)) -> ReportTable:
    cols = [
        "Cohort",
        "Model",
        "Thresholds where net benefit > treat all and > treat none",
        *[f"NB at {p:.2f} (treat all)" for p in at],
    ]
    rows = []
    for c in _cohorts(metrics):
        for m, e in metrics["cohorts"][c]["models"].items():
            dc = e.get("decision_curve")
            if not dc:
                rows.append([label_cohort(c), label_model(m), "–", *["–"] * len(at)])
                continue
            t = np.asarray(dc["thresholds"], dtype=float)
            nb = np.asarray([np.nan if v is None else v for v in dc["net_benefit"]], dtype=float)
            all_ = np.asarray([np.nan if v is None else v for v in dc["treat_all"]], dtype=float)
            ok = (nb > all_) & (nb > 0)
            at_cells = []
            for p in at:
                i = int(np.argmin(np.abs(t - p)))
                at_cells.append(f"{fmt_num(nb[i])} ({fmt_num(all_[i])})")
            rows.append([label_cohort(c), label_model(m), _ranges(t, ok), *at_cells])
    return ReportTable(
        "dca",
        "Decision-curve summary",
        cols,
        rows,
        "Net benefit = TP/n − FP/n · pt/(1 − pt) at threshold probability pt (from metrics.json).",
    )


def counts_table(metrics: Mapping[str, Any], n_predictors: int | None = None) -> ReportTable:
    """Patients, events and prevalence per cohort; events per DFSigM predictor for the training cohort."""
    cols = ["Cohort", "Patients", "Events (PD-L1 high)", "Prevalence", "Events per selected deep feature"]
    rows = []
    for c in _cohorts(metrics):
        e = metrics["cohorts"][c]
        epv = "–"
        if c == "training" and n_predictors and e.get("events") is not None:
            events = min(int(e["events"]), int(e["n"]) - int(e["events"]))  # the smaller class limits
            epv = f"{events / n_predictors:.1f} ({events} / {n_predictors})"
        rows.append(
            [label_cohort(c), str(e.get("n")), str(e.get("events")), fmt_num(e.get("prevalence")), epv]
        )
    return ReportTable(
        "counts",
        "Patients and events per cohort",
        cols,
        rows,
        "Events per predictor uses the smaller outcome class of the training cohort.",
    )


def model_comparison_table(frame: pd.DataFrame) -> ReportTable:
    keep = [
        c for c in ("model", "metric", "cv_mean", "cv_sd", "best_params", "linear", "selected") if c in frame
    ]
    f = frame[keep].copy() if keep else frame.copy()
    if "model" in f:
        f["model"] = [label_zoo(str(m)) for m in f["model"]]
    return ReportTable.from_frame(
        "model_comparison",
        "DFSigM candidate classifiers (repeated stratified CV on the training cohort)",
        f,
        "Mean and SD over the repeated CV folds of each candidate's best grid point; optimistic (grid "
        "maximum, features selected on the same cohort). Only the validation cohorts give unbiased "
        "performance.",
    )


def cutoff_table(metrics: Mapping[str, Any]) -> ReportTable:
    cutoffs = metrics.get("cutoffs") or {}
    rows = [[label_model(m), fmt_num(v), str(metrics.get("cutoff_source", "–"))] for m, v in cutoffs.items()]
    return ReportTable("cutoffs", "Classification cut-offs", ["Model", "Cut-off", "Source"], rows)
