"""What happens to the trained model: the export section (the compiled variants) and the serving section
(the endpoint that serves one of them). They share the variant names, so they live together."""

from typing import Literal

from pydantic import Field

from kiln.api.base import NESTED, ApiModel
from kiln.api.placement import PodPlacement

Variant = Literal["fp32", "fp16", "int8-dynamic", "int8-static"]
ServingVariant = Literal["auto", "fp32", "fp16", "int8-dynamic", "int8-static"]
VARIANTS: tuple[Variant, ...] = ("fp32", "fp16", "int8-dynamic", "int8-static")


class CalibrationSpec(ApiModel):
    """Calibration for int8-static quantization."""

    samples: int = Field(256, ge=1, le=100000, description="Training images used for calibration.")
    method: Literal["minmax", "entropy", "percentile"] = Field("minmax", description="minmax, entropy or percentile.")


class ExportSpec(ApiModel):
    """The compile step: ONNX export and quantized variants."""

    opset: int | None = Field(
        None, ge=13, le=30, description="ONNX opset; defaults to 18 (or what the installed onnxruntime supports)."
    )
    variants: list[Variant] = Field(
        ["fp32", "int8-static"],
        min_length=1,
        max_length=4,
        json_schema_extra={"x-kubernetes-list-type": "set"},
        description="Variants to build; fp32 is always built (it is the reference for the others).",
    )
    calibration: CalibrationSpec = Field(default_factory=CalibrationSpec, json_schema_extra=NESTED)
    max_accuracy_drop: float = Field(
        0.02,
        ge=0,
        le=1,
        description="A variant whose accuracy is more than this below fp32 is kept but rejected for serving.",
    )


class _ServingPods(ApiModel):
    """The inference endpoint rolled out once the model is compiled."""

    enabled: bool = Field(True, description="Serve the compiled model when training ends.")
    variant: ServingVariant = Field(
        "auto",
        description="Variant to serve; auto picks the fastest one whose "
        "accuracy is within export.maxAccuracyDrop of fp32.",
    )
    replicas: int = Field(1, ge=0, le=1000, description="Serving replicas.")
    gpu: bool = Field(False, description="Serve on a GPU (one nvidia.com/gpu per replica).")
    max_batch_size: int = Field(32, ge=1, le=4096, description="Largest batch dynamic batching builds.")
    max_queue_delay_microseconds: int = Field(
        2000, ge=0, le=10_000_000, description="Longest a request waits for others to batch with; 0 disables batching."
    )
    cpu: str | None = Field(None, max_length=32, description="CPU request and limit per replica.")
    memory: str | None = Field(None, max_length=32, description="Memory request and limit per replica.")
    image: str | None = Field(None, max_length=1024, description="Serving image override.")


class ServingSpec(PodPlacement, _ServingPods):
    """The inference endpoint rolled out once the model is compiled; with more than one replica a
    PodDisruptionBudget keeps all but one available through voluntary disruptions (node drains)."""
