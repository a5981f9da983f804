"""The model server's objects: a Deployment running `kiln serve` on the artifacts volume, its Service and,
when the operator autoscales serving, a HorizontalPodAutoscaler.

All are applied server-side (field manager kiln-operator), so a `serving.*` edit that drops a field (a GPU
turned off, a CPU limit removed) removes it from the live object too.

Autoscaling (KILN_SERVING_HPA_*): an autoscaling/v2 HPA scales the Deployment on average CPU utilisation
between max(serving.replicas, the operator's minimum) and the operator's maximum. Utilisation is measured
against the CPU request, so a server without one (and a job scaled to serving.replicas 0) keeps its fixed
replicas and gets no HPA. While the HPA governs a Deployment the HPA owns `spec.replicas`: the operator
sets it only when it creates the Deployment (a POST at the HPA's minimum) and leaves it out of every
server-side apply. A field left out of an apply is reset to its default (1) if the applier owned it, so a
Deployment created before autoscaling was on first hands `replicas` to a second field manager
(`build_replicas_handoff`, the handoff the Kubernetes server-side apply docs describe).

With more than one replica (fixed or the HPA's minimum) a PodDisruptionBudget allows one server pod at a
time to be evicted voluntarily (drains, cluster autoscaler), so the endpoint never goes dark during one.
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
HPA_API_VERSION: Final = "autoscaling/v2"
HPA_KIND: Final = "HorizontalPodAutoscaler"
PDB_API_VERSION: Final = "policy/v1"
PDB_KIND: Final = "PodDisruptionBudget"
# The taint GPU node pools carry (GKE, AKS, the NVIDIA GPU operator's examples).
GPU_TOLERATION: Final = {"key": objects.GPU_RESOURCE, "operator": "Exists", "effect": "NoSchedule"}
# The field manager that keeps `spec.replicas` while the operator's own apply set lets go of it.
HANDOFF_MANAGER: Final = f"{objects.MANAGER}-replicas-handoff"


def server_args(owner: Owner, spec: api.TrainingJobSpec) -> list[str]:
    """`kiln serve`'s flags. `--variant` only when the user chose one: for `auto` the compile step decided
    once, in the model card, and a server given no `--variant` serves the card's selected variant."""
    serving = spec.serving
    chosen = [] if serving.variant == "auto" else ["--variant", serving.variant]
    args = [
        "serve",
        "--model-dir", objects.artifacts_dir(owner),
        *chosen,
        "--model-name", owner.name,
        "--host", "0.0.0.0",
        "--port", str(constants.SERVING_HTTP_PORT),
        "--max-batch-size", str(serving.max_batch_size),
        "--max-queue-delay-microseconds", str(serving.max_queue_delay_microseconds),
    ]  # fmt: skip
    if serving.gpu:
        args += ["--providers", "cuda,cpu"]
    return args


def gpu_placement(pod_spec: Manifest, spec: api.TrainingJobSpec) -> None:
    """Where GPU servers may run: tolerating the nvidia.com/gpu taint GPU pools carry (clusters without the
    ExtendedResourceToleration admission plugin do not add it), and, where serving sets no placement of its
    own, on a GPU trainer's nodeSelector and tolerations: the pool that trained the model serves it."""
    res = spec.resources
    on_gpus = res.gpus_per_worker > 0
    if "tolerations" not in pod_spec:
        pod_spec["tolerations"] = [dict(t) for t in res.tolerations or []] if on_gpus else []
    if GPU_TOLERATION not in pod_spec["tolerations"]:
        pod_spec["tolerations"].append(dict(GPU_TOLERATION))
    if "nodeSelector" not in pod_spec and on_gpus and res.node_selector:
        pod_spec["nodeSelector"] = dict(res.node_selector)


def _probe(path: str, period: int, failures: int) -> Manifest:
    return {"httpGet": {"path": path, "port": "http"}, "periodSeconds": period, "failureThreshold": failures}


def build_deployment(
    owner: Owner, spec: api.TrainingJobSpec, cfg: config.OperatorConfig, model: api.ModelStatus | None
) -> Manifest:
    """The server Deployment; a new model (``model.sha256`` in a pod annotation) or serving edit rolls it.

    Without `spec.replicas` when autoscaled: the HPA owns it (see the module docstring).
    """
    serving = spec.serving
    tmp_volume, tmp_mount = objects.tmp_volume()
    annotations = objects.prometheus_annotations(constants.SERVING_HTTP_PORT)
    if model is not None and model.sha256:
        annotations[MODEL_SHA_ANNOTATION] = model.sha256
    container: Manifest = {
        "name": objects.SERVING_CONTAINER,
        "image": serving.image or (cfg.serving_gpu_image if serving.gpu else cfg.serving_image),
        "imagePullPolicy": cfg.image_pull_policy,
        "command": ["kiln"],
        "args": server_args(owner, spec),
        "env": objects.home_env(),
        "ports": [
            {"name": "http", "containerPort": constants.SERVING_HTTP_PORT},
            {"name": "grpc", "containerPort": constants.SERVING_GRPC_PORT},
        ],
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
    volumes = [objects.artifacts_volume(spec.artifacts.volume, cfg.artifacts_pvc), tmp_volume]
    pod_spec = objects.offline_pod_spec(container, volumes, cfg.image_pull_secrets)  # the server needs no API
    pod_spec.update(objects.pod_placement(serving, objects.selector(owner.name, objects.SERVING)))
    if serving.gpu:
        gpu_placement(pod_spec, spec)
    replicas = {} if autoscaled(spec, cfg) else {"replicas": serving.replicas}
    return {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": objects.metadata(owner, objects.serving_name(owner.name), objects.SERVING),
        "spec": {
            **replicas,
            "revisionHistoryLimit": 3,
            "selector": {"matchLabels": objects.selector(owner.name, objects.SERVING)},
            "strategy": {"type": "RollingUpdate", "rollingUpdate": rolling},
            "template": {
                "metadata": objects.pod_metadata(serving, objects.labels(owner.name, objects.SERVING), annotations),
                "spec": pod_spec,
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
            "ports": [
                {"name": "http", "port": constants.SERVING_HTTP_PORT, "targetPort": "http"},
                # appProtocol lets meshes and gateways route HTTP/2 to it.
                {"name": "grpc", "port": constants.SERVING_GRPC_PORT, "targetPort": "grpc", "appProtocol": "grpc"},
            ],
        },
    }


def autoscaled(spec: api.TrainingJobSpec, cfg: config.OperatorConfig) -> bool:
    """Whether an HPA governs the server: autoscaling is on, serving is not scaled to zero, and the server has
    the CPU request utilisation is measured against."""
    serving = spec.serving
    return cfg.serving_hpa_enabled and serving.replicas > 0 and bool(serving.cpu or cfg.serving_cpu)


def build_autoscaler(owner: Owner, spec: api.TrainingJobSpec, cfg: config.OperatorConfig) -> Manifest:
    """The HPA of the server Deployment: its minimum is the larger of serving.replicas and the operator's, and
    its maximum never falls below that (the API refuses maxReplicas < minReplicas)."""
    minimum = minimum_replicas(spec, cfg)
    name = objects.serving_name(owner.name)
    return {
        "apiVersion": HPA_API_VERSION,
        "kind": HPA_KIND,
        "metadata": objects.metadata(owner, name, objects.SERVING),
        "spec": {
            "scaleTargetRef": {"apiVersion": "apps/v1", "kind": "Deployment", "name": name},
            "minReplicas": minimum,
            "maxReplicas": max(cfg.serving_hpa_max_replicas, minimum),
            "metrics": [
                {
                    "type": "Resource",
                    "resource": {
                        "name": "cpu",
                        "target": {"type": "Utilization", "averageUtilization": cfg.serving_hpa_target_cpu_utilization},
                    },
                }
            ],
        },
    }


def minimum_replicas(spec: api.TrainingJobSpec, cfg: config.OperatorConfig) -> int:
    """The fewest server replicas that run: serving.replicas, or the HPA's minimum when autoscaled."""
    if autoscaled(spec, cfg):
        return max(spec.serving.replicas, cfg.serving_hpa_min_replicas)
    return spec.serving.replicas


def needs_disruption_budget(spec: api.TrainingJobSpec, cfg: config.OperatorConfig) -> bool:
    """A budget only makes sense with a replica to spare; with one it would block every drain."""
    return minimum_replicas(spec, cfg) > 1


def build_disruption_budget(owner: Owner) -> Manifest:
    """At most one server pod voluntarily evicted at a time."""
    return {
        "apiVersion": PDB_API_VERSION,
        "kind": PDB_KIND,
        "metadata": objects.metadata(owner, objects.serving_name(owner.name), objects.SERVING),
        "spec": {"maxUnavailable": 1, "selector": {"matchLabels": objects.selector(owner.name, objects.SERVING)}},
    }


def autoscaler_matches(live: Mapping[str, Any], desired: Mapping[str, Any]) -> bool:
    """Whether a live HPA has the target, bounds and metric the desired one sets (fields the API server
    defaults are not compared)."""
    spec = live.get("spec") or {}
    return all(spec.get(key) == value for key, value in desired["spec"].items())


def with_replicas(deployment: Mapping[str, Any], replicas: int) -> Manifest:
    """The Deployment with `spec.replicas` set: what the operator creates (once) for an HPA to take over."""
    return {**deployment, "spec": {**deployment["spec"], "replicas": replicas}}


def applies_replicas(live: Mapping[str, Any]) -> bool:
    """Whether the operator's server-side apply set owns the live Deployment's `spec.replicas` (it created it
    before autoscaling was on), so leaving the field out of the next apply would reset it to 1."""
    for entry in (live.get("metadata") or {}).get("managedFields") or []:
        fields = (entry.get("fieldsV1") or {}).get("f:spec") or {}
        if entry.get("manager") == objects.MANAGER and entry.get("operation") == "Apply" and "f:replicas" in fields:
            return True
    return False


def build_replicas_handoff(live: Mapping[str, Any]) -> Manifest:
    """A partial Deployment holding only the live replica count, applied by HANDOFF_MANAGER so the field stays
    owned (at its current value) when the operator's own apply set leaves it out."""
    meta = live["metadata"]
    return {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": {"name": meta["name"], "namespace": meta["namespace"]},
        "spec": {"replicas": (live.get("spec") or {}).get("replicas", 1)},
    }
