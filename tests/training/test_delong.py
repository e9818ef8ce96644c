"""DeLong AUC inference against pROC's published values (../shared/reference) and the O(mn) definition."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from sklearn.metrics import roc_auc_score

from core.errors import InputError
from tests.reference_data import load_asah
from training.stats.delong import (
    auc_ci,
    auc_delong,
    delong_covariance,
    delong_paired,
    pairwise_delong,
)

TOL = 1e-9  # pROC prints 15 significant digits; the acceptance criterion is 1e-6


@pytest.fixture(scope="module")
def asah() -> pd.DataFrame:
    df = load_asah()  # cases = Poor outcome, pROC direction "<"
    assert df["y"].sum() == 41 and len(df) == 113
    return df


def test_aucs_and_variances_match_proc(asah: pd.DataFrame) -> None:
    expected = {
        "s100b": (0.731368563685637, 0.00266868245717244),
        "wfns": (0.823678861788618, 0.00146991470882363),
        "ndka": (0.611957994579946, 0.0031908105493913),
    }
    for col, (auc_ref, var_ref) in expected.items():
        auc, var = auc_delong(asah["y"], asah[col])
        assert auc == pytest.approx(auc_ref, abs=TOL), col
        assert var == pytest.approx(var_ref, abs=TOL), col


def test_covariance_matrix_matches_proc(asah: pd.DataFrame) -> None:
    aucs, cov = delong_covariance(asah["y"], [asah["s100b"], asah["wfns"], asah["ndka"]])
    assert cov.shape == (3, 3)
    np.testing.assert_allclose(cov, cov.T, atol=0)
    assert cov[0, 1] == pytest.approx(0.00119615567376754, abs=TOL)
    np.testing.assert_allclose(
        np.diag(cov), [0.00266868245717244, 0.00146991470882363, 0.0031908105493913], atol=TOL
    )
    np.testing.assert_allclose(aucs, [0.731368563685637, 0.823678861788618, 0.611957994579946], atol=TOL)


def test_ci_of_ndka_matches_proc(asah: pd.DataFrame) -> None:
    auc, lo, hi = auc_ci(asah["y"], asah["ndka"])
    assert auc == pytest.approx(0.611957994579946, abs=TOL)
    assert lo == pytest.approx(0.501244999271703, abs=TOL)
    assert hi == pytest.approx(0.722670989888189, abs=TOL)


@pytest.mark.parametrize(
    ("a", "b", "z_ref", "p_ref"),
    [
        ("wfns", "s100b", 2.20898359144091, 0.0271757822291882),
        ("wfns", "ndka", 2.79777591868904, 0.00514557970691098),
        ("ndka", "s100b", -1.39077002573558, 0.164295175223054),
    ],
)
def test_paired_tests_match_proc(asah: pd.DataFrame, a: str, b: str, z_ref: float, p_ref: float) -> None:
    res = delong_paired(asah["y"], asah[a], asah[b])
    assert res["z"] == pytest.approx(z_ref, abs=TOL)
    assert res["p"] == pytest.approx(p_ref, abs=TOL)
    assert res["diff"] == pytest.approx(res["auc1"] - res["auc2"], abs=1e-15)


def test_ci_of_difference_matches_proc(asah: pd.DataFrame) -> None:
    res = delong_paired(asah["y"], asah["wfns"], asah["s100b"])
    assert res["ci_low"] == pytest.approx(0.0104061769564846, abs=TOL)
    assert res["ci_high"] == pytest.approx(0.174214419249478, abs=TOL)
    assert res["cov"] == pytest.approx(0.00119615567376754, abs=TOL)


def test_pairwise_agrees_with_single_pair(asah: pd.DataFrame) -> None:
    scores = {c: asah[c].to_numpy() for c in ("s100b", "wfns", "ndka")}
    aucs, _, tests = pairwise_delong(asah["y"], scores)
    assert [(t["a"], t["b"]) for t in tests] == [("s100b", "wfns"), ("s100b", "ndka"), ("wfns", "ndka")]
    ref = delong_paired(asah["y"], scores["wfns"], scores["ndka"])
    got = tests[2]
    for key in ("auc1", "auc2", "diff", "var_diff", "z", "p", "ci_low", "ci_high"):
        assert got[key] == pytest.approx(ref[key], abs=1e-14), key
    assert aucs["wfns"] == pytest.approx(0.823678861788618, abs=TOL)


def _delong_bruteforce(y: np.ndarray, scores: list[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    """DeLong 1988 from its definition: psi(x, y) = 1 if x > y, 1/2 if equal; O(m n) per score."""
    pos, neg = y == 1, y == 0
    v10s, v01s, aucs = [], [], []
    for s in scores:
        x, z = s[pos][:, None], s[neg][None, :]
        psi = (x > z) + 0.5 * (x == z)
        v10s.append(psi.mean(axis=1))
        v01s.append(psi.mean(axis=0))
        aucs.append(psi.mean())
    m, n = pos.sum(), neg.sum()
    return np.array(aucs), np.cov(np.array(v10s)) / m + np.cov(np.array(v01s)) / n


def test_fast_algorithm_equals_definition_with_ties() -> None:
    rng = np.random.default_rng(3)
    y = rng.integers(0, 2, 150)
    s1 = np.round(rng.normal(size=150) + y, 1)  # rounding creates many ties
    s2 = rng.integers(0, 5, 150).astype(float) + 0.5 * y
    s3 = rng.normal(size=150)
    aucs, cov = delong_covariance(y, np.vstack([s1, s2, s3]))
    ref_aucs, ref_cov = _delong_bruteforce(y, [s1, s2, s3])
    np.testing.assert_allclose(aucs, ref_aucs, atol=1e-12)
    np.testing.assert_allclose(cov, ref_cov, atol=1e-12)
    assert aucs[0] == pytest.approx(roc_auc_score(y, s1), abs=1e-12)


def test_direction_is_fixed_not_flipped() -> None:
    y = np.array([0, 0, 0, 1, 1, 1])
    s = np.array([6.0, 5, 4, 3, 2, 1])  # perfectly inverted
    auc, var = auc_delong(y, s)
    assert auc == 0.0 and var == 0.0
    _, lo, hi = auc_ci(y, s)
    assert (lo, hi) == (0.0, 0.0)


def test_identical_scores_give_undefined_test_not_crash() -> None:
    y = np.array([0, 1, 0, 1, 1, 0])
    s = np.array([0.1, 0.8, 0.3, 0.6, 0.2, 0.5])
    res = delong_paired(y, s, s)
    assert res["diff"] == 0.0 and res["z"] is None and res["p"] is None


@pytest.mark.parametrize(
    ("y", "s", "field"),
    [
        ([0, 1, 2, 1], [0.1, 0.2, 0.3, 0.4], "label"),  # not binary
        ([0, 0, 0, 0], [0.1, 0.2, 0.3, 0.4], "label"),  # one class
        ([0, 1, 0, 1], [0.1, np.nan, 0.3, 0.4], "score"),  # NaN score
        ([0, 1, 0, 1], [0.1, 0.2, 0.3], "score"),  # length mismatch
        (["a", "b", "a", "b"], [0.1, 0.2, 0.3, 0.4], "label"),  # strings
        ([0, 1, 0, 0, 0], [0.1, 0.2, 0.3, 0.4, 0.5], "label"),  # a single positive: no variance
    ],
)
def test_bad_input_raises_input_error(y: list, s: list, field: str) -> None:
    with pytest.raises(InputError) as err:
        auc_delong(y, s)
    assert err.value.field == field


def test_smallest_valid_input_is_accepted() -> None:
    auc, var = auc_delong([0, 1, 0, 1, 1], [0.1, 0.2, 0.3, 0.4, 0.5])
    assert auc == pytest.approx(5 / 6) and var > 0.0  # 5 of the 6 (case, control) pairs ordered
    auc_b, _ = auc_delong(np.array([False, True, False, True, True]), [0.1, 0.2, 0.3, 0.4, 0.5])
    assert auc_b == auc
