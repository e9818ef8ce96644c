"""HTTP response schemas (they also document the endpoints on the OpenAPI page)."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, Field


class ModelRef(BaseModel):
    tag: str = Field(description="BentoML model store tag (or dir:NAME when served from a directory).")
    name: str
    version: str
    variant: str = Field(description="ONNX variant in use (fp32, fp16, int8).")
    provider: str = Field(description="ONNX Runtime execution provider in use.")


class PredictResponse(BaseModel):
    probability: float = Field(description="Predicted probability of PD-L1 positivity.")
    label: int = Field(description="1 when probability >= threshold (PD-L1 high), else 0 (PD-L1 low).")
    label_name: str
    threshold: float = Field(description="Operating threshold stored with the model.")
    model: ModelRef
    timings_ms: dict[str, float]
    cam: str | None = Field(None, description="Base64: gzipped NIfTI on the input grid, or a PNG overlay.")
    cam_format: Literal["nifti", "png"] | None = None
    cam_source: Literal["graph", "torch-gradcam", "torch-ablation-cam"] | None = Field(
        None,
        description="'graph': the ONNX graph's own CAM (linear heads); 'torch-gradcam': Grad-CAM on the torch"
        " path; 'torch-ablation-cam': forward-only Ablation-CAM for heads that are not differentiable.",
    )
    cam_normalisation: str | None = None


class PreprocessedResponse(BaseModel):
    probability: list[float] = Field(description="One probability per patient in the input.")
    label: list[int]
    threshold: float
    model: ModelRef
    timings_ms: dict[str, float]


class ErrorResponse(BaseModel):
    error: str = Field(description="What is wrong, naming the field; never the uploaded file's name.")
    field: str | None = None
