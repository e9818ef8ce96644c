"""The clinical model: univariable logistic screen -> multivariable model -> independent predictors.

Inference is statsmodels' ``Logit`` (maximum likelihood, Wald CIs). Rules, all fitted on the TRAINING cohort
only and stored in the fitted objects so validation cohorts get exactly the same treatment:

* Variable types: numeric columns are continuous (OR per unit; a 0/1 column is therefore "1 vs 0"); text,
  bool and pandas categoricals, plus any name listed in ``categorical``, are categorical, one-hot encoded
  against a reference level = the most frequent training level (ties: first in sorted order). A stable,
  well-populated reference gives the narrowest CIs.
* Missing values: continuous -> training median, categorical -> training mode; optionally a 0/1 "missing"
  indicator per variable that had missing training values. Univariable and multivariable fits use the
  imputed training data, i.e. the same design the final model applies to new patients.
* Unseen categories (a level absent from training) cannot get a coefficient: they are treated as missing
  (-> the training mode), counted, logged and warned about, never a crash.
* p-values: per term the Wald p; per variable the Wald p for one-term variables and the likelihood-ratio
  test (model with vs without all the variable's terms) for multi-level categoricals.
* Entry: variables with univariable p < ``p_enter``; if none, the single best one enters with a warning.
* Independent predictors: ``selection="backward"`` (default) removes the variable with the largest
  multivariable p >= ``p_keep`` and refits until all remaining p < ``p_keep``; ``selection="p"`` keeps those
  with p < ``p_keep`` in the one multivariable model. If nothing survives, the best univariable variable is
  kept with a warning. The clinical model is the refit on the predictors.
"""

from __future__ import annotations

import logging
import warnings
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd
import statsmodels.api as sm
from scipy import stats
from scipy.special import expit

from core.errors import InputError

logger = logging.getLogger(__name__)

CONST = "const"


def _warn(message: str) -> None:
    logger.warning(message)
    warnings.warn(message, UserWarning, stacklevel=3)


# ------------------------------------------------------------------------------------------- design


@dataclass
class TabularDesign:
    """Imputation + encoding learned on the training cohort; ``transform`` applies it to any cohort."""

    variables: list[str]
    kinds: dict[str, str]
    fill: dict[str, Any]
    levels: dict[str, list[str]]
    ranges: dict[str, tuple[float, float]]
    indicators: list[str]
    columns: list[str]
    column_variable: dict[str, str]

    @classmethod
    def fit(
        cls,
        df: pd.DataFrame,
        variables: list[str],
        *,
        categorical: list[str] | tuple[str, ...] = (),
        missing_indicator: bool = False,
        source: str | None = None,
    ) -> TabularDesign:
        kinds, fill, levels, ranges, indicators = {}, {}, {}, {}, []
        for var in variables:
            if var not in df.columns:
                raise InputError("column not found in the clinical table", source=source, field=var)
            col = df[var]
            numeric = pd.api.types.is_numeric_dtype(col) and not pd.api.types.is_bool_dtype(col)
            if numeric and var not in categorical:
                values = col.astype(float)
                if values.notna().sum() == 0:
                    raise InputError(
                        "all values are missing in the training cohort", source=source, field=var
                    )
                kinds[var], fill[var] = "continuous", float(values.median())
                ranges[var] = (float(values.min()), float(values.max()))
            else:
                text = _as_text(col)
                counts = text.value_counts(dropna=True)
                if counts.empty:
                    raise InputError(
                        "all values are missing in the training cohort", source=source, field=var
                    )
                # most frequent first (ties: sorted order) -> that is the reference level and the fill value
                order = sorted(counts.index, key=lambda lv: (-counts[lv], lv))
                kinds[var], fill[var] = "categorical", order[0]
                levels[var] = [order[0], *sorted(order[1:])]
            if missing_indicator and col.isna().any():
                indicators.append(var)
        design = cls(variables, kinds, fill, levels, ranges, indicators, [], {})
        for var in variables:
            for name in design._variable_columns(var):
                design.columns.append(name)
                design.column_variable[name] = var
        return design

    def _variable_columns(self, var: str) -> list[str]:
        if self.kinds[var] == "continuous":
            cols = [var]
        else:
            cols = [f"{var}[{lv}]" for lv in self.levels[var][1:]]
        return cols + ([f"{var}__missing"] if var in self.indicators else [])

    def columns_of(self, variables: list[str]) -> list[str]:
        """Design columns of the given variables, in design order."""
        return [c for c in self.columns if self.column_variable[c] in variables]

    def transform(self, df: pd.DataFrame, *, source: str | None = None) -> pd.DataFrame:
        """Imputed, encoded design matrix (no constant) with one column per term."""
        out: dict[str, np.ndarray] = {}
        for var in self.variables:
            if var not in df.columns:
                raise InputError("column missing (the model was fitted with it)", source=source, field=var)
            col = df[var]
            missing = col.isna().to_numpy()
            if self.kinds[var] == "continuous":
                values = pd.to_numeric(col, errors="coerce")
                bad = values.isna().to_numpy() & ~missing
                if bad.any():
                    example = col[bad].iloc[0]
                    raise InputError(
                        f"non-numeric value {example!r} in a numeric variable", source=source, field=var
                    )
                out[var] = values.fillna(self.fill[var]).to_numpy(dtype=float)
            else:
                text = _as_text(col)
                unseen = text.notna() & ~text.isin(self.levels[var])
                if unseen.any():
                    new = sorted(set(text[unseen]))
                    _warn(
                        f"clinical variable {var!r}: {int(unseen.sum())} value(s) with level(s) {new} unseen "
                        f"in training; treated as missing (-> {self.fill[var]!r})"
                    )
                text = text.where(~unseen, None).fillna(self.fill[var])
                for lv in self.levels[var][1:]:
                    out[f"{var}[{lv}]"] = (text == lv).to_numpy(dtype=float)
            if var in self.indicators:
                out[f"{var}__missing"] = missing.astype(float)
        return pd.DataFrame(out, index=df.index)[self.columns]

    def term_label(self, column: str) -> str:
        """Readable term: 'age', 'sex: M vs F', 'smoking: missing'."""
        var = self.column_variable[column]
        if column == var:
            return var
        if column == f"{var}__missing":
            return f"{var}: missing"
        level = column[len(var) + 1 : -1]
        return f"{var}: {level} vs {self.levels[var][0]}"

    def subset(self, variables: list[str]) -> TabularDesign:
        """The same fitted rules restricted to `variables` (a model needs only its own columns at predict)."""
        keep = [v for v in self.variables if v in variables]
        columns = self.columns_of(keep)
        return TabularDesign(
            keep,
            {v: self.kinds[v] for v in keep},
            {v: self.fill[v] for v in keep},
            {v: self.levels[v] for v in keep if v in self.levels},
            {v: self.ranges[v] for v in keep if v in self.ranges},
            [v for v in self.indicators if v in keep],
            columns,
            {c: self.column_variable[c] for c in columns},
        )


def _as_text(col: pd.Series) -> pd.Series:
    """Categorical values as strings ('1', 'M', 'True'); NaN stays missing; 1 and 1.0 both become '1'."""

    def one(v: Any) -> Any:
        if v is None or (isinstance(v, float) and np.isnan(v)) or v is pd.NA:
            return None
        if isinstance(v, float | np.floating) and float(v).is_integer():
            return str(int(v))
        return str(v).strip()

    return col.astype(object).map(one)


# ------------------------------------------------------------------------------------ logistic fits


@dataclass
class _Fit:
    params: pd.Series
    cov: pd.DataFrame
    pvalues: pd.Series
    llf: float
    llnull: float
    note: str


def _logit(y: np.ndarray, X: pd.DataFrame) -> _Fit:
    """statsmodels Logit with a constant; separation and non-convergence are noted, not hidden."""
    exog = sm.add_constant(X, has_constant="add")
    notes = []
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            res = sm.Logit(y, exog).fit(disp=0, method="newton", maxiter=200)
        except np.linalg.LinAlgError as exc:
            raise ValueError(f"singular design ({', '.join(X.columns)}): {exc}") from exc
    for w in caught:
        name = type(w.message).__name__
        if "Separation" in name:
            notes.append("perfect/quasi separation: ORs and CIs unreliable")
        elif "Convergence" in name or "HessianInversion" in name:
            notes.append(f"fit warning: {w.message}")
    if not res.mle_retvals.get("converged", True):
        notes.append("did not converge")
    note = "; ".join(dict.fromkeys(notes))
    if note:
        logger.warning("logistic fit on %s: %s", list(X.columns), note)
    return _Fit(res.params, res.cov_params(), res.pvalues, float(res.llf), float(res.llnull), note)


def _lr_pvalue(llf_full: float, llf_reduced: float, df: int) -> float:
    return float(stats.chi2.sf(max(2.0 * (llf_full - llf_reduced), 0.0), df))


def _variable_pvalues(
    y: np.ndarray, X: pd.DataFrame, fit: _Fit, design: TabularDesign, variables: list[str]
) -> dict:
    """Wald p for one-term variables, LR test (drop all the variable's terms, refit) for multi-term ones."""
    out = {}
    for var in variables:
        cols = design.columns_of([var])
        if len(cols) == 1:
            out[var] = float(fit.pvalues[cols[0]])
            continue
        rest = [c for c in X.columns if c not in cols]
        reduced = _logit(y, X[rest]).llf if rest else fit.llnull
        out[var] = _lr_pvalue(fit.llf, reduced, len(cols))
    return out


def _term_rows(fit: _Fit, design: TabularDesign, var_p: dict, n: int) -> list[dict]:
    z = stats.norm.ppf(0.975)
    rows = []
    for col in fit.params.index.drop(CONST):
        beta, se = float(fit.params[col]), float(np.sqrt(fit.cov.loc[col, col]))
        var = design.column_variable[col]
        rows.append(
            {
                "variable": var,
                "term": design.term_label(col),
                "column": col,
                "kind": design.kinds[var],
                "coef": beta,
                "se": se,
                "OR": float(np.exp(beta)),
                "ci_low": float(np.exp(beta - z * se)),
                "ci_high": float(np.exp(beta + z * se)),
                "p": float(fit.pvalues[col]),
                "p_variable": var_p.get(var, np.nan),
                "n": n,
                "note": fit.note,
            }
        )
    return rows


# ----------------------------------------------------------------------------------------- the model


@dataclass
class LogisticModel:
    """A fitted logistic model over a TabularDesign: coefficients, covariance, prediction on any cohort."""

    design: TabularDesign
    params: pd.Series
    cov: pd.DataFrame
    predictors: list[str]
    n_train: int
    notes: list[str] = field(default_factory=list)

    def _prepare(self, df: pd.DataFrame, source: str | None) -> pd.DataFrame:
        return df

    def design_matrix(self, df: pd.DataFrame, *, source: str | None = None) -> pd.DataFrame:
        X = self.design.transform(self._prepare(df, source), source=source)
        return X[self.design.columns_of(self.predictors)]

    def linear_predictor(self, df: pd.DataFrame, *, source: str | None = None) -> np.ndarray:
        X = self.design_matrix(df, source=source)
        return float(self.params[CONST]) + X.to_numpy() @ self.params[X.columns].to_numpy()

    def predict_proba(self, df: pd.DataFrame, *, source: str | None = None) -> np.ndarray:
        """P(label 1) per row, shape [N]."""
        return expit(self.linear_predictor(df, source=source))

    def table(self) -> pd.DataFrame:
        """ORs with Wald 95% CIs and p of the fitted model (one row per term, intercept excluded)."""
        p = pd.Series(
            2 * stats.norm.sf(np.abs(self.params / np.sqrt(np.diag(self.cov)))), index=self.params.index
        )
        fit = _Fit(self.params, self.cov, p, np.nan, np.nan, "; ".join(self.notes))
        return pd.DataFrame(_term_rows(fit, self.design, {}, self.n_train)).drop(columns="p_variable")


class ClinicalModel(LogisticModel):
    """The clinical model (independent clinical predictors); ``predict_proba(df) -> [N]``."""


@dataclass
class ClinicalResult:
    univariable: pd.DataFrame
    multivariable: pd.DataFrame
    final: pd.DataFrame
    model: ClinicalModel
    entered: list[str]
    predictors: list[str]
    steps: list[dict]
    notes: list[str]


def _check_y(y: Any, n: int) -> np.ndarray:
    y = np.asarray(y)
    if y.shape != (n,):
        raise InputError(f"{y.shape[0] if y.ndim else 0} labels for {n} patients", field="label")
    if set(np.unique(y).tolist()) != {0, 1}:
        raise InputError(f"labels must be 0/1 with both present, got {np.unique(y).tolist()}", field="label")
    return y.astype(float)


def fit_clinical(
    df: pd.DataFrame,
    y: Any,
    config: Any = None,
    *,
    variables: list[str] | None = None,
    categorical: list[str] | tuple[str, ...] = (),
    p_enter: float | None = None,
    p_keep: float | None = None,
    selection: str = "backward",
    missing_indicator: bool = False,
    source: str | None = None,
) -> ClinicalResult:
    """Screen ``variables`` of the TRAINING cohort ``df`` against ``y`` and fit the clinical model.

    ``config`` may be a `training.config.ClinicalConfig` (variables, p_enter, p_keep); keyword arguments win.
    """
    variables = variables or getattr(config, "variables", None) or list(df.columns)
    p_enter = p_enter if p_enter is not None else getattr(config, "p_enter", 0.05)
    p_keep = p_keep if p_keep is not None else getattr(config, "p_keep", 0.05)
    if selection not in ("backward", "p"):
        raise InputError(
            f"selection must be 'backward' or 'p', got {selection!r}", field="clinical.selection"
        )
    df = df.reset_index(drop=True)
    y = _check_y(y, len(df))
    design = TabularDesign.fit(
        df, list(variables), categorical=categorical, missing_indicator=missing_indicator, source=source
    )
    X = design.transform(df, source=source)
    notes: list[str] = []

    uni_rows, uni_p = [], {}
    for var in design.variables:
        cols = design.columns_of([var])
        if not cols or X[cols].nunique().max() < 2:
            notes.append(f"{var}: constant in the training cohort, not analysed")
            uni_p[var] = np.nan
            continue
        try:
            fit = _logit(y, X[cols])
        except ValueError as exc:
            notes.append(f"{var}: {exc}")
            uni_p[var] = np.nan
            continue
        uni_p[var] = (
            float(fit.pvalues[cols[0]]) if len(cols) == 1 else _lr_pvalue(fit.llf, fit.llnull, len(cols))
        )
        uni_rows += _term_rows(fit, design, {var: uni_p[var]}, len(y))
    univariable = pd.DataFrame(uni_rows)

    ranked = sorted((p, i, v) for i, (v, p) in enumerate(uni_p.items()) if np.isfinite(p))
    if not ranked:
        raise InputError("no clinical variable could be analysed (all constant or singular)", source=source)
    entered = [v for v in design.variables if np.isfinite(uni_p[v]) and uni_p[v] < p_enter]
    if not entered:
        entered = [ranked[0][2]]
        msg = f"no clinical variable had univariable p < {p_enter}; the best one ({entered[0]}) enters"
        notes.append(msg)
        _warn(msg)

    full = _logit(y, X[design.columns_of(entered)])
    full_p = _variable_pvalues(y, X[design.columns_of(entered)], full, design, entered)
    multivariable = pd.DataFrame(_term_rows(full, design, full_p, len(y)))

    steps: list[dict] = []
    if selection == "p":
        predictors = [v for v in entered if full_p[v] < p_keep]
    else:
        predictors, current_p = list(entered), full_p
        while predictors:
            worst = max(predictors, key=lambda v: (current_p[v], predictors.index(v)))
            if current_p[worst] < p_keep:
                break
            steps.append(
                {"removed": worst, "p": current_p[worst], "remaining": [v for v in predictors if v != worst]}
            )
            predictors.remove(worst)
            if predictors:
                fit = _logit(y, X[design.columns_of(predictors)])
                current_p = _variable_pvalues(y, X[design.columns_of(predictors)], fit, design, predictors)
    if not predictors:
        predictors = [ranked[0][2]]
        msg = f"no variable kept multivariable p < {p_keep}; using the best univariable ({predictors[0]})"
        notes.append(msg)
        _warn(msg)

    final_fit = _logit(y, X[design.columns_of(predictors)])
    model = ClinicalModel(
        design.subset(predictors),
        final_fit.params,
        final_fit.cov,
        predictors,
        len(y),
        [final_fit.note] * bool(final_fit.note),
    )
    final_p = _variable_pvalues(y, X[design.columns_of(predictors)], final_fit, design, predictors)
    final = pd.DataFrame(_term_rows(final_fit, design, final_p, len(y)))
    logger.info("clinical model: entered %s, predictors %s", entered, predictors)
    return ClinicalResult(univariable, multivariable, final, model, entered, predictors, steps, notes)
