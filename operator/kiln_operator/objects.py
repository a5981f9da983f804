"""Parts every child object shares: deterministic names, labels, the owner reference, pod security.

Names are derived from the TrainingJob's name only (the artifacts folder also from its uid), so a restarted
operator finds (and never duplicates) what it created before; creation treats 409 AlreadyExists as success.
"""

import dataclasses
from collections.abc import Iterable, Mapping
from typing import Any, Final

from kiln import api
from kiln.api import constants

Manifest = dict[str, Any]  # a Kubernetes object as JSON-like data; the operator's one alias for it

# A trainer pod's hostname is "<name>-trainer-<index>" and must stay a DNS label (63 characters) for up to
# 1024 workers, so TrainingJob names are capped here rather than truncated into possible collisions.
MAX_NAME_LENGTH: Final = 50
MANAGER: Final = "kiln-operator"  # the managed-by label value and the server-side apply field manager
# The Job controller's annotation on an Indexed Job's pods: the trainer's rank.
COMPLETION_INDEX_ANNOTATION: Final = "batch.kubernetes.io/job-completion-index"
LABEL_NAME: Final = "app.kubernetes.io/name"
LABEL_INSTANCE: Final = "app.kubernetes.io/instance"
LABEL_MANAGED_BY: Final = "app.kubernetes.io/managed-by"
TRAINER: Final = "trainer"
SERVING: Final = "serving"
# The container names the status logic reads exit codes and waiting reasons from.
TRAINER_CONTAINER: Final = "trainer"
SERVING_CONTAINER: Final = "server"
GPU_RESOURCE: Final = "nvidia.com/gpu"
USER_ID: Final = 1000
# On a trainer Job the operator suspended for runPolicy.suspend: only such a Job is the operator's to resume.
SUSPENDED_BY_USER_ANNOTATION: Final = f"{constants.GROUP}/suspended-by-user"
# The trainer's trainingjob.yaml travels in its pod template under this annotation and reaches the container
# as a file through a downwardAPI volume: no ConfigMap to create (one API write fewer before the Job).
TRAINER_CONFIG_ANNOTATION: Final = f"{constants.GROUP}/trainingjob-config"


@dataclasses.dataclass(frozen=True)
class Owner:
    """The TrainingJob every child points back to; its uid makes garbage collection exact."""

    name: str
    namespace: str
    uid: str

    @classmethod
    def from_body(cls, body: Mapping[str, Any]) -> "Owner":
        meta = body["metadata"]
        return cls(name=meta["name"], namespace=meta["namespace"], uid=meta["uid"])


def is_queued(job: Mapping[str, Any]) -> bool:
    """Whether a Job is submitted to a Kueue LocalQueue, so Kueue (not the operator) owns its spec.suspend."""
    return bool(((job.get("metadata") or {}).get("labels") or {}).get(constants.KUEUE_QUEUE_LABEL))


def suspended_by_user(job: Mapping[str, Any]) -> bool:
    """Whether the operator holds this Job for runPolicy.suspend."""
    return SUSPENDED_BY_USER_ANNOTATION in ((job.get("metadata") or {}).get("annotations") or {})


def service_account_name(name: str) -> str:
    """ServiceAccount, Role and RoleBinding share this name."""
    return f"{name}-trainer"


def job_name(name: str) -> str:
    return f"{name}-trainer"


def workers_service_name(name: str) -> str:
    """The headless Service giving trainer pods stable DNS names when there are several workers."""
    return f"{name}-workers"


def serving_name(name: str) -> str:
    """Deployment and Service of the model server share this name."""
    return f"{name}-serving"


def endpoint(name: str, namespace: str) -> str:
    """The in-cluster Open Inference Protocol URL of the served model."""
    return f"http://{serving_name(name)}.{namespace}.svc:{constants.SERVING_HTTP_PORT}/v2/models/{name}"


def artifacts_dir(owner: Owner) -> str:
    """Where a job's checkpoints, compiled models and model card live on the artifacts volume. The uid makes
    it this TrainingJob's own: one re-created under the same name starts clean, never on old checkpoints."""
    return f"{constants.ARTIFACTS_MOUNT}/{owner.namespace}/{owner.name}/{owner.uid}"


def check_name(name: str) -> None:
    """Refuse names whose derived child names would not be valid DNS labels."""
    if len(name) > MAX_NAME_LENGTH:
        raise ValueError(
            f"metadata.name: {len(name)} characters is too long; at most {MAX_NAME_LENGTH} so trainer pod "
            f"hostnames ('{job_name('<name>')}-<index>') stay valid DNS labels"
        )


def labels(name: str, component: str) -> dict[str, str]:
    """Recommended Kubernetes labels plus the one the operator watches children by."""
    return {
        LABEL_NAME: "kiln",
        LABEL_INSTANCE: name,
        constants.LABEL_COMPONENT: component,
        LABEL_MANAGED_BY: MANAGER,
        constants.LABEL_TRAININGJOB: name,
    }


def selector(name: str, component: str) -> dict[str, str]:
    """The immutable subset of labels that selects a component's pods."""
    return {constants.LABEL_TRAININGJOB: name, constants.LABEL_COMPONENT: component}


def label_selector(name: str, component: str) -> str:
    """The same selector as a query string for list calls."""
    return ",".join(f"{k}={v}" for k, v in selector(name, component).items())


def metadata(owner: Owner, name: str, component: str, annotations: Mapping[str, str] | None = None) -> Manifest:
    """Metadata of a child: namespaced, labelled and adopted (controller owner, blocks owner deletion)."""
    meta: Manifest = {
        "name": name,
        "namespace": owner.namespace,
        "labels": labels(owner.name, component),
        "ownerReferences": [
            {
                "apiVersion": constants.API_VERSION,
                "kind": constants.KIND,
                "name": owner.name,
                "uid": owner.uid,
                "controller": True,
                "blockOwnerDeletion": True,
            }
        ],
    }
    if annotations:
        meta["annotations"] = dict(annotations)
    return meta


def pod_security_context() -> Manifest:
    """The restricted Pod Security Standard: non-root, fixed uid/gid, RuntimeDefault seccomp."""
    return {
        "runAsNonRoot": True,
        "runAsUser": USER_ID,
        "runAsGroup": USER_ID,
        "fsGroup": USER_ID,
        "seccompProfile": {"type": "RuntimeDefault"},
    }


def container_security_context() -> Manifest:
    """No privilege escalation, no capabilities, a read-only root file system (writes go to /tmp)."""
    return {
        "allowPrivilegeEscalation": False,
        "readOnlyRootFilesystem": True,
        "runAsNonRoot": True,
        "capabilities": {"drop": ["ALL"]},
    }


def tmp_volume() -> tuple[Manifest, Manifest]:
    """The writable emptyDir at /tmp that a read-only root file system needs (HOME and TMPDIR point here)."""
    return {"name": "tmp", "emptyDir": {}}, {"name": "tmp", "mountPath": "/tmp"}


def home_env() -> list[Manifest]:
    return [{"name": "HOME", "value": "/tmp"}, {"name": "TMPDIR", "value": "/tmp"}]


def resources(cpu: str | None, memory: str | None, gpus: int) -> Manifest:
    """Requests equal limits for CPU and memory (Guaranteed when both are set); GPUs are limits only."""
    amounts: dict[str, str] = {}
    if cpu:
        amounts["cpu"] = cpu
    if memory:
        amounts["memory"] = memory
    limits = dict(amounts)
    if gpus:
        limits[GPU_RESOURCE] = str(gpus)
    result: Manifest = {}
    if amounts:
        result["requests"] = amounts
    if limits:
        result["limits"] = limits
    return result


def prometheus_annotations(port: int) -> dict[str, str]:
    """The conventional scrape annotations Prometheus' kubernetes_sd relabelling reads."""
    return {"prometheus.io/scrape": "true", "prometheus.io/port": str(port), "prometheus.io/path": "/metrics"}


def image_pull_secrets(names: Iterable[str]) -> list[Manifest]:
    """A pod's imagePullSecrets: references to Secrets in the pod's own namespace."""
    return [{"name": name} for name in names]


def offline_pod_spec(container: Manifest, volumes: list[Manifest], pull_secrets: Iterable[str]) -> Manifest:
    """A pod that never talks to the API server (no token, no service links), restricted, pulling with the
    operator's secrets: the model server's and the artifacts cleanup's."""
    pod_spec: Manifest = {
        "automountServiceAccountToken": False,
        "enableServiceLinks": False,
        "securityContext": pod_security_context(),
        "containers": [container],
        "volumes": volumes,
    }
    secrets = image_pull_secrets(pull_secrets)
    if secrets:
        pod_spec["imagePullSecrets"] = secrets
    return pod_spec


def artifacts_volume(volume: Mapping[str, Any] | None, default_pvc: str) -> Manifest:
    """The artifacts volume: the spec's volume source, else the operator's PVC."""
    source = dict(volume) if volume else {"persistentVolumeClaim": {"claimName": default_pvc}}
    return {"name": "artifacts", **source}


def pod_placement(placement: api.PodPlacement, own_selector: Mapping[str, str]) -> Manifest:
    """The pod spec fields a component's placement sets; a spread constraint without labelSelector spreads the
    component's own pods (what a user writing one for this job means)."""
    fields: Manifest = {}
    if placement.node_selector:
        fields["nodeSelector"] = dict(placement.node_selector)
    if placement.tolerations:
        fields["tolerations"] = [dict(t) for t in placement.tolerations]
    if placement.affinity:
        fields["affinity"] = dict(placement.affinity)
    if placement.topology_spread_constraints:
        fields["topologySpreadConstraints"] = [
            {"labelSelector": {"matchLabels": dict(own_selector)}, **c} for c in placement.topology_spread_constraints
        ]
    if placement.priority_class_name:
        fields["priorityClassName"] = placement.priority_class_name
    return fields


def pod_metadata(placement: api.PodPlacement, labels: Mapping[str, str], annotations: Mapping[str, str]) -> Manifest:
    """A pod template's metadata: the user's extra labels and annotations under the operator's own, which win
    (selectors and scrape annotations must stay what the operator relies on)."""
    meta: Manifest = {"labels": {**(placement.pod_labels or {}), **labels}}
    merged = {**(placement.pod_annotations or {}), **annotations}
    if merged:
        meta["annotations"] = merged
    return meta
