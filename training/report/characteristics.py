"""Cohort characteristics ("Table 1") with p-values of the training cohort against each validation cohort.

Variables are the clinical columns of ``predictions.csv``, typed by ``kinds`` (the study's
``training.cohort.CLINICAL_COLUMNS``); an untyped numeric column with more than ``max_levels`` distinct
values is continuous. Continuous: median [IQR], two-sided Mann-Whitney U test. Categorical: n (%) per
level (in ``level_order`` when given), chi-square test of independence without continuity correction,
or Fisher's exact test for 2 x 2 tables with an expected count below 5. Missing values are not a level;
they are counted in their own row and excluded from the tests. Pairwise tests (training vs each
validation cohort) are what the paper reports: the question is whether each validation cohort resembles
the cohort the model was fitted on.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
import pandas as pd
from scipy import stats

TRAINING = "training"
INDENT = "\u00a0\u00a0\u00a0"  # non-breaking: survives HTML whitespace collapsing


def is_continuous(series: pd.Series, max_levels: int = 5) -> bool:
    return pd.api.types.is_numeric_dtype(series) and series.dropna().nunique() > max_levels


def fmt_p(p: float | None) -> str:
    if p is None or not np.isfinite(p):
        return "–"
    return "<0.001" if p < 0.001 else f"{p:.3f}"


def _continuous_p(a: pd.Series, b: pd.Series) -> tuple[float | None, str]:
    a, b = a.dropna(), b.dropna()
    if len(a) == 0 or len(b) == 0:
        return None, "Mann-Whitney U"
    return float(stats.mannwhitneyu(a, b, alternative="two-sided").pvalue), "Mann-Whitney U"


def _categorical_p(a: pd.Series, b: pd.Series) -> tuple[float | None, str]:
    a, b = a.dropna().astype(str), b.dropna().astype(str)
    levels = sorted(set(a) | set(b))
    if len(levels) < 2 or len(a) == 0 or len(b) == 0:
        return None, "chi-square"
    table = np.array([[int((a == lv).sum()) for lv in levels], [int((b == lv).sum()) for lv in levels]])
    expected = stats.contingency.expected_freq(table)
    if table.shape == (2, 2) and expected.min() < 5:
        return float(stats.fisher_exact(table).pvalue), "Fisher exact"
    return float(stats.chi2_contingency(table, correction=False).pvalue), "chi-square"


def _level_label(level: object) -> str:
    if isinstance(level, float) and level.is_integer():
        return str(int(level))
    return str(level)


def characteristics_table(
    predictions: pd.DataFrame,
    variables: Sequence[str],
    cohorts: Sequence[str],
    *,
    label_col: str = "label",
    max_levels: int = 5,
    kinds: Mapping[str, str] | None = None,
    level_order: Mapping[str, Sequence[str]] | None = None,
) -> pd.DataFrame:
    """One row per statistic; columns: Characteristic, each cohort, p per validation cohort, Test."""
    groups = {c: predictions[predictions["cohort"] == c] for c in cohorts}
    others = [c for c in cohorts if c != TRAINING] if TRAINING in groups else []
    rows: list[dict[str, str]] = []

    def row(name: str, cells: dict[str, str], ps: dict[str, str] | None = None, test: str = "") -> None:
        rows.append({"Characteristic": name, **cells, **(ps or {}), "Test": test})

    row("Patients, n", {c: str(len(g)) for c, g in groups.items()})
    labels = {c: g[label_col] for c, g in groups.items()}
    ps, test = {}, ""
    for o in others:
        p, test = _categorical_p(labels[TRAINING], labels[o])
        ps[f"p (training vs {o})"] = fmt_p(p)
    cells = {
        c: f"{int((s == 1).sum())} ({100 * (s == 1).mean():.1f}%)" if len(s) else "–"
        for c, s in labels.items()
    }
    row("PD-L1 high (label 1), n (%)", cells, ps, test)
    for col in variables:
        data = {c: g[col] for c, g in groups.items()}
        kind = (kinds or {}).get(col)
        if kind in ("numeric", "continuous") or (
            kind is None and is_continuous(predictions[col], max_levels)
        ):
            cells = {}
            for c, s in data.items():
                q = s.dropna().quantile([0.25, 0.5, 0.75])
                cells[c] = f"{q[0.5]:.3g} [{q[0.25]:.3g}–{q[0.75]:.3g}]" if s.notna().any() else "–"
            ps, test = {}, "Mann-Whitney U"
            for o in others:
                p, test = _continuous_p(data[TRAINING], data[o])
                ps[f"p (training vs {o})"] = fmt_p(p)
            row(f"{col}, median [IQR]", cells, ps, test)
        else:
            ps, test = {}, ""
            for o in others:
                p, test = _categorical_p(data[TRAINING], data[o])
                ps[f"p (training vs {o})"] = fmt_p(p)
            row(f"{col}, n (%)", dict.fromkeys(groups, ""), ps, test)
            order = list((level_order or {}).get(col, ()))
            present = predictions[col].dropna().unique().tolist()
            known = [lv for lv in order if lv in present]
            for lv in known + sorted((lv for lv in present if lv not in known), key=str):
                cells = {}
                for c, s in data.items():
                    n_valid = int(s.notna().sum())
                    k = int((s == lv).sum())
                    cells[c] = f"{k} ({100 * k / n_valid:.1f}%)" if n_valid else "–"
                row(f"{INDENT}{_level_label(lv)}", cells)
        if any(s.isna().any() for s in data.values()):
            row(f"{INDENT}missing, n", {c: str(int(s.isna().sum())) for c, s in data.items()})
    columns = ["Characteristic", *groups, *[f"p (training vs {o})" for o in others], "Test"]
    return pd.DataFrame(rows, columns=columns).fillna("")


def missing_table(
    predictions: pd.DataFrame, variables: Sequence[str], cohorts: Sequence[str]
) -> pd.DataFrame:
    """Missing values per variable and cohort as ``n (%)`` (TRIPOD item: missing data)."""
    rows = []
    for v in variables:
        entry = {"Variable": v}
        for c in cohorts:
            s = predictions.loc[predictions["cohort"] == c, v]
            entry[c] = f"{int(s.isna().sum())} ({100 * s.isna().mean():.1f}%)" if len(s) else "–"
        rows.append(entry)
    return pd.DataFrame(rows)
