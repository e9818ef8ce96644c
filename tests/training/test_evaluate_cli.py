"""`evaluate_table` / `evaluate_models` and the `pdl1 evaluate` command on pROC's aSAH data."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from typer.testing import CliRunner

from cli.main import app
from core.errors import InputError
from tests.reference_data import load_asah
from training.stats.delong import auc_delong
from training.stats.evaluate import evaluate_models, evaluate_table
from training.stats.thresholds import youden_cutoff

AUC_REF = {"s100b": 0.731368563685637, "wfns": 0.823678861788618, "ndka": 0.611957994579946}


@pytest.fixture(scope="module")
def asah() -> pd.DataFrame:
    df = load_asah()
    df["p_wfns"] = df["wfns"] / 6.0  # a monotone map into [0, 1]: same AUC, exercises calibration + DCA
    return df


@pytest.fixture(scope="module")
def csv_path(asah: pd.DataFrame, tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("evaluate") / "asah.csv"
    asah.to_csv(path, index=False)
    return path


def test_cli_reports_reference_aucs(csv_path: Path) -> None:
    result = CliRunner().invoke(
        app,
        [
            "evaluate",
            "--predictions",
            str(csv_path),
            "--label-col",
            "y",
            "--score-cols",
            "s100b,wfns,ndka,p_wfns",
        ],
    )
    assert result.exit_code == 0, result.output
    out = json.loads(result.stdout)
    cohort = out["cohorts"]["all"]
    assert cohort["n"] == 113 and cohort["events"] == 41
    for col, ref in AUC_REF.items():
        assert cohort["models"][col]["auc"] == pytest.approx(ref, abs=1e-9)
    assert cohort["models"]["p_wfns"]["auc"] == pytest.approx(AUC_REF["wfns"], abs=1e-9)
    lo, hi = cohort["models"]["ndka"]["auc_ci"]
    assert (lo, hi) == pytest.approx((0.501244999271703, 0.722670989888189), abs=1e-9)
    pair = next(t for t in cohort["pairwise_delong"] if {t["a"], t["b"]} == {"wfns", "s100b"})
    assert abs(pair["z"]) == pytest.approx(2.20898359144091, abs=1e-9)
    assert pair["p"] == pytest.approx(0.0271757822291882, abs=1e-9)
    assert len(cohort["pairwise_delong"]) == 6  # 4 scores -> 6 pairs
    # raw markers are not probabilities: calibration/DCA skipped with a note; the probability gets them
    assert cohort["models"]["s100b"]["calibration"] is None and cohort["models"]["s100b"]["notes"]
    cal = cohort["models"]["p_wfns"]["calibration"]
    assert cal["hosmer_lemeshow"]["df"] == cal["hosmer_lemeshow"]["groups"] - 2
    assert len(cohort["models"]["p_wfns"]["decision_curve"]["net_benefit"]) == 99


def test_cli_bad_column_exits_2_naming_it(csv_path: Path) -> None:
    result = CliRunner().invoke(
        app, ["evaluate", "--predictions", str(csv_path), "--label-col", "y", "--score-cols", "s100b,nope"]
    )
    assert result.exit_code == 2
    assert "'nope'" in result.output and "column not found" in result.output


def test_cli_text_labels_exit_2_naming_label_column(csv_path: Path) -> None:
    result = CliRunner().invoke(
        app, ["evaluate", "--predictions", str(csv_path), "--label-col", "outcome", "--score-cols", "s100b"]
    )
    assert result.exit_code == 2
    assert "'outcome'" in result.output and "binary" in result.output


def test_nan_score_raises_naming_column(asah: pd.DataFrame) -> None:
    df = asah.copy()
    df.loc[5, "ndka"] = np.nan
    with pytest.raises(InputError) as err:
        evaluate_table(df, label_col="y", score_cols=["wfns", "ndka"], n_boot=10)
    assert err.value.field == "ndka" and "ndka" in str(err.value)


def test_cohorts_and_threshold_cohort(asah: pd.DataFrame) -> None:
    res = evaluate_table(
        asah,
        label_col="y",
        score_cols=["wfns", "p_wfns"],
        cohort_col="gender",
        threshold_cohort="Female",
        n_boot=50,
    )
    assert list(res["cohorts"]) == ["Female", "Male"]
    fem = asah["gender"] == "Female"
    cut = youden_cutoff(asah.loc[fem, "y"], asah.loc[fem, "wfns"]).cutoff
    for name, sel in (("Female", fem), ("Male", ~fem)):
        model = res["cohorts"][name]["models"]["wfns"]
        assert model["auc"] == pytest.approx(
            auc_delong(asah.loc[sel, "y"], asah.loc[sel, "wfns"])[0], abs=1e-12
        )
        assert model["threshold"]["cutoff"] == cut
        assert model["threshold"]["cutoff_from"] == "youden on cohort 'Female'"
        assert res["cohorts"][name]["n"] == int(sel.sum())
    json.dumps(res, allow_nan=False)  # strictly valid JSON


def test_unknown_threshold_cohort_raises(asah: pd.DataFrame) -> None:
    with pytest.raises(InputError) as err:
        evaluate_table(asah, label_col="y", score_cols=["wfns"], cohort_col="gender", threshold_cohort="x")
    assert err.value.field == "gender"


def test_evaluate_models_uses_given_cutoffs_and_never_emits_nan() -> None:
    rng = np.random.default_rng(0)
    y = rng.integers(0, 2, 90)
    scores = {"a": np.clip(rng.random(90) * 0.8 + 0.15 * y, 0, 1), "b": rng.random(90)}
    res = evaluate_models(y, scores, cutoffs={"a": 0.99, "b": 0.5}, cutoff_source="training", n_boot=100)
    thr = res["models"]["a"]["threshold"]
    assert thr["cutoff"] == 0.99 and thr["cutoff_from"] == "training"
    assert thr["tp"] + thr["fp"] == int((scores["a"] >= 0.99).sum())
    assert thr["metrics"]["ppv"]["value"] is None  # 0/0 -> None, not NaN
    json.dumps(res, allow_nan=False)
    with pytest.raises(InputError):
        evaluate_models(y, scores, cutoffs={"a": 0.5})


def test_three_models_three_cohorts_is_fast(asah: pd.DataFrame) -> None:
    import time

    rng = np.random.default_rng(1)
    n = 267
    df = pd.DataFrame(
        {
            "y": rng.integers(0, 2, n),
            "cohort": rng.choice(["train", "internal", "external"], n, p=[0.5, 0.25, 0.25]),
        }
    )
    for k, name in enumerate(["clinical", "dfsig", "fusion"]):
        df[name] = np.clip(rng.random(n) * 0.7 + 0.1 * (k + 1) * df["y"], 0, 1)
    start = time.perf_counter()
    res = evaluate_table(
        df,
        label_col="y",
        score_cols=["clinical", "dfsig", "fusion"],
        cohort_col="cohort",
        threshold_cohort="train",
    )
    elapsed = time.perf_counter() - start
    assert set(res["cohorts"]) == {"train", "internal", "external"}
    assert elapsed < 10.0, f"evaluation took {elapsed:.1f}s"
