"""The model card (model-card.json): everything the server and the operator need about a compiled model.

The trainer writes it next to the compiled models; the server reads the input/output contract and the
preprocessing from it; the operator copies the selected variant into the TrainingJob's status.
"""

import hashlib
import json
from pathlib import Path
from typing import Literal

from pydantic import Field

from kiln.api.base import ApiModel
from kiln.api.status import Metrics

Datatype = Literal[
    "FP32", "FP16", "FP64", "INT8", "INT16", "INT32", "INT64", "UINT8", "UINT16", "UINT32", "UINT64", "BOOL"
]
StopReason = Literal["epochs", "target-accuracy", "early-stopping"]


class TensorSpec(ApiModel):
    """An input or output of the ONNX model, in Open Inference Protocol terms (-1 = dynamic)."""

    name: str
    datatype: Datatype = "FP32"
    shape: list[int]


class Preprocessing(ApiModel):
    """How to turn an image into the model's input: resize, scale to [0, 1], normalise, NCHW."""

    image_size: int = Field(..., ge=1)
    channels: int = Field(3, ge=1)
    mean: list[float]
    std: list[float]


class ClassMetrics(ApiModel):
    """Per-class figures; None where undefined (recall and F1 of a class absent from the data, precision of a
    class never predicted and absent), rather than a misleading 0."""

    name: str
    precision: float | None = None
    recall: float | None = None
    f1: float | None = None
    support: int


class HeldOutMetrics(ApiModel):
    """The final selected model on the held-out test set: computed once, never used to select anything."""

    accuracy: float
    macro_precision: float
    macro_recall: float
    macro_f1: float
    weighted_precision: float
    weighted_recall: float
    weighted_f1: float
    samples: int
    per_class: list[ClassMetrics] = Field(default_factory=list)


class AdversarialReport(ApiModel):
    """Accuracy under a white-box attack, with what the number means."""

    attack: Literal["fgsm", "pgd"]
    epsilon: float = Field(..., description="Largest perturbation per pixel.")
    space: Literal["pixel"] = Field("pixel", description="epsilon is in units of [0, 1] pixels, clamped to [0, 1].")
    steps: int = 1
    step_size: float | None = None
    split: Literal["test", "validation"]
    accuracy: float


class EpochHistory(ApiModel):
    """One epoch of the run, as in history.csv."""

    epoch: int
    train_loss: float
    train_accuracy: float
    val_loss: float
    val_accuracy: float
    learning_rate: float | None = None
    samples_per_second: float
    duration_seconds: float


class TrainingSummary(ApiModel):
    """How training went and why it stopped."""

    architecture: str
    dataset: str
    epochs_requested: int
    epochs_run: int
    best_epoch: int
    best_val_accuracy: float
    final_train_accuracy: float | None = None
    stop_reason: StopReason
    duration_seconds: float
    workers: int = 1
    device: str = "cpu"
    warnings: list[str] = Field(default_factory=list)
    clean_train_accuracy: float | None = Field(
        None, description="Best model on a training subset, eval mode, no augmentation (the overfitting check)."
    )
    test_accuracy: float | None = None


class VariantReport(ApiModel):
    """One compiled model: where it is, that it is intact, how accurate and fast it is."""

    name: str
    path: str = Field(..., description="Relative to the folder holding the card.")
    sha256: str
    size_bytes: int
    accuracy: float | None = None
    test_accuracy: float | None = None
    latency_ms_batch1: float | None = None
    latency_ms_batch32: float | None = None
    max_abs_diff: float | None = Field(None, description="Against PyTorch (fp32) or fp32 ONNX (others).")
    top1_agreement: float | None = None
    provider: str = "CPUExecutionProvider"
    rejected: bool = False
    reason: str | None = None
    optimized_path: str | None = Field(None, description="Offline-optimised graph (ORT_ENABLE_EXTENDED, CPU).")
    tensorrt_path: str | None = Field(
        None, description="The same variant quantized for TensorRT (symmetric int8), served in place of path there."
    )
    tensorrt_sha256: str | None = None


class ModelCard(ApiModel):
    """The compiled model's contract and report card."""

    api_version: str = "kiln.dev/v1alpha1"
    kind: Literal["ModelCard"] = "ModelCard"
    name: str
    created_at: str
    input: TensorSpec
    output: TensorSpec
    class_names: list[str]
    preprocessing: Preprocessing
    metrics: Metrics
    per_class: list[ClassMetrics] = Field(default_factory=list)
    confusion_matrix: list[list[int]] = Field(default_factory=list)
    training: TrainingSummary
    test_metrics: HeldOutMetrics | None = None
    adversarial: AdversarialReport | None = None
    history: list[EpochHistory] = Field(default_factory=list)
    plots: list[str] = Field(default_factory=list, description="PNG files, relative to the folder holding the card.")
    opset: int
    exporter: str
    variants: list[VariantReport]
    selected: str
    selection_reason: str

    def variant(self, name: str) -> VariantReport:
        """The report of one variant; KeyError names the ones that exist."""
        for v in self.variants:
            if v.name == name:
                return v
        raise KeyError(f"variant {name!r} not in model card (have: {', '.join(v.name for v in self.variants)})")

    def write(self, path: Path) -> None:
        """Write atomically, so a reader never sees half a card."""
        tmp = path.with_suffix(".json.tmp")
        tmp.write_text(json.dumps(self.to_dict(), indent=2) + "\n")
        tmp.replace(path)

    @classmethod
    def read(cls, path: Path) -> "ModelCard":
        """Read and validate a card; pydantic's error names the bad field."""
        return cls.model_validate_json(path.read_text())


def file_sha256(path: Path) -> str:
    """Hex sha256 of a file, read in chunks: what a card records for each variant (the compile step) and
    what a server checks before loading one."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()
