"""TrainingJob spec: the single source of truth for the CRD, the operator, the trainer and local mode.

Field docstrings become the CRD's descriptions and the README's configuration reference, so they are
written for users. The sections live by concern (kiln.api.training: model, data, training, evaluation;
kiln.api.delivery: export, serving; kiln.api.placement: where pods run); this module holds the trainer
pods, run policy and artifacts sections, the spec that assembles them with its cross-section checks, and the
dataset-dependent defaults the API server cannot fill in (the ``resolved_*`` helpers).
"""

from typing import Literal

from pydantic import Field, model_validator

from kiln.api.base import NESTED, ApiModel
from kiln.api.delivery import ExportSpec, ServingSpec
from kiln.api.placement import EnvVar, PodPlacement
from kiln.api.training import DATASETS_NEEDING_PATH, DataSpec, EvaluationSpec, ModelSpec, NormalizeSpec, TrainingSpec
from kiln.api.volumes import VolumeSource


class _TrainerPods(ApiModel):
    """How many trainer pods, of what size."""

    workers: int = Field(1, ge=1, le=1024, description="Trainer pods; more than one trains with PyTorch DDP.")
    gpus_per_worker: int = Field(0, ge=0, le=16, description="nvidia.com/gpu per worker.")
    processes_per_worker: int | None = Field(
        None,
        ge=1,
        le=64,
        description="Trainer processes per pod, one per local rank (torchrun-style). Defaults to gpusPerWorker, "
        "or 1 on CPU; the world size is workers x processesPerWorker.",
    )
    cpu: str | None = Field(None, max_length=32, description="CPU request and limit per worker (e.g. '2').")
    memory: str | None = Field(None, max_length=32, description="Memory request and limit per worker (e.g. '4Gi').")
    image: str | None = Field(None, max_length=1024, description="Trainer image override.")
    env: list[EnvVar] | None = Field(
        None, max_length=256, description="Extra environment of the trainer container (value or valueFrom)."
    )


class ResourcesSpec(PodPlacement, _TrainerPods):
    """Trainer pods: how many, on what, where."""

    @model_validator(mode="after")
    def _unique_env(self) -> "ResourcesSpec":
        names = [var.name for var in self.env or []]
        duplicates = sorted({name for name in names if names.count(name) > 1})
        if duplicates:
            raise ValueError(f"env: {', '.join(duplicates)} listed more than once")
        return self


def processes_per_worker(resources: ResourcesSpec) -> int:
    """Trainer processes in each pod: as set, else one per GPU, else one."""
    return resources.processes_per_worker or resources.gpus_per_worker or 1


class RunPolicySpec(ApiModel):
    """Retries, deadlines and suspension of the trainer Job."""

    backoff_limit: int = Field(
        3, ge=0, le=1000, description="Retries of failed trainer pods; each resumes from the last checkpoint."
    )
    active_deadline_seconds: int | None = Field(None, ge=1, description="Fail the job after this long.")
    ttl_seconds_after_finished: int | None = Field(
        None, ge=0, description="Delete the finished trainer Job after this long."
    )
    suspend: bool = Field(False, description="Suspend (true) or resume (false) training.")


class ArtifactsSpec(ApiModel):
    """Where checkpoints and compiled models go: a folder of their own (namespace/name/uid) on the volume."""

    volume: VolumeSource | None = Field(
        None, description="A Kubernetes volume source; defaults to the PVC named in the operator's configuration."
    )
    retention_policy: Literal["Retain", "Delete"] = Field(
        "Retain",
        description="Retain keeps the job's folder when the TrainingJob is deleted; Delete removes it then "
        "(a short cleanup Job in the TrainingJob's namespace).",
    )


class TrainingJobSpec(ApiModel):
    """What to train, how to compile it and how to serve it."""

    model: ModelSpec = Field(default_factory=ModelSpec, json_schema_extra=NESTED)
    data: DataSpec = Field(default_factory=DataSpec, json_schema_extra=NESTED)
    training: TrainingSpec = Field(default_factory=TrainingSpec, json_schema_extra=NESTED)
    evaluation: EvaluationSpec = Field(default_factory=EvaluationSpec, json_schema_extra=NESTED)
    export: ExportSpec = Field(default_factory=ExportSpec, json_schema_extra=NESTED)
    resources: ResourcesSpec = Field(default_factory=ResourcesSpec, json_schema_extra=NESTED)
    run_policy: RunPolicySpec = Field(default_factory=RunPolicySpec, json_schema_extra=NESTED)
    artifacts: ArtifactsSpec = Field(default_factory=ArtifactsSpec, json_schema_extra=NESTED)
    serving: ServingSpec = Field(default_factory=ServingSpec, json_schema_extra=NESTED)

    @model_validator(mode="after")
    def _consistent(self) -> "TrainingJobSpec":
        if self.data.dataset in DATASETS_NEEDING_PATH and not self.data.path:
            raise ValueError(f"data.path: required for dataset {self.data.dataset!r}")
        if "fp32" not in self.export.variants:
            self.export.variants = ["fp32", *self.export.variants]
        if len(set(self.export.variants)) != len(self.export.variants):
            raise ValueError("export.variants: each variant may be listed once")
        if self.serving.variant not in ("auto", *self.export.variants):
            raise ValueError(
                f"serving.variant: {self.serving.variant!r} is not built; add it to export.variants or use 'auto'"
            )
        return self


# Dataset-dependent defaults the API server cannot fill in.
_NUM_CLASSES: dict[str, int] = {"cifar10": 10, "digits": 10, "fake": 10}
_IMAGE_SIZE: dict[str, int] = {"cifar10": 32, "digits": 32, "fake": 32, "imagefolder": 224}
_NORMALIZE: dict[str, tuple[list[float], list[float]]] = {
    "cifar10": ([0.4914, 0.4822, 0.4465], [0.2470, 0.2435, 0.2616]),
    "digits": ([0.5, 0.5, 0.5], [0.5, 0.5, 0.5]),
    "fake": ([0.5, 0.5, 0.5], [0.5, 0.5, 0.5]),
    "imagefolder": ([0.485, 0.456, 0.406], [0.229, 0.224, 0.225]),
}


def resolved_num_classes(spec: TrainingJobSpec) -> int | None:
    """Class count from the spec, else the dataset's; None for imagefolder (the folder decides)."""
    return spec.model.num_classes or _NUM_CLASSES.get(spec.data.dataset)


def resolved_image_size(spec: TrainingJobSpec) -> int:
    """Input size from the spec, else the dataset's usual one."""
    return spec.data.image_size or _IMAGE_SIZE[spec.data.dataset]


# The trainer's DataLoaders: batches each worker prepares ahead, and the smallest evaluation batch.
LOADER_PREFETCH_FACTOR = 4
EVAL_MIN_BATCH_SIZE = 256


def eval_batch_size(spec: TrainingJobSpec) -> int:
    """Evaluation batches: no gradients to keep, so at least EVAL_MIN_BATCH_SIZE images."""
    return max(spec.training.batch_size, EVAL_MIN_BATCH_SIZE)


def loader_bytes_in_flight(spec: TrainingJobSpec) -> int:
    """The most bytes of batches a trainer's DataLoader workers hold in /dev/shm at once: workers x prefetch
    float32 batches of the larger loader (the training and evaluation loaders take turns)."""
    image = 3 * resolved_image_size(spec) ** 2 * 4
    return spec.data.num_workers * LOADER_PREFETCH_FACTOR * eval_batch_size(spec) * image


def resolved_normalize(spec: TrainingJobSpec) -> NormalizeSpec:
    """Normalisation from the spec, else the dataset's usual mean and std."""
    if spec.data.normalize is not None:
        return spec.data.normalize
    mean, std = _NORMALIZE[spec.data.dataset]
    return NormalizeSpec(mean=list(mean), std=list(std))
