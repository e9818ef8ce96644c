"""Clinical model: ORs against statsmodels, known effect directions, missing values and unseen levels."""

from __future__ import annotations

import warnings

import numpy as np
import pandas as pd
import pytest
import statsmodels.api as sm
from scipy.special import expit

from core.errors import InputError
from training.clinical import TabularDesign, fit_clinical


def simulate(n: int = 400, seed: int = 0) -> tuple[pd.DataFrame, np.ndarray]:
    """Known truth: age (+0.06/yr) and male sex (log-OR +1.2) raise the odds; smoking and noise do nothing."""
    rng = np.random.default_rng(seed)
    age = rng.normal(62, 9, n)
    sex = np.where(rng.random(n) < 0.4, "M", "F")  # F is the most frequent -> reference
    smoking = rng.choice(["never", "former", "current"], n, p=[0.5, 0.3, 0.2])
    noise = rng.normal(0, 1, n)
    lp = -0.4 + 0.06 * (age - 62) + 1.2 * (sex == "M")
    y = (rng.random(n) < expit(lp)).astype(int)
    return pd.DataFrame({"age": age, "sex": sex, "smoking": smoking, "noise": noise}), y


def test_univariable_ors_match_statsmodels_and_known_directions():
    df, y = simulate()
    res = fit_clinical(df, y, p_enter=0.05)
    uni = res.univariable.set_index("term")

    direct = sm.Logit(y, sm.add_constant(df[["age"]])).fit(disp=0)
    assert uni.loc["age", "OR"] == pytest.approx(np.exp(direct.params["age"]), rel=1e-8)
    lo, hi = np.exp(direct.conf_int().loc["age"])
    assert (uni.loc["age", "ci_low"], uni.loc["age", "ci_high"]) == pytest.approx((lo, hi), rel=1e-6)
    assert uni.loc["age", "p"] == pytest.approx(direct.pvalues["age"], rel=1e-6)

    male = (df["sex"] == "M").astype(float).rename("male")
    direct_sex = sm.Logit(y, sm.add_constant(male)).fit(disp=0)
    assert uni.loc["sex: M vs F", "OR"] == pytest.approx(np.exp(direct_sex.params["male"]), rel=1e-8)
    assert uni.loc["age", "OR"] > 1 and uni.loc["sex: M vs F", "ci_low"] > 1  # the simulated directions

    # multi-level categorical: one row per non-reference level, variable p = likelihood-ratio test
    assert {"smoking: current vs never", "smoking: former vs never"} <= set(uni.index)
    dummies = pd.get_dummies(df["smoking"])[["current", "former"]].astype(float)
    lr = sm.Logit(y, sm.add_constant(dummies)).fit(disp=0)
    assert uni.loc["smoking: current vs never", "p_variable"] == pytest.approx(lr.llr_pvalue, rel=1e-6)


def test_entry_and_independent_predictors():
    df, y = simulate(600, seed=1)
    res = fit_clinical(df, y)
    assert {"age", "sex"} <= set(res.entered)
    assert "noise" not in res.predictors and set(res.predictors) == {"age", "sex"}
    assert set(res.final["variable"]) == {"age", "sex"}
    assert (res.final["p"] < 0.05).all()
    p = res.model.predict_proba(df)
    assert p.shape == (600,) and ((p > 0) & (p < 1)).all()
    direct = sm.Logit(
        y, sm.add_constant(pd.DataFrame({"age": df["age"], "m": (df["sex"] == "M") * 1.0}))
    ).fit(disp=0)
    np.testing.assert_allclose(p, direct.predict(), rtol=1e-7)


def test_backward_elimination_drops_a_redundant_proxy():
    df, y = simulate(500, seed=2)
    rng = np.random.default_rng(3)
    df["age_proxy"] = df["age"] + rng.normal(0, 4, len(df))  # univariably significant only through age
    res = fit_clinical(df, y, variables=["age", "age_proxy", "sex"])
    assert "age_proxy" in res.entered
    assert "age_proxy" not in res.predictors and "age" in res.predictors
    assert res.steps and res.steps[0]["removed"] == "age_proxy"
    one_step = fit_clinical(df, y, variables=["age", "age_proxy", "sex"], selection="p")
    assert "age_proxy" not in one_step.predictors


def test_missing_values_use_training_statistics_only():
    df, y = simulate(300, seed=4)
    df.loc[::7, "age"] = np.nan
    df.loc[::11, "sex"] = None
    res = fit_clinical(df, y, variables=["age", "sex"], p_enter=0.5, p_keep=0.5)
    design = res.model.design
    assert design.fill["age"] == pytest.approx(np.nanmedian(df["age"]))
    assert design.fill["sex"] == "F"
    valid = pd.DataFrame({"age": [np.nan, 90.0, 50.0], "sex": [None, "M", "F"]})
    filled = valid.fillna({"age": design.fill["age"], "sex": "F"})
    np.testing.assert_allclose(res.model.predict_proba(valid), res.model.predict_proba(filled))
    shifted = valid.assign(age=[np.nan, 200.0, 300.0])  # a validation cohort cannot move the training median
    assert res.model.predict_proba(shifted)[0] == pytest.approx(res.model.predict_proba(valid)[0])


def test_missing_indicator_option():
    df, y = simulate(300, seed=5)
    df.loc[::5, "age"] = np.nan
    res = fit_clinical(df, y, variables=["age", "sex"], missing_indicator=True, p_enter=1.0, p_keep=1.0)
    assert "age__missing" in res.model.design.columns
    assert "age: missing" in set(res.final["term"])


def test_unseen_category_is_treated_as_missing_with_a_warning():
    df, y = simulate(300, seed=6)
    res = fit_clinical(df, y, variables=["age", "smoking"], p_enter=1.0, p_keep=1.0)
    mode = res.model.design.fill["smoking"]
    valid = pd.DataFrame({"age": [60.0, 70.0], "smoking": ["vaping", "former"]})
    with pytest.warns(UserWarning, match="unseen in training"):
        p = res.model.predict_proba(valid)
    expected = res.model.predict_proba(valid.assign(smoking=[mode, "former"]))
    np.testing.assert_allclose(p, expected)


def test_bad_input_names_the_field():
    df, y = simulate(200, seed=7)
    res = fit_clinical(df, y, variables=["age", "sex"], p_enter=1.0, p_keep=1.0)
    with pytest.raises(InputError) as info:
        res.model.predict_proba(df.drop(columns="sex"))
    assert info.value.field == "sex"
    with pytest.raises(InputError, match="non-numeric"):
        res.model.predict_proba(df.assign(age="old"))
    with pytest.raises(InputError, match="labels"):
        fit_clinical(df, np.zeros(len(df)))


def test_nothing_passes_entry_warns_and_takes_the_best():
    rng = np.random.default_rng(8)
    df = pd.DataFrame({"a": rng.normal(size=150), "b": rng.normal(size=150)})
    y = rng.permutation(np.arange(150) % 2)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        res = fit_clinical(df, y, p_enter=1e-6)
    best = res.univariable.sort_values("p_variable").iloc[0]["variable"]
    assert res.entered == [best] and res.predictors == [best]
    assert any("enters" in str(w.message) for w in caught)
    assert res.notes


def test_design_levels_ints_and_strings_agree():
    df = pd.DataFrame({"stage": [1, 2, 2, 3, 2], "x": [1.0, 2.0, 3.0, 4.0, 5.0]})
    design = TabularDesign.fit(df, ["stage"], categorical=["stage"])
    assert design.levels["stage"] == ["2", "1", "3"]
    X = design.transform(pd.DataFrame({"stage": [1.0, 3.0, 2.0]}))
    assert X.to_numpy().tolist() == [[1.0, 0.0], [0.0, 1.0], [0.0, 0.0]]
