"""Net benefit against the `dcurves` package (a peer implementation) on its bundled df_binary.csv.

dcurves (1.1.x, read from its source): test-positive when risk >= threshold (same rule as ours);
tp_rate = (#cases >= t / #cases) * prevalence and fp_rate likewise, i.e. TP/n and FP/n written differently,
so values agree to rounding (~1e-15), not bitwise. It maps risks of exactly 0 and 1 to 0 - eps and 1 + eps,
which changes nothing for thresholds strictly inside (0, 1). No adjustment is needed on our side.
"""

from __future__ import annotations

from pathlib import Path

import dcurves
import numpy as np
import pandas as pd
import pytest

from core.errors import InputError
from training.stats.decision_curve import (
    DEFAULT_THRESHOLDS,
    decision_curve,
    net_benefit,
    treat_all_net_benefit,
)

THRESHOLDS = [i / 100 for i in range(1, 100)]


@pytest.fixture(scope="module")
def binary() -> pd.DataFrame:
    return pd.read_csv(Path(dcurves.data) / "df_binary.csv")


@pytest.fixture(scope="module")
def reference(binary: pd.DataFrame) -> pd.DataFrame:
    return dcurves.dca(
        data=binary, outcome="cancer", modelnames=["cancerpredmarker", "famhistory"], thresholds=THRESHOLDS
    )


def test_default_grid_is_exact_hundredths() -> None:
    assert DEFAULT_THRESHOLDS.tolist() == THRESHOLDS


@pytest.mark.parametrize("model", ["cancerpredmarker", "famhistory"])
def test_net_benefit_matches_dcurves(binary: pd.DataFrame, reference: pd.DataFrame, model: str) -> None:
    y = binary["cancer"].astype(int).to_numpy()
    ref = reference.loc[reference["model"] == model].sort_values("threshold")
    assert ref["threshold"].tolist() == THRESHOLDS
    ours = net_benefit(y, binary[model].to_numpy())
    np.testing.assert_allclose(ours, ref["net_benefit"].to_numpy(), rtol=0, atol=1e-12)
    assert np.ptp(ours) > 0.01  # the comparison covers a curve that actually varies


def test_treat_all_and_none_match_dcurves(binary: pd.DataFrame, reference: pd.DataFrame) -> None:
    y = binary["cancer"].astype(int).to_numpy()
    curve = decision_curve(y, binary["cancerpredmarker"].to_numpy())
    ref_all = reference.loc[reference["model"] == "all"].sort_values("threshold")["net_benefit"].to_numpy()
    ref_none = reference.loc[reference["model"] == "none"].sort_values("threshold")["net_benefit"].to_numpy()
    np.testing.assert_allclose(curve.treat_all, ref_all, rtol=0, atol=1e-12)
    np.testing.assert_allclose(curve.treat_none, ref_none, rtol=0, atol=1e-12)
    np.testing.assert_allclose(treat_all_net_benefit(y), ref_all, rtol=0, atol=1e-12)
    assert curve.prevalence == pytest.approx(y.mean()) and curve.n == len(y) == 750


def test_risk_equal_to_threshold_is_test_positive() -> None:
    y = np.array([1, 1, 0])
    p = np.array([0.3, 0.3, 0.1])
    # at t = 0.3 both cases are positive under ">=": NB = 2/3 - 0 (under ">" it would be 0)
    assert net_benefit(y, p, [0.3])[0] == pytest.approx(2 / 3, abs=1e-15)
    # at t = 0.1 the control is positive too: NB = 2/3 - 1/3 * 0.1/0.9
    assert net_benefit(y, p, [0.1])[0] == pytest.approx(2 / 3 - (1 / 3) * (0.1 / 0.9), abs=1e-15)


@pytest.mark.parametrize("bad", [[0.0, 0.5], [0.5, 1.0], [np.nan]])
def test_thresholds_must_be_inside_unit_interval(bad: list) -> None:
    with pytest.raises(InputError):
        net_benefit([0, 1], [0.2, 0.8], bad)


def test_scores_outside_unit_interval_raise() -> None:
    with pytest.raises(InputError):
        decision_curve([0, 1, 0], [0.2, 1.5, 0.1])
