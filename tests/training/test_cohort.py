"""training.cohort.load_manifest: typed columns, resolved paths, errors that name line and column."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from core.errors import InputError
from training.cohort import CLINICAL_COLUMNS, COHORTS, ROW_COLUMN, load_manifest

HEADER = "patient_id,centre,cohort,image,mask,label,age,sex,cea,differentiation"


def _setup(tmp_path: Path, rows: list[str], header: str = HEADER) -> Path:
    (tmp_path / "img").mkdir(exist_ok=True)
    for name in ("p1.nii.gz", "p2.nii.gz", "m1.nii.gz", "m2.nii.gz"):
        (tmp_path / "img" / name).write_bytes(b"x")
    path = tmp_path / "manifest.csv"
    path.write_text("\n".join([header, *rows]) + "\n", encoding="utf-8")
    return path


GOOD = [
    "P1,A,training,img/p1.nii.gz,img/m1.nii.gz,1,61,M,3.5,poor",
    "P2,B,external_validation,img/p2.nii.gz,img/m2.nii.gz,0,,F,,",
]


def test_constants() -> None:
    assert COHORTS == ("training", "internal_validation", "external_validation")
    assert CLINICAL_COLUMNS["age"] == "numeric" and CLINICAL_COLUMNS["sex"] == "categorical"
    assert set(CLINICAL_COLUMNS.values()) == {"numeric", "categorical"}


def test_valid_manifest_is_typed_and_resolved(tmp_path: Path) -> None:
    df = load_manifest(_setup(tmp_path, GOOD))
    assert list(df["patient_id"]) == ["P1", "P2"]
    assert df["label"].dtype == np.int64 and list(df["label"]) == [1, 0]
    assert df["age"].dtype == float and np.isnan(df["age"][1]) and df["age"][0] == 61
    assert df["cea"].isna().tolist() == [False, True]
    assert df["differentiation"].tolist()[0] == "poor" and df["differentiation"].isna().tolist()[1]
    assert Path(df["image"][0]).is_absolute() and Path(df["image"][0]).exists()
    assert list(df[ROW_COLUMN]) == [2, 3]
    assert df.attrs["source"].endswith("manifest.csv")


def test_absolute_paths_are_kept(tmp_path: Path) -> None:
    _setup(tmp_path, GOOD)
    other = tmp_path / "sub"
    other.mkdir()
    row = f"P1,A,training,{tmp_path / 'img' / 'p1.nii.gz'},{tmp_path / 'img' / 'm1.nii.gz'},1,61,M,3.5,poor"
    df = load_manifest(_setup(other, [row]))
    assert df["image"][0] == str(tmp_path / "img" / "p1.nii.gz")


@pytest.mark.parametrize(
    ("bad_row", "column", "message"),
    [
        ("P3,A,training,img/p1.nii.gz,img/m1.nii.gz,2,61,M,3.5,poor", "label", "must be 0 or 1"),
        ("P3,A,train,img/p1.nii.gz,img/m1.nii.gz,1,61,M,3.5,poor", "cohort", "not one of"),
        ("P3,A,training,img/missing.nii.gz,img/m1.nii.gz,1,61,M,3.5,poor", "image", "not found"),
        ("P3,A,training,img/p1.nii.gz,img/none.nii.gz,1,61,M,3.5,poor", "mask", "not found"),
        ("P3,A,training,img/p1.nii.gz,img/m1.nii.gz,1,sixty,M,3.5,poor", "age", "not a number"),
        ("P3,A,training,img/p1.nii.gz,img/m1.nii.gz,1,61,M,inf,poor", "cea", "not finite"),
        ("P1,A,training,img/p1.nii.gz,img/m1.nii.gz,1,61,M,3.5,poor", "patient_id", "first on line 2"),
        (",A,training,img/p1.nii.gz,img/m1.nii.gz,1,61,M,3.5,poor", "patient_id", "empty"),
    ],
)
def test_errors_name_line_and_column(tmp_path: Path, bad_row: str, column: str, message: str) -> None:
    path = _setup(tmp_path, [*GOOD, bad_row])
    with pytest.raises(InputError, match=message) as exc:
        load_manifest(path)
    assert exc.value.field == column
    assert "line 4" in str(exc.value) and str(path) in str(exc.value)


def test_line_numbers_follow_the_file_with_multiline_cells_and_blank_lines(tmp_path: Path) -> None:
    header = HEADER + ",notes"
    rows = [
        GOOD[0] + ',"a note\nover two lines"',
        "",
        "P2,B,external_validation,img/p2.nii.gz,img/m2.nii.gz,yes,,F,,,",
    ]
    with pytest.raises(InputError, match="line 5") as exc:
        load_manifest(_setup(tmp_path, rows, header))
    assert exc.value.field == "label"


def test_structural_errors(tmp_path: Path) -> None:
    with pytest.raises(InputError, match="not found"):
        load_manifest(tmp_path / "none.csv")
    path = _setup(tmp_path, ["P1,A,training,img/p1.nii.gz,1"], header="patient_id,centre,cohort,image,label")
    with pytest.raises(InputError, match=r"missing required column\(s\) \['mask'\]"):
        load_manifest(path)
    with pytest.raises(InputError, match="no rows"):
        load_manifest(_setup(tmp_path, []))


def test_check_files_can_be_disabled(tmp_path: Path) -> None:
    row = "P9,A,training,img/nothing.nii.gz,img/nothing_mask.nii.gz,0,50,F,1.0,well"
    df = load_manifest(_setup(tmp_path, [row]), check_files=False)
    assert df["image"][0].endswith("nothing.nii.gz")
