"""TrainingJob status: written by the operator (phase, conditions, endpoint) and the trainer (progress,
lastCheckpoint, metrics, model). Every field is optional so each writer patches only its own part."""

from typing import Literal, get_args

from pydantic import Field

from kiln.api.base import ApiModel

Phase = Literal["Pending", "Running", "Exporting", "Serving", "Succeeded", "Failed", "Suspended"]
# Succeeded: trained and compiled (status.model reported); Ready: the model is served; Failed: terminal.
# Created, Running, Suspended and Trained are the steps on the way.
ConditionType = Literal["Created", "Running", "Suspended", "Trained", "Succeeded", "Ready", "Failed"]
ConditionStatus = Literal["True", "False", "Unknown"]


def phases() -> tuple[Phase, ...]:
    """Every phase, in lifecycle order (read from the Literal, so there is one list)."""
    return get_args(Phase)


def condition_types() -> tuple[ConditionType, ...]:
    """Every condition type, in the order the operator writes them."""
    return get_args(ConditionType)


class Condition(ApiModel):
    """A Kubernetes-style condition; read by type and status, never by position."""

    type: ConditionType = Field(
        ...,
        description="Succeeded (trained and compiled), Ready (serving available), Failed (terminal), or one of "
        "the steps Created, Running, Suspended and Trained.",
    )
    status: ConditionStatus = Field(..., description="True, False or Unknown.")
    reason: str | None = Field(None, max_length=128, description="CamelCase reason for the last transition.")
    message: str | None = Field(None, max_length=32768, description="Human-readable details.")
    last_transition_time: str | None = Field(None, description="When status last changed (RFC 3339).")
    observed_generation: int | None = Field(None, ge=0, description="The spec generation this reflects.")


class Progress(ApiModel):
    """Live training progress, patched by the trainer's rank 0 at most every few seconds."""

    epoch: int | None = Field(None, ge=0, description="Epochs completed.")
    total_epochs: int | None = Field(None, ge=0, description="Epochs requested.")
    train_loss: float | None = Field(None, description="Mean training loss of the last epoch.")
    val_loss: float | None = Field(None, description="Validation loss of the last epoch.")
    val_accuracy: float | None = Field(None, description="Validation accuracy of the last epoch (0-1).")
    samples_per_second: float | None = Field(None, description="Training throughput of the last epoch.")
    eta_seconds: float | None = Field(None, description="Estimated seconds until the last epoch ends.")
    updated_at: str | None = Field(None, description="When this was written (RFC 3339).")


class Metrics(ApiModel):
    """Validation metrics of the best model (macro averages, fractions 0-1)."""

    accuracy: float | None = Field(None, description="Top-1 accuracy.")
    precision: float | None = Field(None, description="Macro precision.")
    recall: float | None = Field(None, description="Macro recall.")
    f1: float | None = Field(None, description="Macro F1.")
    adversarial_accuracy: float | None = Field(
        None, description="Accuracy under the requested attack (evaluation.adversarial), when requested."
    )
    test_accuracy: float | None = Field(None, description="Top-1 accuracy on the held-out test set, when there is one.")


class ModelStatus(ApiModel):
    """The compiled model chosen for serving, copied from the model card."""

    variant: str | None = Field(None, description="fp32, fp16, int8-dynamic or int8-static.")
    uri: str | None = Field(None, description="Where the ONNX file is (a path on the artifacts volume).")
    sha256: str | None = Field(None, description="sha256 of the ONNX file.")
    size_bytes: int | None = Field(None, ge=0, description="Size of the ONNX file.")
    accuracy: float | None = Field(None, description="Validation accuracy of this variant.")
    latency_ms: float | None = Field(None, description="Median latency at batch 32 in milliseconds.")


class TrainingJobStatus(ApiModel):
    """What is true now, for `kubectl get tj` and `kubectl describe tj`."""

    phase: Phase | None = Field(
        None, description="Pending, Running, Exporting, Serving, Succeeded, Failed or Suspended."
    )
    conditions: list[Condition] | None = Field(
        None,
        description="Conditions, one per type (a map keyed by type).",
        json_schema_extra={"x-kubernetes-list-type": "map", "x-kubernetes-list-map-keys": ["type"]},
    )
    start_time: str | None = Field(None, description="When the operator first saw the job.")
    completion_time: str | None = Field(
        None, description="When the job first succeeded (model compiled) or failed; written once."
    )
    progress: Progress | None = None
    metrics: Metrics | None = None
    artifacts_path: str | None = Field(
        None, description="This job's folder on the artifacts volume (namespace/name/uid): checkpoints and models."
    )
    last_checkpoint: str | None = Field(None, description="Path of the newest checkpoint.")
    model: ModelStatus | None = None
    endpoint: str | None = Field(None, description="In-cluster URL of the Open Inference Protocol model endpoint.")
    restarts: int | None = Field(None, ge=0, description="Trainer pod restarts and retries so far.")
    warnings: list[str] | None = Field(None, description="Training warnings, e.g. overfitting.")
    observed_generation: int | None = Field(
        None, ge=0, description="The spec generation the children reflect (written once they do)."
    )
