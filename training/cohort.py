"""Load and validate a cohort `manifest.csv`; every error names the line in the file and the column.

Required columns: patient_id, cohort, image, mask, label. `image`/`mask` are paths relative to the
manifest (or absolute) and must exist; `label` is 0/1 (1 = PD-L1 high, CPS >= 1); `cohort` is one of
`COHORTS`. Optional `centre` and the clinical columns in `CLINICAL_COLUMNS` are typed (empty cells are
missing values); any other column is kept as text.
"""

from __future__ import annotations

import csv
import logging
import os
from pathlib import Path

import numpy as np
import pandas as pd

from core.errors import InputError

log = logging.getLogger(__name__)

COHORTS = ("training", "internal_validation", "external_validation")
REQUIRED_COLUMNS = ("patient_id", "cohort", "image", "mask", "label")
#: Clinical variables of the synthetic cohort (and the study) with their type.
CLINICAL_COLUMNS: dict[str, str] = {
    "age": "numeric",
    "sex": "categorical",
    "location": "categorical",
    "lauren": "categorical",
    "differentiation": "categorical",
    "ct_stage": "categorical",
    "cn_stage": "categorical",
    "cea": "numeric",
    "ca199": "numeric",
    "nic": "numeric",
}
#: Known levels in a meaningful order (ordinal ones low -> high); other levels are accepted as they come.
CATEGORY_LEVELS: dict[str, tuple[str, ...]] = {
    "sex": ("F", "M"),
    "location": ("cardia", "body", "antrum"),
    "lauren": ("intestinal", "diffuse", "mixed"),
    "differentiation": ("well", "moderate", "poor"),
    "ct_stage": ("T1", "T2", "T3", "T4"),
    "cn_stage": ("N0", "N1", "N2", "N3"),
}
#: Line-number column added to the returned frame (1-based line in the file; the header is line 1).
ROW_COLUMN = "manifest_line"


def load_manifest(path: str | os.PathLike[str], *, check_files: bool = True) -> pd.DataFrame:
    """Read and validate a manifest; image/mask become absolute paths (str), label int, clinical typed."""
    path = Path(path)
    source = str(path)
    if not path.is_file():
        raise InputError("manifest not found", source=source)
    try:
        raw = pd.read_csv(path, dtype=str, keep_default_na=False, skipinitialspace=True, encoding="utf-8-sig")
    except (pd.errors.ParserError, UnicodeDecodeError, pd.errors.EmptyDataError) as exc:
        raise InputError(f"not a readable CSV ({exc})", source=source) from exc
    raw.columns = [c.strip() for c in raw.columns]
    missing = [c for c in REQUIRED_COLUMNS if c not in raw.columns]
    if missing:
        raise InputError(f"missing required column(s) {missing}; found {list(raw.columns)}", source=source)
    if raw.columns.duplicated().any():
        raise InputError(
            f"duplicated column names {sorted(set(raw.columns[raw.columns.duplicated()]))}", source=source
        )
    if raw.empty:
        raise InputError("manifest has no rows", source=source)
    lines = _line_numbers(path, len(raw))
    base = path.parent.resolve()
    out = pd.DataFrame({ROW_COLUMN: lines})

    def err(i: int, column: str, problem: str) -> InputError:
        return InputError(f"line {lines[i]}: {problem}", source=source, field=column)

    ids = raw["patient_id"].str.strip()
    seen: dict[str, int] = {}
    for i, pid in enumerate(ids):
        if not pid:
            raise err(i, "patient_id", "empty patient_id")
        if pid in seen:
            raise err(i, "patient_id", f"duplicate patient_id {pid!r} (first on line {lines[seen[pid]]})")
        seen[pid] = i
    out["patient_id"] = ids.to_numpy()

    cohorts = raw["cohort"].str.strip()
    for i, value in enumerate(cohorts):
        if value not in COHORTS:
            raise err(i, "cohort", f"cohort {value!r} is not one of {list(COHORTS)}")
    out["cohort"] = cohorts.to_numpy()

    labels = []
    for i, value in enumerate(raw["label"].str.strip()):
        try:
            number = float(value)
        except ValueError:
            number = np.nan
        if number not in (0.0, 1.0):
            raise err(i, "label", f"label {value!r} must be 0 or 1 (1 = PD-L1 high, CPS >= 1)")
        labels.append(int(number))
    out["label"] = np.asarray(labels, dtype=np.int64)

    for column in ("image", "mask"):
        resolved = []
        for i, value in enumerate(raw[column].str.strip()):
            if not value:
                raise err(i, column, f"empty {column} path")
            p = Path(value)
            p = p if p.is_absolute() else base / p
            if check_files and not p.exists():
                raise err(i, column, f"{column} file not found: {p}")
            resolved.append(str(p))
        out[column] = resolved

    if "centre" in raw.columns:
        out["centre"] = raw["centre"].str.strip().replace("", np.nan).to_numpy()
    for column, kind in CLINICAL_COLUMNS.items():
        if column not in raw.columns:
            continue
        values = raw[column].str.strip()
        if kind == "numeric":
            numbers = pd.to_numeric(values.replace("", np.nan), errors="coerce")
            bad = numbers.isna() & (values != "") & ~values.str.lower().isin(["na", "nan"])
            if bad.any():
                i = int(np.flatnonzero(bad.to_numpy())[0])
                raise err(i, column, f"{column} {values.iloc[i]!r} is not a number")
            if not np.isfinite(numbers.dropna()).all():
                i = int(np.flatnonzero(~np.isfinite(numbers.fillna(0).to_numpy()))[0])
                raise err(i, column, f"{column} {values.iloc[i]!r} is not finite")
            out[column] = numbers.astype(float).to_numpy()
        else:
            out[column] = values.replace({"": np.nan, "NA": np.nan, "nan": np.nan}).astype(object).to_numpy()
    known = {ROW_COLUMN, *REQUIRED_COLUMNS, "centre", *CLINICAL_COLUMNS}
    for column in raw.columns:
        if column not in known:
            out[column] = raw[column].to_numpy()
    ordered = [ROW_COLUMN, "patient_id", "centre", "cohort", "image", "mask", "label"]
    out = out[[c for c in ordered if c in out.columns] + [c for c in out.columns if c not in ordered]]
    out.attrs["source"] = source
    return out


def clinical_columns(frame: pd.DataFrame) -> dict[str, str]:
    """The known clinical columns present in a loaded manifest, with their type."""
    return {c: k for c, k in CLINICAL_COLUMNS.items() if c in frame.columns}


def _line_numbers(path: Path, n_rows: int) -> list[int]:
    """1-based file line of each data row (quoted fields may span lines, so count with the csv module)."""
    lines: list[int] = []
    with path.open(newline="", encoding="utf-8-sig") as fh:
        reader = csv.reader(fh)
        next(reader, None)
        start = reader.line_num + 1
        for row in reader:
            if any(cell.strip() for cell in row):
                lines.append(start)
            start = reader.line_num + 1
    if len(lines) != n_rows:
        log.warning(
            "%s: could not map rows to file lines (odd quoting); error line numbers are approximate", path
        )
        return list(range(2, n_rows + 2))
    return lines
