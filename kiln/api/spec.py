"""TrainingJob spec: the single source of truth for the CRD, the operator, the trainer and local mode.

Field docstrings become the CRD's descriptions and the README's configuration reference, so they are
written for users. Dataset-dependent defaults (classes, image size, normalisation) are left unset here
and resolved by ``resolved_*`` helpers, because the API server cannot compute them.
"""

from typing import Annotated, Any, Literal

from pydantic import AfterValidator, Field, WithJsonSchema, field_validator, model_validator

from kiln.api.architectures import BUILTIN_ARCHITECTURES, TORCHVISION_ARCHITECTURES
from kiln.api.base import ApiModel
from kiln.api.placement import EnvVar, PodPlacement

Dataset = Literal["cifar10", "imagefolder", "digits", "fake"]
Variant = Literal["fp32", "fp16", "int8-dynamic", "int8-static"]
ServingVariant = Literal["auto", "fp32", "fp16", "int8-dynamic", "int8-static"]
VARIANTS: tuple[Variant, ...] = ("fp32", "fp16", "int8-dynamic", "int8-static")
DATASETS_NEEDING_PATH: tuple[Dataset, ...] = ("cifar10", "imagefolder")

# The volume sources a TrainingJob may mount (exactly one per volume, its fields passed through untouched).
# Others (iscsi, rbd, secret, projected, ...) are refused here and by the API server; hostPath only where the
# operator's configuration allows it (checked by the operator, which then fails the job naming the field).
VOLUME_SOURCES: tuple[str, ...] = (
    "persistentVolumeClaim",
    "configMap",
    "emptyDir",
    "csi",
    "nfs",
    "ephemeral",
    "hostPath",
)
_ONE_SOURCE = (
    f"must set exactly one volume source: {', '.join(VOLUME_SOURCES[:-1])} (or hostPath where the operator allows it)"
)


def _one_known_source(volume: dict[str, Any]) -> dict[str, Any]:
    unknown = sorted(set(volume) - set(VOLUME_SOURCES))
    if unknown or len(volume) != 1:
        found = f"; {', '.join(unknown)} not allowed" if unknown else ""
        raise ValueError(f"{_ONE_SOURCE}{found}")
    return volume


VolumeSource = Annotated[
    dict[str, Any],
    AfterValidator(_one_known_source),
    WithJsonSchema(
        {
            "type": "object",
            "properties": {
                k: {
                    "type": "object",
                    "description": f"A {k} volume source, its fields as in a Pod's volume"
                    + (" (only where the operator's configuration allows it)." if k == "hostPath" else "."),
                    "x-kubernetes-preserve-unknown-fields": True,
                }
                for k in VOLUME_SOURCES
            },
            "x-kubernetes-validations": [
                {
                    "rule": f"[{', '.join(f'has(self.{k})' for k in VOLUME_SOURCES)}].exists_one(x, x)",
                    "message": _ONE_SOURCE,
                }
            ],
        }
    ),
]
NESTED: dict[str, Any] = {"default": {}}


class ModelSpec(ApiModel):
    """Which network to train."""

    architecture: str = Field(
        "small-cnn",
        max_length=64,
        description="A torchvision classification model name (resnet18, resnet50, mobilenet_v3_small, ...) "
        "or 'small-cnn', a small built-in CNN for CPU demos and tests.",
    )
    num_classes: int | None = Field(
        None, ge=2, le=100000, description="Number of classes. Defaults from the dataset (10 for cifar10/digits/fake)."
    )
    weights: str | None = Field(
        None,
        max_length=4096,
        description="Pretrained weights: a local state-dict file, or a torchvision weight name such as "
        "IMAGENET1K_V2 (or ResNet50_Weights.IMAGENET1K_V2), read from the torch hub cache or the weights volume. "
        "The final layer is re-initialised when the class count differs (fine-tuning).",
    )
    weights_volume: VolumeSource | None = Field(
        None,
        description="A Kubernetes volume source holding torchvision weight files (as the torch hub cache "
        "names them), searched before the cache.",
    )
    allow_download: bool = Field(
        False,
        description="Download named weights that are in neither the cache nor the weights volume; off by "
        "default, so a run never depends on the network.",
    )
    weights_mirror: str | None = Field(
        None,
        max_length=2048,
        description="Base URL to download named weights from (the file name is appended); defaults to "
        "torchvision's own URL. Only used with allowDownload.",
    )
    stem: Literal["imagenet", "cifar"] = Field(
        "imagenet",
        description="ResNet input stem: imagenet (7x7 stride-2 conv and max-pool) or cifar (3x3 stride-1 conv, "
        "no max-pool), which keeps 32x32 images from shrinking to 1x1 in the last stage.",
    )

    @field_validator("architecture")
    @classmethod
    def _known_architecture(cls, name: str) -> str:
        if name not in BUILTIN_ARCHITECTURES and name not in TORCHVISION_ARCHITECTURES:
            raise ValueError(
                f"unknown architecture {name!r}; use 'small-cnn' or a torchvision classification model name "
                "such as resnet18, resnet50 or mobilenet_v3_small"
            )
        return name


class AugmentSpec(ApiModel):
    """Training-time augmentation, applied to training images only."""

    random_crop: bool = Field(False, description="Random crop of imageSize after padding by cropPadding pixels.")
    crop_padding: int = Field(4, ge=0, le=512, description="Padding in pixels for randomCrop.")
    random_resized_crop: bool = Field(False, description="Random resized crop to imageSize (scale 0.08-1).")
    horizontal_flip: bool = Field(False, description="Random horizontal flip with probability 0.5.")
    rotation_degrees: float = Field(0.0, ge=0, le=180, description="Random rotation within +/- this many degrees.")


class NormalizeSpec(ApiModel):
    """Per-channel normalisation applied after scaling pixels to [0, 1]."""

    mean: list[float] = Field(..., min_length=1, max_length=4, description="Per-channel mean.")
    std: list[float] = Field(..., min_length=1, max_length=4, description="Per-channel standard deviation.")

    @model_validator(mode="after")
    def _same_length(self) -> "NormalizeSpec":
        if len(self.mean) != len(self.std):
            raise ValueError("mean and std must have the same number of channels")
        if any(s <= 0 for s in self.std):
            raise ValueError("std: every value must be > 0")
        return self


class DataSpec(ApiModel):
    """Where the data comes from and how it is prepared."""

    dataset: Dataset = Field(
        "digits",
        description="cifar10 (python-format folder), imagefolder, digits "
        "(scikit-learn's bundled 8x8 digits) or fake (random images for smoke runs).",
    )
    path: str | None = Field(
        None,
        max_length=4096,
        description="Dataset folder. Required for cifar10 and "
        "imagefolder; relative paths are resolved inside the data volume when one is set.",
    )
    volume: VolumeSource | None = Field(
        None,
        description="A Kubernetes volume source holding the data, "
        "mounted read-only (e.g. {persistentVolumeClaim: {claimName: cifar10}}).",
    )
    image_size: int | None = Field(
        None,
        ge=8,
        le=1024,
        description="Square input size in pixels. Defaults to 32 (cifar10, digits, fake) or 224 (imagefolder).",
    )
    validation_split: float = Field(
        0.2,
        gt=0,
        lt=1,
        description="Fraction of the training data held out for validation (a deterministic split from training.seed).",
    )
    test_path: str | None = Field(
        None,
        max_length=4096,
        description="imagefolder: a folder of held-out test images (one sub-folder per class); relative paths "
        "are resolved inside the data volume. cifar10 always uses its test_batch.",
    )
    test_split: float | None = Field(
        None,
        gt=0,
        lt=1,
        description="Fraction of the data held out as a test set when the dataset has none of its own (digits, "
        "fake, imagefolder without testPath); a deterministic split from training.seed. Unset: no test set.",
    )
    augment: AugmentSpec = Field(default_factory=AugmentSpec, json_schema_extra=NESTED)
    normalize: NormalizeSpec | None = Field(None, description="Defaults to the dataset's usual mean/std.")
    num_workers: int = Field(2, ge=0, le=64, description="DataLoader worker processes.")
    max_samples: int | None = Field(
        None, ge=1, description="Use at most this many training samples (before the split); for smoke runs."
    )


class OptimizerSpec(ApiModel):
    """The optimiser and its hyper-parameters."""

    name: Literal["sgd", "adam", "adamw"] = Field("adamw", description="sgd, adam or adamw.")
    learning_rate: float = Field(1e-3, gt=0, le=10, description="Peak learning rate.")
    momentum: float = Field(0.9, ge=0, lt=1, description="Momentum (sgd only).")
    weight_decay: float = Field(0.0, ge=0, le=1, description="Weight decay.")
    decay_norm_and_bias: bool = Field(
        False, description="Apply weight decay to normalisation and bias parameters too (off, as timm does)."
    )
    head_learning_rate_multiplier: float = Field(
        1.0, gt=0, le=1000, description="Learning rate of the classifier head relative to the backbone's."
    )


class SchedulerSpec(ApiModel):
    """Learning-rate schedule, stepped per epoch (onecycle per batch)."""

    name: Literal["none", "step", "cosine", "onecycle"] = Field("cosine", description="none, step, cosine or onecycle.")
    warmup_epochs: int = Field(0, ge=0, le=1000, description="Linear warm-up epochs (step and cosine).")
    step_size: int = Field(10, ge=1, description="Epochs between decays (step).")
    gamma: float = Field(0.1, gt=0, le=1, description="Decay factor (step).")


class EarlyStoppingSpec(ApiModel):
    """Stop when validation accuracy has not improved by minDelta for patience epochs."""

    patience: int = Field(5, ge=1, le=10000, description="Epochs without improvement before stopping.")
    min_delta: float = Field(0.0, ge=0, le=1, description="Smallest accuracy gain that counts as improvement.")


class MixupSpec(ApiModel):
    """Mixup and CutMix on training batches (timm's convention: one of the two per batch)."""

    mixup_alpha: float = Field(0.2, ge=0, le=10, description="Beta(alpha, alpha) for mixup; 0 disables mixup.")
    cutmix_alpha: float = Field(1.0, ge=0, le=10, description="Beta(alpha, alpha) for CutMix; 0 disables CutMix.")
    probability: float = Field(1.0, ge=0, le=1, description="Share of batches mixed at all.")
    switch_probability: float = Field(
        0.5, ge=0, le=1, description="Share of mixed batches cut (CutMix) when both are on."
    )


class EmaSpec(ApiModel):
    """Exponential moving average of the weights, evaluated and exported instead of the raw weights."""

    decay: float = Field(0.999, gt=0, lt=1, description="Decay per optimizer step.")
    warmup_steps: int = Field(
        0, ge=0, description="Steps over which the decay ramps up from 0 (the average starts as the weights)."
    )


class TrainingSpec(ApiModel):
    """The loop: epochs, batch size, optimiser, schedule and stop conditions."""

    epochs: int = Field(10, ge=1, le=100000, description="Maximum number of epochs.")
    batch_size: int = Field(64, ge=1, le=65536, description="Batch size per worker.")
    optimizer: OptimizerSpec = Field(default_factory=OptimizerSpec, json_schema_extra=NESTED)
    scheduler: SchedulerSpec = Field(default_factory=SchedulerSpec, json_schema_extra=NESTED)
    label_smoothing: float = Field(0.0, ge=0, lt=1, description="Label smoothing for the cross-entropy loss.")
    gradient_clip_norm: float | None = Field(None, gt=0, description="Clip the gradient norm to this value.")
    mixed_precision: Literal["auto", "bf16", "fp16", "none"] = Field(
        "auto", description="auto: bf16 on CUDA when supported, else fp16 with a scaler; never on CPU."
    )
    early_stopping: EarlyStoppingSpec | None = Field(None, description="Early stopping on validation accuracy.")
    target_accuracy: float | None = Field(
        None, gt=0, le=1, description="Stop once validation accuracy reaches this fraction."
    )
    overfit_gap: float = Field(
        0.15,
        gt=0,
        le=1,
        description="Warn about overfitting when training accuracy exceeds validation accuracy by more than this.",
    )
    seed: int = Field(42, ge=0, description="Seed for the split, initialisation and shuffling.")
    gradient_accumulation_steps: int = Field(
        1, ge=1, le=1024, description="Batches whose gradients are summed before each optimizer step."
    )
    freeze_backbone_epochs: int = Field(
        0, ge=0, description="Train only the classifier head for this many epochs first (fine-tuning)."
    )
    sync_batch_norm: bool = Field(
        True, description="Synchronise BatchNorm statistics across workers (DDP on GPUs with workers > 1)."
    )
    mixup: MixupSpec | None = Field(None, description="Mixup and CutMix; off when unset.")
    ema: EmaSpec | None = Field(None, description="EMA of the weights; off when unset.")
    checkpoint_every: int = Field(1, ge=1, description="Write a checkpoint every this many epochs.")
    keep_checkpoints: int = Field(2, ge=1, le=100, description="Latest checkpoints kept (plus the best).")


class AdversarialSpec(ApiModel):
    """Robustness check of the final model on the test set (the validation set when there is none)."""

    attack: Literal["fgsm", "pgd"] = Field("fgsm", description="fgsm (one step) or pgd (steps of stepSize).")
    epsilon: float = Field(
        8 / 255,
        gt=0,
        le=1,
        description="Largest perturbation per pixel, in pixel units of [0, 1] images (8/255 by default); "
        "perturbed images are clamped to [0, 1].",
    )
    steps: int = Field(10, ge=1, le=1000, description="PGD iterations.")
    step_size: float | None = Field(
        None, gt=0, le=1, description="PGD step in pixel units; defaults to 2.5 * epsilon / steps."
    )


class EvaluationSpec(ApiModel):
    """Extra evaluation beyond loss, accuracy, precision, recall and F1."""

    adversarial: AdversarialSpec | None = Field(None, description="Measure adversarial accuracy (FGSM or PGD).")


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
