"""MODEL_CARD.md: what the model is for, how it was made, how well it did, where it must not be used."""

from __future__ import annotations

import pandas as pd

from core.manifest import ModelManifest

INTENDED_USE = (
    "Research use: estimate the probability of high PD-L1 expression from a dual-energy CT iodine map and a "
    "tumour segmentation (VOI), reproducing a published deep-feature model (ResNet-50 features -> selected "
    "features -> DFSigM classifier). Not a medical device; not for diagnosis or treatment decisions."
)

LIMITATIONS = [
    "Validated only on the cohorts listed below; performance on other scanners, protocols, reconstruction "
    "kernels or populations is unknown.",
    "Input must be an iodine map in mg/mL with a tumour mask; the preprocessing in manifest.json must be "
    "used unchanged (the service and `pdl1 predict` do this).",
    "Probabilities are calibrated to the training cohort's prevalence; the threshold is the training "
    "cohort's Youden point, not a clinically chosen operating point.",
    "Class activation maps show which image regions drove the score, not where PD-L1 is expressed.",
]


def _fmt(value: object) -> str:
    if isinstance(value, float):
        return "n/a" if value != value else f"{value:.4g}"
    return str(value)


def _table(frame: pd.DataFrame) -> str:
    cols = list(frame.columns)
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    lines += ["| " + " | ".join(_fmt(v) for v in row) + " |" for row in frame.itertuples(index=False)]
    return "\n".join(lines)


def render_model_card(manifest: ModelManifest, validation: pd.DataFrame) -> str:
    """Markdown model card from the manifest and the validation table."""
    m = manifest
    synthetic = (
        "\n> **SYNTHETIC DATA.** This model was trained and validated on a synthetic cohort. Its numbers "
        "demonstrate the pipeline and carry no clinical evidence.\n"
        if m.synthetic_data
        else ""
    )
    weights = m.weights.get("kind", "unknown")
    aucs = pd.DataFrame(
        [
            {"cohort": c, "n": m.cohort_n.get(c, ""), "AUC": a if a is not None else float("nan")}
            for c, a in m.cohort_auc.items()
        ]
    )
    variants = pd.DataFrame(
        [
            {
                "variant": k,
                "published": v.published,
                "precision": v.precision,
                "target": v.target,
                "note": v.note,
            }
            for k, v in m.variants.items()
        ]
    )
    cols = ["variant", "candidate", "cohort", "n", "max_abs_diff", "abs_delta_auc", "passed", "provider"]
    val = validation[[c for c in cols if c in validation.columns]]
    feats = ", ".join(f"{n} (#{i})" for n, i in zip(m.feature_names, m.feature_indices))
    limitations = "\n".join(f"- {item}" for item in m.limitations)
    return f"""# Model card: {m.name}:{m.version}
{synthetic}
## Intended use
{m.intended_use}

## Model
- Input `{m.input_name}` float32 {m.input_shape}: preprocessed slices (config in manifest.json).
- Outputs: {", ".join(f"`{k}` {v}" for k, v in m.outputs.items())}.
- ResNet-50 trunk (weights: {weights}) -> global average pool -> mean over slices -> {len(m.feature_indices)}
  selected features -> StandardScaler -> {m.head.classifier} (`{m.head.model_name}`, {m.head.type} head).
- Selected features: {feats}.
- Decision threshold: {m.threshold:.4f} ({m.threshold_method}).
- CAM: {m.cam_note}
- Training run: `{m.training_run_id}` ({m.source_run}).
- Exported with the {m.exporter} exporter, opset {m.opset}.

## Performance (AUC of the exported head on the run's features)
{_table(aucs)}

## Precision variants
{_table(variants)}

## Validation against the torch + scikit-learn reference
Tolerances: fp32 max |Δp| <= 1e-4; fp16/int8 max |Δp| <= 2e-2 and |ΔAUC| <= 0.01 per cohort.

{_table(val)}

## Limitations
{limitations}
"""
