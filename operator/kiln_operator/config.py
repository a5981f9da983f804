"""The operator's configuration, read once from the environment the Helm chart sets."""

import dataclasses
import os
import re
from collections.abc import Mapping

PULL_POLICIES = ("Always", "IfNotPresent", "Never")
# A Kubernetes quantity such as "2", "500m", "4Gi" or "1.5".
_QUANTITY = re.compile(r"^[0-9]+(\.[0-9]+)?([numkKMGTPE]|[KMGTPE]i|[eE][0-9]+)?$")


class ConfigError(ValueError):
    """An environment variable the operator cannot use; the message names it."""


@dataclasses.dataclass(frozen=True)
class OperatorConfig:
    """Images, pull policy, the default artifacts PVC, default pod resources and the watched namespaces."""

    trainer_image: str = "kiln-trainer:0.1.0"
    trainer_gpu_image: str = "kiln-trainer-gpu:0.1.0"
    serving_image: str = "kiln-serving:0.1.0"
    serving_gpu_image: str = "kiln-serving-gpu:0.1.0"
    image_pull_policy: str = "IfNotPresent"
    artifacts_pvc: str = "kiln-artifacts"
    trainer_cpu: str | None = None
    trainer_memory: str | None = None
    serving_cpu: str | None = None
    serving_memory: str | None = None
    watch_namespaces: tuple[str, ...] = ()

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> "OperatorConfig":
        """Read KILN_* variables; unset or empty ones keep their defaults, bad ones raise ConfigError."""
        env = os.environ if environ is None else environ
        defaults = cls()

        def text(var: str, default: str) -> str:
            return env.get(var, "").strip() or default

        def quantity(var: str) -> str | None:
            value = env.get(var, "").strip()
            if value and not _QUANTITY.match(value):
                raise ConfigError(f"{var}={value!r} is not a Kubernetes quantity (e.g. '2', '500m', '4Gi')")
            return value or None

        pull_policy = text("KILN_IMAGE_PULL_POLICY", defaults.image_pull_policy)
        if pull_policy not in PULL_POLICIES:
            raise ConfigError(f"KILN_IMAGE_PULL_POLICY={pull_policy!r} must be one of {', '.join(PULL_POLICIES)}")
        namespaces = tuple(ns.strip() for ns in env.get("KILN_WATCH_NAMESPACES", "").split(",") if ns.strip())
        return cls(
            trainer_image=text("KILN_TRAINER_IMAGE", defaults.trainer_image),
            trainer_gpu_image=text("KILN_TRAINER_GPU_IMAGE", defaults.trainer_gpu_image),
            serving_image=text("KILN_SERVING_IMAGE", defaults.serving_image),
            serving_gpu_image=text("KILN_SERVING_GPU_IMAGE", defaults.serving_gpu_image),
            image_pull_policy=pull_policy,
            artifacts_pvc=text("KILN_ARTIFACTS_PVC", defaults.artifacts_pvc),
            trainer_cpu=quantity("KILN_TRAINER_CPU"),
            trainer_memory=quantity("KILN_TRAINER_MEMORY"),
            serving_cpu=quantity("KILN_SERVING_CPU"),
            serving_memory=quantity("KILN_SERVING_MEMORY"),
            watch_namespaces=namespaces,
        )
