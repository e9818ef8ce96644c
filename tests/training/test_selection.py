"""Selection transformers: scikit-learn compliance, the ICC formulas, and that planted signal is found."""

from __future__ import annotations

import json
import warnings

import numpy as np
import pytest
from sklearn.base import clone
from sklearn.datasets import make_classification
from sklearn.utils.estimator_checks import parametrize_with_checks
from sklearn.utils.validation import check_array

from core.errors import InputError
from training.selection import (
    CorrelationFilter,
    ICCFilter,
    LassoSelector,
    MannWhitneySelector,
    build_selection_pipeline,
    fit_selection,
    icc,
    selected_indices,
    selection_summary,
)


class _ICCWithDerivedRepeat(ICCFilter):
    """Test harness only: scikit-learn's checks call fit(X, y) and have no slot for the repeat segmentation,
    so this subclass derives a deterministic 'repeat' (X plus fixed noise) from X. Validation of X itself
    still happens in ICCFilter.fit, so sparse/NaN/object-array checks exercise the real code."""

    def fit(self, X, y=None, X_repeat=None):
        try:
            Xa = check_array(X, dtype=np.float64)
        except (TypeError, ValueError):
            return super().fit(X, y, X_repeat=X)  # let ICCFilter raise its own validation error
        noise = np.random.default_rng(0).standard_normal(Xa.shape)
        return super().fit(X, y, X_repeat=Xa + 0.1 * noise)


@parametrize_with_checks(
    [MannWhitneySelector(), CorrelationFilter(), LassoSelector(cv=3, Cs=5), _ICCWithDerivedRepeat()]
)
def test_sklearn_compatible(estimator, check):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # fallbacks on the checks' tiny random data are expected
        check(estimator)


# --------------------------------------------------------------------------------------------- ICC

# Shrout & Fleiss (1979), Table 2: 6 targets rated by 4 judges. Published: ICC(1,1)=.17, ICC(2,1)=.29,
# ICC(3,1)=.71.
SHROUT_FLEISS = np.array(
    [[9, 2, 5, 8], [6, 1, 3, 2], [8, 4, 6, 8], [7, 1, 2, 6], [10, 5, 6, 9], [6, 2, 4, 7]], dtype=float
)


@pytest.mark.parametrize(("kind", "published"), [("ICC(1,1)", 0.17), ("ICC(2,1)", 0.29), ("ICC(3,1)", 0.71)])
def test_icc_matches_shrout_fleiss(kind, published):
    judges = [SHROUT_FLEISS[:, [j]] for j in range(4)]
    value = icc(*judges, kind=kind)
    assert value.shape == (1,)
    assert value[0] == pytest.approx(published, abs=0.005)


def test_icc_hand_computed_two_raters():
    # a = 1,3,5,7; b = 2.5,3.5,6.5,7.5. Grand mean 4.5; subject means 1.75,3.25,5.75,7.25 -> SSR = 2*18.25;
    # rater means 4, 5 -> SSC = 4*0.5 = 2; SST = 21 + 18 = 39 -> SSE = 0.5.
    a = np.array([[1.0], [3.0], [5.0], [7.0]])
    b = a + np.array([[1.5], [0.5], [1.5], [0.5]])
    msr, msc, mse, n, k = 36.5 / 3, 2.0 / 1, 0.5 / 3, 4, 2
    assert icc(a, b, kind="ICC(3,1)")[0] == pytest.approx((msr - mse) / (msr + (k - 1) * mse))
    assert icc(a, b, kind="ICC(2,1)")[0] == pytest.approx(
        (msr - mse) / (msr + (k - 1) * mse + k * (msc - mse) / n)
    )


def test_icc_filter_keeps_reproducible_features_and_routes_in_pipeline():
    rng = np.random.default_rng(1)
    X, y = make_classification(200, 30, n_informative=4, shuffle=False, random_state=0)
    repeat = X.copy()
    repeat[:, :10] += 0.05 * rng.standard_normal((200, 10))  # reproducible
    repeat[:, 10:] = rng.standard_normal((200, 20))  # not reproducible at all
    filt = ICCFilter(0.75).fit(X, y, X_repeat=repeat)
    assert filt.get_support().tolist() == [True] * 10 + [False] * 20
    pipe = fit_selection(X, y, X_repeat=repeat)
    assert pipe.steps[0][0] == "icc"
    assert set(selected_indices(pipe, 30)) <= set(range(10))
    with pytest.raises(ValueError, match="X_repeat"):
        ICCFilter().fit(X, y)


def test_icc_repeat_is_split_with_x_under_metadata_routing():
    import sklearn
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import cross_validate
    from sklearn.pipeline import Pipeline

    rng = np.random.default_rng(0)
    X = rng.standard_normal((120, 30))
    y = rng.permutation(np.arange(120) % 2)
    X[:, :5] += y[:, None]
    repeat = X + 0.1 * rng.standard_normal(X.shape)
    repeat[:, 20:] = rng.standard_normal((120, 10))
    with sklearn.config_context(enable_metadata_routing=True):
        chain = Pipeline([("sel", build_selection_pipeline(use_icc=True)), ("clf", LogisticRegression())])
        out = cross_validate(chain, X, y, params={"X_repeat": repeat}, cv=3, return_estimator=True)
    for fitted in out["estimator"]:
        icc_step = fitted[0][0]
        assert icc_step.get_support().tolist() == [True] * 20 + [False] * 10
        assert icc_step.n_features_in_ == 30
    assert out["test_score"].mean() > 0.75


# ----------------------------------------------------------------------------------------- the filters


def planted(n: int, p: int, informative: list[int], *, shift: float = 1.0, seed: int = 0):
    """Noise features plus a known mean shift in the positive class on the `informative` columns."""
    rng = np.random.default_rng(seed)
    y = rng.permutation(np.arange(n) % 2)
    X = rng.standard_normal((n, p))
    X[:, informative] += shift * y[:, None]
    return X, y


def test_mwu_matches_scipy_and_fdr():
    from scipy.stats import false_discovery_control, mannwhitneyu

    X, y = planted(80, 15, [0, 1, 2], shift=1.5, seed=2)
    sel = MannWhitneySelector(0.05, correction="fdr_bh").fit(X, y)
    expected = [mannwhitneyu(X[y == 1, j], X[y == 0, j]).pvalue for j in range(15)]
    np.testing.assert_allclose(sel.pvalues_, expected, rtol=1e-12)
    np.testing.assert_allclose(sel.pvalues_adjusted_, false_discovery_control(expected))
    assert sel.get_support().tolist() == (sel.pvalues_adjusted_ < 0.05).tolist()
    assert sel.get_support()[:3].all()


def test_mwu_fallback_warns_and_keeps_top_k():
    rng = np.random.default_rng(0)
    X = rng.standard_normal((40, 20))
    y = np.repeat([0, 1], 20)
    with pytest.warns(UserWarning, match="smallest p"):
        sel = MannWhitneySelector(1e-9, fallback_k=3).fit(X, y)
    assert sel.get_support().sum() == 3
    assert set(np.flatnonzero(sel.get_support())) == set(np.argsort(sel.pvalues_)[:3])
    assert sel.fallback_


def test_correlation_filter_keeps_the_more_relevant_of_a_redundant_pair():
    rng = np.random.default_rng(0)
    y = np.repeat([0, 1], 50)
    strong = y + 0.5 * rng.standard_normal(100)
    copy_weak = strong + 0.05 * rng.standard_normal(100)  # rho ~ 1 with `strong`, slightly less relevant
    other = rng.standard_normal(100)
    X = np.column_stack([copy_weak, other, strong])
    filt = CorrelationFilter(0.9).fit(X, y)
    keep = filt.get_support()
    assert keep[1]
    assert keep[0] != keep[2]
    assert keep[int(np.argmax(filt.relevance_[[0, 2]]) * 2)]
    assert CorrelationFilter(0.9).fit(X, y).get_support().tolist() == keep.tolist()  # deterministic


def test_lasso_walks_the_path_to_at_most_k():
    X, y = make_classification(150, 40, n_informative=20, n_redundant=0, shuffle=False, random_state=3)
    X = (X - X.mean(0)) / X.std(0)
    sel = LassoSelector(max_features=5, Cs=30).fit(X, y)
    assert 1 <= sel.get_support().sum() <= 5
    path = sel.path_
    i = path["Cs"].index(sel.C_)
    assert path["n_nonzero"][i] == sel.get_support().sum()  # a fitted point on the path, not a truncation
    assert sel.C_cv_ >= sel.C_
    assert path["n_nonzero"][path["Cs"].index(sel.C_cv_)] > 5  # so this data does exercise the walk
    assert sel.path_note_ and sel.fallback_ is None  # the designed walk is not a fallback
    np.testing.assert_array_equal(np.asarray(path["coefs"])[i] != 0, sel.get_support())


def test_lasso_noise_never_returns_zero_features():
    rng = np.random.default_rng(5)
    X = rng.standard_normal((100, 30))
    y = rng.permutation(np.repeat([0, 1], 50))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        sel = LassoSelector().fit(X, y)
    assert sel.get_support().sum() >= 1


# --------------------------------------------------------------------------------------- the pipeline


def test_pipeline_finds_planted_features_and_keeps_at_most_12():
    # 6 planted columns scattered among 300 noise columns, plus one near-copy of a planted column that the
    # redundancy filter must drop. (make_classification's informative columns are not each marginally
    # informative, so a known mean shift is the cleaner ground truth for a univariate-first chain.)
    informative = [3, 50, 101, 150, 222, 299]
    X, y = planted(160, 300, informative, shift=0.9, seed=4)
    X = np.column_stack([X, X[:, 50] + 0.01 * np.random.default_rng(0).standard_normal(160)])
    pipe = fit_selection(X, y, {"max_features": 12})
    idx = selected_indices(pipe, X.shape[1])
    assert 1 <= idx.size <= 12
    found = {50 if i == 300 else i for i in idx.tolist()} & set(informative)  # 300 is a copy of 50
    assert len(found) >= 5, f"only found {found} of the planted features; selected {idx.tolist()}"
    assert not {50, 300} <= set(idx.tolist())
    assert pipe.transform(X).shape == (160, idx.size)
    summary = selection_summary(pipe)
    json.dumps(summary)  # JSON-ready
    assert [s["step"] for s in summary["steps"]] == ["scale", "mwu", "corr", "lasso"]
    assert summary["final"]["indices"] == idx.tolist()
    path = summary["lasso"]["path"]
    assert len(path["input_indices"]) == len(path["coefs"][0]) == summary["steps"][-2]["n_kept"]
    assert set(idx.tolist()) <= set(path["input_indices"])
    assert summary["steps"][-1]["n_kept"] == idx.size
    n_kept = [s["n_kept"] for s in summary["steps"]]
    assert n_kept == sorted(n_kept, reverse=True)


def test_pipeline_is_fitted_only_on_what_it_is_given():
    X, y = make_classification(120, 60, n_informative=5, shuffle=False, random_state=6)
    pipe = build_selection_pipeline()
    fitted_a = clone(pipe).fit(X[:80], y[:80])
    X_b = X.copy()
    X_b[80:] = 1e6  # changing rows outside the fit set cannot change the selection
    fitted_b = clone(pipe).fit(X_b[:80], y[:80])
    np.testing.assert_array_equal(selected_indices(fitted_a, 60), selected_indices(fitted_b, 60))


def test_config_errors_name_the_field():
    with pytest.raises(InputError, match="unknown selection option"):
        build_selection_pipeline({"max_featurez": 3})
