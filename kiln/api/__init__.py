"""The TrainingJob API (kiln.dev/v1alpha1) and the model card: one typed model, the source of the CRD."""

from kiln.api.card import ClassMetrics, ModelCard, Preprocessing, TensorSpec, TrainingSummary, VariantReport
from kiln.api.constants import API_VERSION, EXIT_CONFIG_ERROR, GROUP, KIND, PLURAL, VERSION
from kiln.api.placement import EnvVar, PodPlacement
from kiln.api.spec import (
    VARIANTS,
    DataSpec,
    ExportSpec,
    ModelSpec,
    NormalizeSpec,
    ResourcesSpec,
    ServingSpec,
    TrainingJobSpec,
    TrainingSpec,
    processes_per_worker,
    resolved_image_size,
    resolved_normalize,
    resolved_num_classes,
)
from kiln.api.status import PHASES, Condition, Metrics, ModelStatus, Progress, TrainingJobStatus
from kiln.api.trainingjob import ConfigError, TrainingJob, load_trainingjob, parse_trainingjob

__all__ = [
    "API_VERSION",
    "EXIT_CONFIG_ERROR",
    "GROUP",
    "KIND",
    "PHASES",
    "PLURAL",
    "VARIANTS",
    "VERSION",
    "ClassMetrics",
    "Condition",
    "ConfigError",
    "DataSpec",
    "EnvVar",
    "ExportSpec",
    "Metrics",
    "ModelCard",
    "ModelSpec",
    "ModelStatus",
    "NormalizeSpec",
    "PodPlacement",
    "Preprocessing",
    "Progress",
    "ResourcesSpec",
    "ServingSpec",
    "TensorSpec",
    "TrainingJob",
    "TrainingJobSpec",
    "TrainingJobStatus",
    "TrainingSpec",
    "TrainingSummary",
    "VariantReport",
    "load_trainingjob",
    "parse_trainingjob",
    "processes_per_worker",
    "resolved_image_size",
    "resolved_normalize",
    "resolved_num_classes",
]
