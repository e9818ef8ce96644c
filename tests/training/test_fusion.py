"""Fusion model: matches statsmodels on logit(score) + clinical, strict score handling, nomogram sums."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import statsmodels.api as sm
from scipy.special import expit, logit

from core.errors import InputError
from training.clinical import fit_clinical
from training.fusion import fit_fusion, nomogram


def simulate(n: int = 400, seed: int = 0) -> tuple[pd.DataFrame, np.ndarray]:
    """The DL score carries most of the signal (log-OR 1.0 per logit unit), age adds a little, sex nothing."""
    rng = np.random.default_rng(seed)
    latent = rng.normal(0, 1.5, n)
    age = rng.normal(60, 10, n)
    sex = np.where(rng.random(n) < 0.45, "M", "F")
    y = (rng.random(n) < expit(-0.2 + 1.0 * latent + 0.04 * (age - 60))).astype(int)
    df = pd.DataFrame({"score_dfsig": expit(latent), "age": age, "sex": sex})
    return df, y


def test_fusion_matches_statsmodels_on_logit_score_plus_clinical():
    df, y = simulate()
    res = fit_fusion(df, y, clinical_predictors=["age", "sex"])
    exog = sm.add_constant(
        pd.DataFrame({"s": logit(df["score_dfsig"]), "age": df["age"], "m": (df["sex"] == "M") * 1.0})
    )
    direct = sm.Logit(y, exog).fit(disp=0)
    table = res.table.set_index("term")
    assert table.loc["DL score", "OR"] == pytest.approx(np.exp(direct.params["s"]), rel=1e-7)
    assert table.loc["age", "p"] == pytest.approx(direct.pvalues["age"], rel=1e-6)
    assert table.loc["sex: M vs F", "OR"] == pytest.approx(np.exp(direct.params["m"]), rel=1e-7)
    assert table.loc["DL score", "ci_low"] > 1.5 and table.loc["age", "OR"] > 1  # simulated directions
    np.testing.assert_allclose(res.model.predict_proba(df), direct.predict(), rtol=1e-7)


def test_identity_transform_and_clipping():
    df, y = simulate(300, seed=1)
    ident = fit_fusion(df, y, clinical_predictors=["age"], score_transform="identity")
    direct = sm.Logit(y, sm.add_constant(df[["score_dfsig", "age"]])).fit(disp=0)
    assert ident.table.set_index("term").loc["DL score", "coef"] == pytest.approx(
        direct.params["score_dfsig"]
    )
    res = fit_fusion(df, y, clinical_predictors=["age"])
    edge = df.head(2).assign(score_dfsig=[0.0, 1.0])
    p = res.model.predict_proba(edge)
    assert np.all(np.isfinite(p)) and p[0] < 0.01 and p[1] > 0.99


def test_score_is_never_imputed_and_clinical_gaps_are():
    df, y = simulate(300, seed=2)
    df.loc[::9, "age"] = np.nan
    res = fit_fusion(df, y, clinical_predictors=["age", "sex"])
    assert res.model.design.fill["age"] == pytest.approx(np.nanmedian(df["age"]))
    assert np.isfinite(res.model.predict_proba(df)).all()
    with pytest.raises(InputError) as info:
        res.model.predict_proba(
            df.assign(score_dfsig=np.where(np.arange(len(df)) == 3, np.nan, df["score_dfsig"]))
        )
    assert info.value.field == "score_dfsig"
    with pytest.raises(InputError, match=r"\[0, 1\]"):
        res.model.predict_proba(df.assign(score_dfsig=df["score_dfsig"] + 1))
    with pytest.raises(InputError, match="missing"):
        res.model.predict_proba(df.drop(columns="score_dfsig"))


def _points_from_table(nomo, row: pd.Series, model) -> float:
    """Read each variable's points off the nomogram the way a reader would (interpolate / look up)."""
    total = 0.0
    for var in nomo.variables:
        name = var["name"]
        x = float(logit(row["score_dfsig"])) if name == model.score_term else row[name]
        if var["kind"] == "continuous":
            total += float(np.interp(x, var["values"], var["points"]))
        else:
            total += var["points"][var["labels"].index(str(x))]
    return total


def test_nomogram_points_reproduce_the_model_probability():
    df, y = simulate(400, seed=3)
    res = fit_fusion(df, y, clinical_predictors=["age", "sex"])
    nomo = nomogram(res.model)
    assert max(max(v["points"]) for v in nomo.variables) == pytest.approx(100.0)
    assert all(min(v["points"]) == 0 for v in nomo.variables)
    rows = df.iloc[:25]
    totals = np.array([_points_from_table(nomo, r, res.model) for _, r in rows.iterrows()])
    np.testing.assert_allclose(nomo.probability(totals), res.model.predict_proba(rows), rtol=1e-9, atol=1e-12)
    scale = nomo.to_dict()
    assert scale["probability"] == sorted(scale["probability"])  # positive slope on the total-points axis


def test_fitted_models_survive_joblib(tmp_path):
    import joblib

    df, y = simulate(200, seed=6)
    models = {
        "clinical": fit_clinical(df[["age", "sex"]], y, p_enter=1.0, p_keep=1.0).model,
        "fusion": fit_fusion(df, y, clinical_predictors=["age", "sex"]).model,
    }
    for name, model in models.items():
        joblib.dump(model, tmp_path / f"{name}.joblib")
        loaded = joblib.load(tmp_path / f"{name}.joblib")
        np.testing.assert_array_equal(loaded.predict_proba(df), model.predict_proba(df))


def test_nomogram_for_the_clinical_model():
    df, y = simulate(400, seed=4)
    clin = fit_clinical(df[["age", "sex"]], y, p_enter=1.0, p_keep=1.0)
    nomo = nomogram(clin.model)
    assert [v["name"] for v in nomo.variables] == clin.predictors
    assert max(max(v["points"]) for v in nomo.variables) == pytest.approx(100.0)


def test_oof_scores_feed_fusion():
    from training.models import fit_signature_model, out_of_fold_scores

    rng = np.random.default_rng(5)
    y = rng.permutation(np.arange(120) % 2)
    X = rng.standard_normal((120, 10))
    X[:, [1, 4]] += 1.0 * y[:, None]
    model, _ = fit_signature_model(X, y, [1, 4], candidates=["lr"], cv_splits=3, cv_repeats=1)
    oof = out_of_fold_scores(model, X, y)
    in_sample = model.predict_proba_full(X)
    assert oof.shape == (120,) and not np.allclose(oof, in_sample)
    df = pd.DataFrame({"score_dfsig": oof, "age": rng.normal(60, 10, 120)})
    res = fit_fusion(df, y, clinical_predictors=["age"])
    assert res.table.set_index("term").loc["DL score", "OR"] > 1
