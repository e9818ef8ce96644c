"""Youden cut-off and threshold metrics with stratified bootstrap CIs."""

from __future__ import annotations

import numpy as np
import pytest
from sklearn.metrics import confusion_matrix, f1_score

from core.errors import InputError
from tests.reference_data import load_asah
from training.stats.thresholds import confusion_metrics, threshold_metrics, youden_cutoff


def test_youden_on_asah_matches_proc_coords_example() -> None:
    # pROC's help page for coords(): roc(aSAH$outcome, aSAH$s100b) best threshold 0.205 with specificity
    # 0.8055556 and sensitivity 0.6341463 (not among shared/reference's values, quoted from pROC's docs).
    df = load_asah()
    yc = youden_cutoff(df["y"], df["s100b"])
    assert yc.cutoff == pytest.approx(0.205, abs=1e-12)
    assert yc.specificity == pytest.approx(58 / 72) and yc.sensitivity == pytest.approx(26 / 41)


def test_youden_cutoff_maximises_j_over_all_cutoffs() -> None:
    rng = np.random.default_rng(0)
    y = rng.integers(0, 2, 80)
    s = np.round(rng.normal(size=80) + 1.2 * y, 1)
    yc = youden_cutoff(y, s)
    best = max(((s[y == 1] >= c).mean() + (s[y == 0] < c).mean() - 1.0) for c in np.unique(s))
    assert yc.youden_j == pytest.approx(best, abs=1e-12)
    # the cut-off lies strictly between two observed scores and reproduces the reported sens/spec
    assert not np.isin(yc.cutoff, s)
    assert (s[y == 1] >= yc.cutoff).mean() == pytest.approx(yc.sensitivity)
    assert (s[y == 0] < yc.cutoff).mean() == pytest.approx(yc.specificity)


def test_youden_tie_goes_to_highest_cutoff() -> None:
    y = np.array([0, 0, 1, 0, 1, 1])
    s = np.array([1.0, 2.0, 3.0, 4.0, 5.0, 6.0])
    # cut 2.5: sens 1, spec 2/3 -> J 2/3 ; cut 4.5: sens 2/3, spec 1 -> J 2/3 ; the higher one wins
    assert youden_cutoff(y, s).cutoff == pytest.approx(4.5)


def test_point_metrics_match_sklearn() -> None:
    rng = np.random.default_rng(1)
    y = rng.integers(0, 2, 60)
    s = rng.random(60) + 0.3 * y
    tm = threshold_metrics(y, s, 0.6, n_boot=0)
    pred = (s >= 0.6).astype(int)
    tn, fp, fn, tp = confusion_matrix(y, pred).ravel()
    assert (tm.tp, tm.fp, tm.tn, tm.fn) == (tp, fp, tn, fn)
    assert tm.values["sensitivity"] == pytest.approx(tp / (tp + fn))
    assert tm.values["specificity"] == pytest.approx(tn / (tn + fp))
    assert tm.values["ppv"] == pytest.approx(tp / (tp + fp))
    assert tm.values["npv"] == pytest.approx(tn / (tn + fn))
    assert tm.values["accuracy"] == pytest.approx((tp + tn) / 60)
    assert tm.values["f1"] == pytest.approx(f1_score(y, pred))
    assert tm.ci == {}


def test_bootstrap_equals_explicit_loop() -> None:
    rng = np.random.default_rng(2)
    y = rng.integers(0, 2, 70)
    s = rng.random(70) + 0.4 * y
    tm = threshold_metrics(y, s, 0.7, n_boot=200, seed=11)
    # the same draws, replicate by replicate: cases first, then controls, from default_rng(seed)
    pos, neg = s[y == 1], s[y == 0]
    gen = np.random.default_rng(11)
    ip = gen.integers(0, pos.size, size=(200, pos.size))
    ineg = gen.integers(0, neg.size, size=(200, neg.size))
    sens = [np.mean(pos[ip[b]] >= 0.7) for b in range(200)]
    ppv = []
    for b in range(200):
        tp, fp = np.sum(pos[ip[b]] >= 0.7), np.sum(neg[ineg[b]] >= 0.7)
        ppv.append(tp / (tp + fp))
    np.testing.assert_allclose(tm.ci["sensitivity"], np.percentile(sens, [2.5, 97.5]), atol=1e-12)
    np.testing.assert_allclose(tm.ci["ppv"], np.percentile(ppv, [2.5, 97.5]), atol=1e-12)


def test_bootstrap_is_seeded_and_stratified() -> None:
    rng = np.random.default_rng(3)
    y = rng.integers(0, 2, 50)
    s = rng.random(50) + 0.5 * y
    a = threshold_metrics(y, s, 0.75, n_boot=300, seed=5)
    b = threshold_metrics(y, s, 0.75, n_boot=300, seed=5)
    c = threshold_metrics(y, s, 0.75, n_boot=300, seed=6)
    assert a.ci == b.ci and a.ci != c.ci
    # stratified: every replicate keeps all cases/controls, so sensitivity/specificity are always defined
    assert a.n_valid["sensitivity"] == a.n_valid["specificity"] == 300


def test_bootstrap_ci_covers_true_sensitivity() -> None:
    rng = np.random.default_rng(4)
    true_sens, hits, reps = 0.8, 0, 200
    for r in range(reps):
        y = np.r_[np.ones(60, int), np.zeros(60, int)]
        s = np.r_[rng.random(60) < true_sens, rng.random(60) < 0.3].astype(float)
        lo, hi = threshold_metrics(y, s, 0.5, n_boot=500, seed=r).ci["sensitivity"]
        hits += lo <= true_sens <= hi
    assert 0.88 <= hits / reps <= 0.99  # nominal 95% (percentile intervals undercover a little)


def test_undefined_metrics_are_nan_and_excluded() -> None:
    y = np.array([0, 1, 0, 1, 0, 1])
    s = np.array([0.1, 0.2, 0.3, 0.4, 0.5, 0.6])
    tm = threshold_metrics(y, s, 0.9, n_boot=50)  # nobody test-positive
    assert np.isnan(tm.values["ppv"]) and tm.n_valid["ppv"] == 0
    assert tm.values["specificity"] == 1.0
    m = confusion_metrics(0, 0, 3, 3)
    assert np.isnan(m["ppv"]) and m["npv"] == 0.5


def test_bad_input() -> None:
    with pytest.raises(InputError):
        threshold_metrics([0, 1, 0], [0.1, 0.2, np.nan], 0.5)
    with pytest.raises(InputError):
        threshold_metrics([1, 1, 1], [0.1, 0.2, 0.3], 0.5)
    with pytest.raises(InputError):
        youden_cutoff([0, 1, 3], [0.1, 0.2, 0.3])
