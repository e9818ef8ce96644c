"""DFSigM zoo: model choice, SignatureModel contract, exact linear heads, ONNX convertibility, no leakage."""

from __future__ import annotations

import time
import warnings

import numpy as np
import pytest
from scipy.special import logit
from sklearn.metrics import roc_auc_score
from sklearn.pipeline import Pipeline
from sklearn.preprocessing import StandardScaler

from core.errors import InputError
from training.models import (
    ZOO_NAMES,
    SignatureModel,
    compare_models,
    cv_select_and_classify,
    fit_signature_model,
    make_zoo,
)
from training.selection import build_selection_pipeline, fit_selection, selected_indices

FAST = {"cv_splits": 3, "cv_repeats": 1}


def cohort(n: int, p: int, informative: list[int], *, shift: float = 0.8, seed: int = 0):
    """Gaussian noise features with a known mean shift in the positive class on `informative` columns."""
    rng = np.random.default_rng(seed)
    y = rng.permutation(np.arange(n) % 2)
    X = rng.standard_normal((n, p))
    X[:, informative] += shift * y[:, None]
    return X, y


def test_zoo_has_the_required_candidates_as_scaled_pipelines():
    zoo = make_zoo()
    assert tuple(zoo) == ZOO_NAMES and len(zoo) >= 7
    for pipe, grid in zoo.values():
        assert isinstance(pipe[0], StandardScaler) and len(pipe.steps) == 2
        assert grid and all(k.startswith("clf__") for k in grid)
    with pytest.raises(InputError, match="unknown classifier"):
        make_zoo(["lr", "xgboost"])


def test_compare_models_picks_the_best_mean_cv_and_is_deterministic():
    X, y = cohort(120, 6, [0, 1, 2], shift=1.0, seed=1)
    cand = ["lr", "knn", "random_forest"]
    a = compare_models(X, y, candidates=cand, **FAST)
    b = compare_models(X, y, candidates=cand, **FAST)
    cols = ["model", "metric", "cv_mean", "cv_sd", "best_params", "fit_time_s", "selected"]
    assert set(cols) <= set(a.table.columns)
    assert a.table["cv_mean"].is_monotonic_decreasing
    assert a.best_name == a.table.iloc[0]["model"] == b.best_name
    assert a.table["selected"].sum() == 1
    assert a.table[["model", "cv_mean", "cv_sd", "best_params"]].equals(
        b.table[["model", "cv_mean", "cv_sd", "best_params"]]
    )
    search = a.searches[a.best_name]
    assert a.table.iloc[0]["cv_mean"] == pytest.approx(search.best_score_)
    assert search.best_estimator_.n_features_in_ == 6  # refitted on the whole training set


def test_prefer_linear_within_margin():
    X, y = cohort(120, 6, [0, 1, 2], shift=1.0, seed=1)
    res = compare_models(X, y, candidates=["knn", "lr"], prefer_linear_within=0.2, **FAST)
    assert res.best_name == "lr"


def test_nested_cv_removes_the_grid_maximum_optimism_on_noise():
    # On pure noise the flat score is the best of several grid points, hence above the nested outer score.
    X, y = cohort(90, 6, [], seed=3)
    cand, cv = ["knn", "rbf_svm"], {"cv_splits": 3, "cv_repeats": 2}
    flat = compare_models(X, y, candidates=cand, **cv).table.set_index("model")
    nested = compare_models(X, y, candidates=cand, nested=True, inner_splits=3, **cv).table.set_index("model")
    assert nested["nested"].all() and not flat["nested"].any()
    assert (nested.loc[cand, "cv_mean"] < flat.loc[cand, "cv_mean"]).all()


@pytest.mark.parametrize("name", ["lr", "linear_svm"])
@pytest.mark.parametrize("first_label", [0, 1])
def test_linear_coef_reproduces_predict_proba_exactly(name, first_label):
    X, y = cohort(100, 5, [0, 3], seed=3)
    i = int(np.flatnonzero(y == first_label)[0])  # label order in the data must not matter
    X[[0, i]], y[[0, i]] = X[[i, 0]], y[[i, 0]]
    pipe, _ = make_zoo([name])[name]
    model = SignatureModel(np.arange(5), list("abcde"), pipe.fit(X, y), name)
    assert model.is_linear and model.probability_link == "sigmoid"
    coef, intercept = model.linear_coef("scaled")
    expected = logit(model.predict_proba_selected(X))
    np.testing.assert_allclose(pipe[0].transform(X) @ coef + intercept, expected, atol=1e-9)
    raw, raw_intercept = model.linear_coef("raw")
    np.testing.assert_allclose(X @ raw + raw_intercept, expected, atol=1e-9)
    assert abs(coef[0]) > abs(coef[1]) and coef[0] > 0  # the planted column pushes towards label 1


@pytest.mark.parametrize("name", ["rbf_svm", "random_forest", "knn", "mlp", "gradient_boosting"])
def test_nonlinear_heads_say_so(name):
    X, y = cohort(60, 3, [0], seed=4)
    pipe, _ = make_zoo([name])[name]
    model = SignatureModel(np.arange(3), list("abc"), pipe.fit(X, y), name)
    assert not model.is_linear and model.probability_link is None
    with pytest.raises(TypeError, match="not a linear head"):
        model.linear_coef()


def test_signature_model_reads_the_right_columns_of_the_full_matrix():
    X_full, y = cohort(120, 40, [5, 17], shift=1.2, seed=5)
    model, result = fit_signature_model(
        X_full, y, [5, 17], ["deep_5", "deep_17"], candidates=["lr", "knn"], **FAST
    )
    assert model.model_name == result.best_name and model.n_input_features == 40
    p = model.predict_proba_full(X_full)
    np.testing.assert_allclose(p, model.pipeline.predict_proba(X_full[:, [5, 17]])[:, 1])
    assert p.shape == (120,) and roc_auc_score(y, p) > 0.75
    shuffled = X_full.copy()
    shuffled[:, [5, 17]] = X_full[:, [6, 18]]  # other columns carry no signal -> must not be read
    assert roc_auc_score(y, model.predict_proba_full(shuffled)) < 0.7
    with pytest.raises(InputError, match="40"):
        model.predict_proba_full(X_full[:, :39])
    with pytest.raises(InputError, match="labels must be 0/1"):
        fit_signature_model(X_full, y + 1, [5], candidates=["lr"], **FAST)


@pytest.mark.parametrize("name", ZOO_NAMES)
def test_every_zoo_member_converts_with_skl2onnx(name):
    import onnxruntime as ort
    from skl2onnx import convert_sklearn
    from skl2onnx.common.data_types import FloatTensorType

    X, y = cohort(115, 12, [0, 3, 7], seed=6)
    pipe, _ = make_zoo([name])[name]
    pipe.fit(X, y)
    onx = convert_sklearn(
        pipe, initial_types=[("x", FloatTensorType([None, 12]))], options={id(pipe[-1]): {"zipmap": False}}
    )
    session = ort.InferenceSession(onx.SerializeToString(), providers=["CPUExecutionProvider"])
    x_test = (1.5 * np.random.default_rng(7).standard_normal((200, 12))).astype(np.float32)
    proba = session.run(None, {"x": x_test})[1]
    np.testing.assert_allclose(proba, pipe.predict_proba(x_test), atol=1e-5)


# ----------------------------------------------------------------------------------------- leakage


def _select_zoo_validate(X_tr, y_tr, X_va, y_va, **zoo) -> float:
    """The study's chain: selection and zoo see ONLY the training cohort; AUC on the validation cohort."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # fallbacks are expected on permuted labels
        selection = fit_selection(X_tr, y_tr, {"max_features": 12})
    idx = selected_indices(selection, X_tr.shape[1])
    model, _ = fit_signature_model(X_tr, y_tr, idx, **zoo)
    return roc_auc_score(y_va, model.predict_proba_full(X_va))


def test_no_leakage_permuted_training_labels_give_chance_validation_auc():
    informative = [2, 40, 77, 123, 190]
    zoo = {"candidates": ["lr", "linear_svm", "random_forest", "knn"], **FAST}
    real, permuted = [], []
    for seed in range(5):
        X, y = cohort(220, 250, informative, shift=0.9, seed=seed)
        X_tr, y_tr, X_va, y_va = X[:120], y[:120], X[120:], y[120:]
        if seed < 2:
            real.append(_select_zoo_validate(X_tr, y_tr, X_va, y_va, **zoo))
        y_perm = np.random.default_rng(100 + seed).permutation(y_tr)
        permuted.append(_select_zoo_validate(X_tr, y_perm, X_va, y_va, **zoo))
    assert min(real) > 0.8, real
    assert abs(np.mean(permuted) - 0.5) < 0.1, permuted


@pytest.mark.slow
def test_whole_chain_inside_cv_is_honest_on_noise():
    X, y = cohort(100, 150, [], seed=9)
    scores = cv_select_and_classify(
        X, y, lambda: build_selection_pipeline({"max_features": 5}), "lr", cv_splits=4
    )
    assert abs(scores.mean() - 0.5) < 0.15


@pytest.mark.slow
def test_default_zoo_fits_143_by_12_within_a_minute():
    X, y = cohort(143, 12, [0, 2, 4, 6, 8, 10], shift=0.6, seed=8)
    start = time.perf_counter()
    result = compare_models(X, y, n_jobs=2)
    elapsed = time.perf_counter() - start
    assert len(result.table) == len(ZOO_NAMES) and result.table["n_fits"].min() >= 15
    assert elapsed < 60, f"default zoo took {elapsed:.1f}s"


def test_pipeline_type_is_what_export_expects_and_survives_joblib(tmp_path):
    import joblib

    X, y = cohort(60, 3, [0], seed=10)
    model, _ = fit_signature_model(X, y, [0, 1, 2], candidates=["lr"], **FAST)
    assert isinstance(model.pipeline, Pipeline) and isinstance(model.pipeline[0], StandardScaler)
    assert model.feature_names == ["f0", "f1", "f2"] and model.feature_indices.dtype == np.int64
    joblib.dump(model, tmp_path / "dfsig.joblib")
    loaded = joblib.load(tmp_path / "dfsig.joblib")
    np.testing.assert_array_equal(loaded.predict_proba_full(X), model.predict_proba_full(X))
