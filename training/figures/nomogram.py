"""A points nomogram for a logistic model (the fusion model), drawn as in Harrell's ``rms::nomogram``.

Each predictor's contribution ``beta * x`` over its observed range is put on a 0-100 points scale (the
predictor with the widest contribution spans 100 points); the total points map back to the linear
predictor and through the logistic function to the predicted probability. Categorical predictors show
their levels at their points.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import matplotlib.pyplot as plt
import numpy as np
from matplotlib.ticker import MaxNLocator

from training.figures.style import figure_style, save_figure

PROBABILITY_TICKS = (0.01, 0.05, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 0.95, 0.99)


@dataclass(frozen=True)
class NomogramTerm:
    """One predictor: ``coef`` per unit of x, observed range ``[low, high]``; ``levels`` maps label -> x for
    categorical predictors (then the range is that of the levels)."""

    name: str
    coef: float
    low: float = 0.0
    high: float = 1.0
    levels: Mapping[str, float] = field(default_factory=dict)

    def span(self) -> tuple[float, float]:
        if self.levels:
            values = list(self.levels.values())
            return min(values), max(values)
        return self.low, self.high


def nomogram_scales(terms: Sequence[NomogramTerm], intercept: float) -> dict[str, float]:
    """Points per unit of linear predictor, and the linear predictor at zero total points."""
    widths = [abs(t.coef) * (t.span()[1] - t.span()[0]) for t in terms]
    widest = max(widths, default=0.0)
    if widest <= 0:
        raise ValueError("every nomogram term has zero contribution; nothing to draw")
    lp0 = intercept + sum(min(t.coef * t.span()[0], t.coef * t.span()[1]) for t in terms)
    return {"points_per_lp": 100.0 / widest, "lp_at_zero": lp0, "total_max": sum(widths) * 100.0 / widest}


def term_points(term: NomogramTerm, x: np.ndarray | float, points_per_lp: float) -> np.ndarray:
    """Points of predictor value(s) ``x`` (0 at the value with the lowest contribution)."""
    lo, hi = term.span()
    base = min(term.coef * lo, term.coef * hi)
    return (term.coef * np.asarray(x, dtype=float) - base) * points_per_lp


def _axis(ax, y: float, x0: float, x1: float, ticks, labels, name: str) -> None:
    ax.plot([x0, x1], [y, y], color="black", lw=0.8)
    for t, lab in zip(ticks, labels):
        ax.plot([t, t], [y, y + 0.12], color="black", lw=0.8)
        ax.text(t, y + 0.18, lab, ha="center", va="bottom", fontsize=6.5)
    ax.text(-4, y, name, ha="right", va="center", fontsize=7.5)


def nomogram_figure(
    terms: Sequence[NomogramTerm], intercept: float, out_stem: Path, *, title: str = "Fusion model nomogram"
) -> list[Path]:
    """Points row, one row per predictor, total points, predicted probability."""
    sc = nomogram_scales(terms, intercept)
    ppl, total_max = sc["points_per_lp"], sc["total_max"]
    rows = len(terms) + 3
    with figure_style():
        fig, ax = plt.subplots(figsize=(7.0, 0.55 * rows + 0.6))
        y = rows - 1
        ticks = np.arange(0, 101, 10)
        _axis(ax, y, 0, 100, ticks, [str(int(t)) for t in ticks], "Points")
        for term in terms:
            y -= 1
            if term.levels:
                xs = list(term.levels.values())
                pts = term_points(term, np.array(xs), ppl)
                _axis(ax, y, float(pts.min()), float(pts.max()), pts, list(term.levels), term.name)
            else:
                lo_hi = term_points(term, np.array([term.low, term.high]), ppl)
                length = float(lo_hi.max() - lo_hi.min())  # in points; about one label per 12 points
                locator = MaxNLocator(nbins=max(1, min(8, int(length // 12))))
                values = [
                    v
                    for v in locator.tick_values(term.low, term.high)
                    if term.low - 1e-12 <= v <= term.high + 1e-12
                ]
                if len(values) < 2:  # too short for round numbers: label the observed range
                    values = [term.low, term.high]
                pts = term_points(term, np.array(values), ppl)
                _axis(
                    ax,
                    y,
                    float(lo_hi.min()),
                    float(lo_hi.max()),
                    pts,
                    [f"{v:.4g}" for v in values],
                    term.name,
                )
        # Total points drawn on the same width: x = total * 100 / total_max.
        y -= 1
        scale = 100.0 / total_max
        total_ticks = MaxNLocator(nbins=10, integer=True).tick_values(0, total_max)
        total_ticks = [t for t in total_ticks if 0 <= t <= total_max + 1e-9]
        _axis(
            ax, y, 0, 100, [t * scale for t in total_ticks], [f"{t:g}" for t in total_ticks], "Total points"
        )
        y -= 1
        lp_lo, lp_hi = sc["lp_at_zero"], sc["lp_at_zero"] + total_max / ppl
        probs, px = [], []
        for p in PROBABILITY_TICKS:
            x = (math.log(p / (1 - p)) - lp_lo) * ppl * scale
            if lp_lo <= math.log(p / (1 - p)) <= lp_hi and (not px or x - px[-1] >= 5.0):  # no overlaps
                probs.append(p)
                px.append(x)
        if px:
            _axis(ax, y, min(px), max(px), px, [f"{p:g}" for p in probs], "Predicted probability")
        else:
            ax.text(50, y, "probability range too narrow to label", ha="center", fontsize=7)
        ax.set_xlim(-30, 104)
        ax.set_ylim(y - 0.6, rows - 0.3)
        ax.set_axis_off()
        ax.set_title(title)
        return save_figure(fig, out_stem)
