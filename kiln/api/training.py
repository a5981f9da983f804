"""What is trained and how: the model, data, training and evaluation sections of a TrainingJob's spec.

Dataset-dependent defaults (classes, image size, normalisation) are left unset here and resolved by
kiln.api.spec's ``resolved_*`` helpers, because the API server cannot compute them.
"""

from typing import Literal

from pydantic import Field, field_validator, model_validator

from kiln.api.architectures import BUILTIN_ARCHITECTURES, TORCHVISION_ARCHITECTURES
from kiln.api.base import NESTED, ApiModel
from kiln.api.volumes import VolumeSource

Dataset = Literal["cifar10", "imagefolder", "digits", "fake"]
DATASETS_NEEDING_PATH: tuple[Dataset, ...] = ("cifar10", "imagefolder")


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
