"""The model server's objects: a Deployment running `kiln serve` on the artifacts volume and its Service.

Both are applied server-side (field manager kiln-operator), so a `serving.*` edit that drops a field (a GPU
turned off, a CPU limit removed) removes it from the live object too.
"""

from collections.abc import Mapping
from typing import Any, Final

from kiln import api
from kiln.api import constants
from kiln_operator import config, objects
from kiln_operator.objects import Manifest, Owner

MODEL_SHA_ANNOTATION: Final = f"{constants.GROUP}/model-sha256"
HEALTH_LIVE: Final = "/v2/health/live"
HEALTH_READY: Final = "/v2/health/ready"


def serving_variant(spec: api.TrainingJobSpec, model: Mapping[str, Any] | None) -> str:
    """The variant to serve: the requested one, or for 'auto' the one the trainer selected."""
    if spec.serving.variant != "auto":
        return spec.serving.variant
    variant = (model or {}).get("variant")
    return str(variant) if variant else "fp32"


def server_args(owner: Owner, spec: api.TrainingJobSpec, variant: str) -> list[str]:
    serving = spec.serving
    args = [
        "serve",
        "--model-dir", objects.artifacts_dir(owner.name, owner.namespace),
        "--variant", variant,
        "--model-name", owner.name,
        "--host", "0.0.0.0",
        "--port", str(constants.SERVING_HTTP_PORT),
        "--max-batch-size", str(serving.max_batch_size),
        "--max-queue-delay-microseconds", str(serving.max_queue_delay_microseconds),
    ]  # fmt: skip
    if serving.gpu:
        args += ["--providers", "cuda,cpu"]
    return args


def _probe(path: str, period: int, failures: int) -> Manifest:
    return {"httpGet": {"path": path, "port": "http"}, "periodSeconds": period, "failureThreshold": failures}


def build_deployment(
    owner: Owner, spec: api.TrainingJobSpec, cfg: config.OperatorConfig, model: Mapping[str, Any] | None
) -> Manifest:
    """The server Deployment; a new model (sha256 in a pod annotation) or serving edit rolls it."""
    serving = spec.serving
    tmp_volume, tmp_mount = objects.tmp_volume()
    annotations = objects.prometheus_annotations(constants.SERVING_HTTP_PORT)
    if model and model.get("sha256"):
        annotations[MODEL_SHA_ANNOTATION] = str(model["sha256"])
    container: Manifest = {
        "name": objects.SERVING_CONTAINER,
        "image": serving.image or (cfg.serving_gpu_image if serving.gpu else cfg.serving_image),
        "imagePullPolicy": cfg.image_pull_policy,
        "command": ["kiln"],
        "args": server_args(owner, spec, serving_variant(spec, model)),
        "env": objects.home_env(),
        "ports": [{"name": "http", "containerPort": constants.SERVING_HTTP_PORT}],
        "resources": objects.resources(
            serving.cpu or cfg.serving_cpu, serving.memory or cfg.serving_memory, 1 if serving.gpu else 0
        ),
        # Loading and warming a model can take a while; liveness only starts once startup succeeded.
        "startupProbe": _probe(HEALTH_LIVE, period=2, failures=90),
        "livenessProbe": _probe(HEALTH_LIVE, period=10, failures=3),
        "readinessProbe": _probe(HEALTH_READY, period=5, failures=3),
        "volumeMounts": [
            {"name": "artifacts", "mountPath": constants.ARTIFACTS_MOUNT, "readOnly": True},
            tmp_mount,
        ],
        "securityContext": objects.container_security_context(),
        "terminationMessagePolicy": "FallbackToLogsOnError",
    }
    # Surge a new pod before removing an old one (no downtime), except on GPUs, where a surge pod would wait
    # for a GPU the old pod holds.
    rolling = {"maxSurge": 0, "maxUnavailable": 1} if serving.gpu else {"maxSurge": 1, "maxUnavailable": 0}
    return {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": objects.metadata(owner, objects.serving_name(owner.name), objects.SERVING),
        "spec": {
            "replicas": serving.replicas,
            "revisionHistoryLimit": 3,
            "selector": {"matchLabels": objects.selector(owner.name, objects.SERVING)},
            "strategy": {"type": "RollingUpdate", "rollingUpdate": rolling},
            "template": {
                "metadata": {"labels": objects.labels(owner.name, objects.SERVING), "annotations": annotations},
                "spec": {
                    "automountServiceAccountToken": False,  # the server never talks to the API server
                    "enableServiceLinks": False,
                    "securityContext": objects.pod_security_context(),
                    "containers": [container],
                    "volumes": [
                        objects.artifacts_volume(spec.artifacts.volume, cfg.artifacts_pvc),
                        tmp_volume,
                    ],
                },
            },
        },
    }


def build_service(owner: Owner) -> Manifest:
    """The stable in-cluster address in status.endpoint."""
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": objects.metadata(owner, objects.serving_name(owner.name), objects.SERVING),
        "spec": {
            "type": "ClusterIP",
            "selector": objects.selector(owner.name, objects.SERVING),
            "ports": [{"name": "http", "port": constants.SERVING_HTTP_PORT, "targetPort": "http"}],
        },
    }
