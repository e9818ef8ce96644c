"""One figure style for every study figure, and the writer that saves each as 300 dpi PNG + SVG.

Colours are Okabe-Ito (colour-blind safe) with one fixed colour per model, so a model looks the same in
every figure. SVG metadata (dates) and hash salts are pinned so re-running a report gives identical files.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # headless: figures are written, never shown

import matplotlib.pyplot as plt
from matplotlib.figure import Figure

from training.artifacts import write_with

DPI = 300
MODEL_ORDER = ("clinical", "dfsig", "fusion")
MODEL_LABELS = {"clinical": "Clinical model", "dfsig": "DFSigM", "fusion": "Fusion model"}
MODEL_COLORS = {"clinical": "#E69F00", "dfsig": "#0072B2", "fusion": "#009E73"}
COHORT_ORDER = ("training", "internal_validation", "external_validation")
COHORT_LABELS = {
    "training": "Training cohort",
    "internal_validation": "Internal validation cohort",
    "external_validation": "External validation cohort",
}
REFERENCE_COLOR = "#7F7F7F"
EXTRA_COLORS = ("#CC79A7", "#D55E00", "#56B4E9", "#F0E442", "#000000")

RC = {
    "font.family": "DejaVu Sans",
    "font.size": 8,
    "axes.titlesize": 9,
    "axes.labelsize": 8,
    "legend.fontsize": 7,
    "xtick.labelsize": 7,
    "ytick.labelsize": 7,
    "axes.spines.top": False,
    "axes.spines.right": False,
    "axes.linewidth": 0.8,
    "lines.linewidth": 1.4,
    "legend.frameon": False,
    "figure.dpi": 100,
    "savefig.dpi": DPI,
    "savefig.bbox": "tight",
    "svg.fonttype": "path",
    "svg.hashsalt": "pdl1-dect",
}


def label_model(key: str) -> str:
    return MODEL_LABELS.get(key, key)


def label_cohort(key: str) -> str:
    return COHORT_LABELS.get(key, key.replace("_", " ").capitalize())


def model_color(key: str, i: int = 0) -> str:
    return MODEL_COLORS.get(key, EXTRA_COLORS[i % len(EXTRA_COLORS)])


@contextmanager
def figure_style() -> Iterator[None]:
    """Apply the study style for the figures made inside the block (restores rcParams afterwards)."""
    with matplotlib.rc_context(RC):
        yield


def save_figure(fig: Figure, stem: Path) -> list[Path]:
    """Write ``stem.png`` (300 dpi) and ``stem.svg`` atomically, close the figure, return both paths."""
    stem = Path(stem)
    paths = []
    try:
        for fmt, meta in (("png", {"Software": None}), ("svg", {"Date": None, "Creator": None})):
            target = stem.with_name(f"{stem.name}.{fmt}")
            write_with(target, lambda p, fmt=fmt, meta=meta: fig.savefig(p, format=fmt, metadata=meta))
            paths.append(target)
    finally:
        plt.close(fig)
    return paths
