"""Study statistics: DeLong AUC inference, calibration, decision curves, threshold metrics, evaluation tables.

Conventions match the R packages reviewers use (pROC, ResourceSelection, dcurves); each module
documents its own.
"""

from training.stats.calibration import (
    brier_score,
    calibration_curve,
    calibration_slope_intercept,
    expected_calibration_error,
    hosmer_lemeshow,
)
from training.stats.decision_curve import decision_curve, net_benefit, treat_all_net_benefit
from training.stats.delong import auc_ci, auc_delong, delong_covariance, delong_paired, pairwise_delong
from training.stats.evaluate import evaluate_models, evaluate_table
from training.stats.thresholds import confusion_metrics, threshold_metrics, youden_cutoff

__all__ = [
    "auc_ci",
    "auc_delong",
    "brier_score",
    "calibration_curve",
    "calibration_slope_intercept",
    "confusion_metrics",
    "decision_curve",
    "delong_covariance",
    "delong_paired",
    "evaluate_models",
    "evaluate_table",
    "expected_calibration_error",
    "hosmer_lemeshow",
    "net_benefit",
    "pairwise_delong",
    "threshold_metrics",
    "treat_all_net_benefit",
    "youden_cutoff",
]
