"""The operator's configuration, read once from the environment the Helm chart sets."""

import dataclasses
import os
import re
from collections.abc import Mapping

PULL_POLICIES = ("Always", "IfNotPresent", "Never")
# A Kubernetes quantity such as "2", "500m", "4Gi" or "1.5".
_QUANTITY = re.compile(r"^[0-9]+(\.[0-9]+)?([numkKMGTPE]|[KMGTPE]i|[eE][0-9]+)?$")
# A Secret name: a DNS-1123 subdomain.
_SECRET_NAME = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$")
_BOOLEANS = {"true": True, "false": False}


class ConfigError(ValueError):
    """An environment variable the operator cannot use; the message names it."""


@dataclasses.dataclass(frozen=True)
class OperatorConfig:
    """What goes into the pods and objects the operator builds, and the namespaces it watches."""

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
    # Secrets (in each TrainingJob's namespace) trainer and serving pods pull their images with.
    image_pull_secrets: tuple[str, ...] = ()
    # A CPU-utilisation HorizontalPodAutoscaler beside each serving Deployment (see serving_objects).
    serving_hpa_enabled: bool = False
    serving_hpa_min_replicas: int = 1
    serving_hpa_max_replicas: int = 4
    serving_hpa_target_cpu_utilization: int = 70
    # How long after training the trainer may take to report status.model before the job is Failed.
    export_deadline_seconds: int = 1800
    # What TrainingJobs may ask for (see policy): hostPath volumes, and image overrides anywhere or only under
    # these registry prefixes.
    allow_host_path: bool = False
    allow_image_overrides: bool = False
    allowed_image_prefixes: tuple[str, ...] = ()

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

        def flag(var: str, default: bool) -> bool:
            value = env.get(var, "").strip().lower()
            if value and value not in _BOOLEANS:
                raise ConfigError(f"{var}={env[var]!r} must be true or false")
            return _BOOLEANS.get(value, default)

        def integer(var: str, default: int, low: int, high: int) -> int:
            value = env.get(var, "").strip()
            if not value:
                return default
            if not re.fullmatch("[0-9]+", value) or not low <= int(value) <= high:
                raise ConfigError(f"{var}={value!r} must be a whole number from {low} to {high}")
            return int(value)

        pull_policy = text("KILN_IMAGE_PULL_POLICY", defaults.image_pull_policy)
        if pull_policy not in PULL_POLICIES:
            raise ConfigError(f"KILN_IMAGE_PULL_POLICY={pull_policy!r} must be one of {', '.join(PULL_POLICIES)}")
        namespaces = tuple(ns.strip() for ns in env.get("KILN_WATCH_NAMESPACES", "").split(",") if ns.strip())
        secrets = tuple(
            dict.fromkeys(n.strip() for n in env.get("KILN_IMAGE_PULL_SECRETS", "").split(",") if n.strip())
        )
        for secret in secrets:
            if len(secret) > 253 or not _SECRET_NAME.match(secret):
                raise ConfigError(f"KILN_IMAGE_PULL_SECRETS: {secret!r} is not a Secret name (a DNS-1123 subdomain)")
        min_replicas = integer("KILN_SERVING_HPA_MIN_REPLICAS", defaults.serving_hpa_min_replicas, 1, 1000)
        max_replicas = integer("KILN_SERVING_HPA_MAX_REPLICAS", defaults.serving_hpa_max_replicas, 1, 1000)
        if max_replicas < min_replicas:
            raise ConfigError(
                f"KILN_SERVING_HPA_MAX_REPLICAS={max_replicas} is below KILN_SERVING_HPA_MIN_REPLICAS={min_replicas}"
            )
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
            image_pull_secrets=secrets,
            serving_hpa_enabled=flag("KILN_SERVING_HPA_ENABLED", defaults.serving_hpa_enabled),
            serving_hpa_min_replicas=min_replicas,
            serving_hpa_max_replicas=max_replicas,
            serving_hpa_target_cpu_utilization=integer(
                "KILN_SERVING_HPA_TARGET_CPU_UTILIZATION", defaults.serving_hpa_target_cpu_utilization, 1, 100
            ),
            export_deadline_seconds=integer(
                "KILN_EXPORT_DEADLINE_SECONDS", defaults.export_deadline_seconds, 1, 7 * 24 * 3600
            ),
            allow_host_path=flag("KILN_ALLOW_HOST_PATH", defaults.allow_host_path),
            allow_image_overrides=flag("KILN_ALLOW_IMAGE_OVERRIDES", defaults.allow_image_overrides),
            allowed_image_prefixes=tuple(
                p.strip() for p in env.get("KILN_ALLOWED_IMAGE_PREFIXES", "").split(",") if p.strip()
            ),
        )
