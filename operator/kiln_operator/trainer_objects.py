"""The trainer's objects: ServiceAccount, Job, Role + RoleBinding and headless Service.

Creation order keeps the API writes before the Job to one: the ServiceAccount (a pod cannot be created
without it); the trainer's config rides in the pod template (objects.TRAINER_CONFIG_ANNOTATION, mounted by
a downwardAPI volume); the headless Service follows the Job at once, before any of its pods can start. The
Role and RoleBinding (AFTER_START) come with the first reconcile: the trainer needs them only to report
its progress, which it retries.

Semantics with several workers (the Job is Indexed, completions = parallelism = workers, restartPolicy Never):
- The Job succeeds only when every index succeeded; rank 0 writes the model, the others must finish too.
- A worker that fails is replaced by a new pod with the same index once it has fully terminated
  (podReplacementPolicy Failed, so a stale rank never shares its DNS name with its replacement). Its peers
  notice within seconds (the trainer's heartbeat watchdog, or a broken collective) and exit with
  EXIT_PEER_LOST (75), which the podFailurePolicy ignores: they are replaced too and the whole group resumes
  from the last checkpoint, and the incident counts one failure, the lost worker's, against backoffLimit
  (= runPolicy.backoffLimit, the retries of the whole gang).
- Exit code 78 (invalid config or data) fails the Job at once; evictions and preemptions
  (DisruptionTarget) are retried without counting against the limit.
- With resources.processesPerWorker > 1 each pod runs one trainer process per local rank (the launcher in
  `kiln train` spawns them): WORLD_SIZE is workers x processes, GROUP_RANK the pod's index, and every process
  derives RANK = GROUP_RANK x LOCAL_WORLD_SIZE + LOCAL_RANK, as torchrun does.

Queues (Kueue): a TrainingJob labelled kueue.x-k8s.io/queue-name gets a Job with the same label, created
suspended, as Kueue's own integrations create theirs; Kueue unsuspends it on admission (no webhook needed).
The operator never resumes a Job it did not suspend itself: a Job it suspends for runPolicy.suspend carries
objects.SUSPENDED_BY_USER_ANNOTATION, and only such a Job is resumed when runPolicy.suspend turns false.
"""

from collections.abc import Mapping
from typing import Any, Final

import yaml

from kiln import api
from kiln.api import constants
from kiln_operator import config, objects
from kiln_operator.objects import Manifest, Owner

# /dev/shm beyond the DataLoader's batches: NCCL's shared-memory transport on GPUs, slack on CPUs.
SHM_BASE_MIB: Final = {True: 1024, False: 256}
# libyaml's emitter when PyYAML has it (its wheels do): the document is written for every Job built.
DUMPER: Final = getattr(yaml, "CSafeDumper", yaml.SafeDumper)
# TrainingJob labels that travel to the Job, where Kueue's Job integration reads them.
QUEUE_LABELS: Final = (constants.KUEUE_QUEUE_LABEL, constants.KUEUE_PRIORITY_LABEL)


def queue_labels(trainingjob_labels: Mapping[str, str] | None) -> dict[str, str]:
    """The Kueue labels of a TrainingJob (its LocalQueue and WorkloadPriorityClass), for its Job."""
    return {k: v for k, v in (trainingjob_labels or {}).items() if k in QUEUE_LABELS and v}


def trainingjob_document(owner: Owner, spec: api.TrainingJobSpec) -> str:
    """The trainingjob.yaml the trainer reads: the whole TrainingJob with its validated spec."""
    body = {
        "apiVersion": constants.API_VERSION,
        "kind": constants.KIND,
        "metadata": {"name": owner.name, "namespace": owner.namespace},
        "spec": spec.to_dict(),
    }
    return yaml.dump(body, Dumper=DUMPER, sort_keys=False)


def build_service_account(owner: Owner) -> Manifest:
    return {
        "apiVersion": "v1",
        "kind": "ServiceAccount",
        "metadata": objects.metadata(owner, objects.service_account_name(owner.name), objects.TRAINER),
        "automountServiceAccountToken": True,
    }


def build_role(owner: Owner) -> Manifest:
    """Lets the trainer read this one TrainingJob and patch its status, nothing else: never its spec."""
    return {
        "apiVersion": "rbac.authorization.k8s.io/v1",
        "kind": "Role",
        "metadata": objects.metadata(owner, objects.service_account_name(owner.name), objects.TRAINER),
        "rules": [
            {
                "apiGroups": [constants.GROUP],
                "resources": [constants.PLURAL],
                "resourceNames": [owner.name],
                "verbs": ["get"],
            },
            {
                "apiGroups": [constants.GROUP],
                "resources": [f"{constants.PLURAL}/status"],
                "resourceNames": [owner.name],
                "verbs": ["get", "patch"],
            },
        ],
    }


def build_role_binding(owner: Owner) -> Manifest:
    name = objects.service_account_name(owner.name)
    return {
        "apiVersion": "rbac.authorization.k8s.io/v1",
        "kind": "RoleBinding",
        "metadata": objects.metadata(owner, name, objects.TRAINER),
        "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": name},
        "subjects": [{"kind": "ServiceAccount", "name": name, "namespace": owner.namespace}],
    }


def build_workers_service(owner: Owner) -> Manifest:
    """Headless, and publishing not-ready pods, so rank 0's DNS name resolves as soon as its pod exists."""
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": objects.metadata(owner, objects.workers_service_name(owner.name), objects.TRAINER),
        "spec": {
            "clusterIP": "None",
            "selector": objects.selector(owner.name, objects.TRAINER),
            "publishNotReadyAddresses": True,
            "ports": [{"name": "ddp", "port": constants.DDP_MASTER_PORT, "targetPort": constants.DDP_MASTER_PORT}],
        },
    }


def master_address(owner: Owner, workers: int) -> str:
    """Rank 0's stable address: its pod's DNS name under the headless Service, or loopback in a single pod."""
    if workers == 1:
        return "127.0.0.1"
    return f"{objects.job_name(owner.name)}-0.{objects.workers_service_name(owner.name)}.{owner.namespace}.svc"


def _trainer_env(owner: Owner, spec: api.TrainingJobSpec) -> list[Manifest]:
    workers, processes = spec.resources.workers, api.processes_per_worker(spec.resources)
    index: Manifest = {
        "valueFrom": {"fieldRef": {"fieldPath": f"metadata.annotations['{objects.COMPLETION_INDEX_ANNOTATION}']"}}
    }
    # One process per pod is rank = index itself; with several the launcher derives each RANK and LOCAL_RANK.
    ranks: list[Manifest] = [{"name": "RANK", **index}, {"name": "LOCAL_RANK", "value": "0"}] if processes == 1 else []
    return [
        {"name": constants.ENV_TRAININGJOB_NAME, "value": owner.name},
        {"name": constants.ENV_TRAININGJOB_NAMESPACE, "value": owner.namespace},
        {"name": "WORLD_SIZE", "value": str(workers * processes)},
        {"name": "GROUP_RANK", **index},
        {"name": "LOCAL_WORLD_SIZE", "value": str(processes)},
        *ranks,
        {"name": "MASTER_ADDR", "value": master_address(owner, workers)},
        {"name": "MASTER_PORT", "value": str(constants.DDP_MASTER_PORT)},
        {"name": "PYTHONUNBUFFERED", "value": "1"},
        *objects.home_env(),
        *(var.model_dump(mode="json", by_alias=True, exclude_none=True) for var in spec.resources.env or []),
    ]


def _trainer_volumes(
    owner: Owner, spec: api.TrainingJobSpec, cfg: config.OperatorConfig
) -> tuple[list[Manifest], list[Manifest]]:
    tmp_volume, tmp_mount = objects.tmp_volume()
    volumes: list[Manifest] = [
        {
            "name": "config",
            "downwardAPI": {
                "items": [
                    {
                        "path": constants.CONFIG_FILE,
                        "fieldRef": {"fieldPath": f"metadata.annotations['{objects.TRAINER_CONFIG_ANNOTATION}']"},
                    }
                ]
            },
        },
        objects.artifacts_volume(spec.artifacts.volume, cfg.artifacts_pvc),
        tmp_volume,
    ]
    mounts: list[Manifest] = [
        {"name": "config", "mountPath": constants.CONFIG_MOUNT, "readOnly": True},
        {"name": "artifacts", "mountPath": constants.ARTIFACTS_MOUNT},
        tmp_mount,
    ]
    if spec.data.volume:
        volumes.append({"name": "data", **spec.data.volume})
        mounts.append({"name": "data", "mountPath": constants.DATA_MOUNT, "readOnly": True})
    if spec.model.weights_volume:
        volumes.append({"name": "weights", **spec.model.weights_volume})
        mounts.append({"name": "weights", "mountPath": constants.WEIGHTS_MOUNT, "readOnly": True})
    # DataLoader workers (and NCCL) exchange tensors through /dev/shm; the runtime's 64 MiB is too small.
    volumes.append({"name": "dshm", "emptyDir": {"medium": "Memory", "sizeLimit": shm_size(spec)}})
    mounts.append({"name": "dshm", "mountPath": "/dev/shm"})
    return volumes, mounts


def shm_size(spec: api.TrainingJobSpec) -> str:
    """/dev/shm for a trainer pod: each trainer process's loader batches in flight with a quarter on top, plus
    SHM_BASE_MIB.
    It is memory: what is used counts against the pod's memory limit."""
    in_flight = api.loader_bytes_in_flight(spec) * api.processes_per_worker(spec.resources)
    loader_mib = -(-in_flight * 5 // 4 // 2**20)
    return f"{loader_mib + SHM_BASE_MIB[spec.resources.gpus_per_worker > 0]}Mi"


def trainer_args(owner: Owner) -> list[str]:
    return [
        "train",
        "--config", f"{constants.CONFIG_MOUNT}/{constants.CONFIG_FILE}",
        "--output", objects.artifacts_dir(owner),
        "--metrics-port", str(constants.TRAINER_METRICS_PORT),
    ]  # fmt: skip


# Job fields the API server lets an existing Job change, and runPolicy sets (suspend aside: the reconciler's
# suspend_patch).
MUTABLE_JOB_FIELDS: Final = ("activeDeadlineSeconds", "backoffLimit", "ttlSecondsAfterFinished")


def run_policy_fields(spec: api.TrainingJobSpec) -> Manifest:
    """The MUTABLE_JOB_FIELDS runPolicy sets (those it leaves unset are absent)."""
    policy = spec.run_policy
    fields: Manifest = {"backoffLimit": policy.backoff_limit}
    if policy.active_deadline_seconds is not None:
        fields["activeDeadlineSeconds"] = policy.active_deadline_seconds
    if policy.ttl_seconds_after_finished is not None:
        fields["ttlSecondsAfterFinished"] = policy.ttl_seconds_after_finished
    return fields


def job_patch(wanted: Mapping[str, object], live: Mapping[str, Any]) -> Manifest:
    """The merge patch of a live Job's MUTABLE_JOB_FIELDS to `wanted` (run_policy_fields; None removes one)."""
    have = live.get("spec") or {}
    return {k: wanted.get(k) for k in MUTABLE_JOB_FIELDS if have.get(k) != wanted.get(k)}


def build_job(
    owner: Owner, spec: api.TrainingJobSpec, cfg: config.OperatorConfig, labels: Mapping[str, str] | None = None
) -> Manifest:
    """The Indexed trainer Job; see the module docstring for its multi-worker and queueing semantics.

    `labels` are the TrainingJob's own; its Kueue labels are copied onto the Job.
    """
    res, policy = spec.resources, spec.run_policy
    workers, gpus = res.workers, res.gpus_per_worker
    volumes, mounts = _trainer_volumes(owner, spec, cfg)
    ports = [{"name": "metrics", "containerPort": constants.TRAINER_METRICS_PORT}]
    if workers > 1:
        ports.append({"name": "ddp", "containerPort": constants.DDP_MASTER_PORT})
    container: Manifest = {
        "name": objects.TRAINER_CONTAINER,
        "image": res.image or (cfg.trainer_gpu_image if gpus else cfg.trainer_image),
        "imagePullPolicy": cfg.image_pull_policy,
        # Explicit: the test node agent runs pods as local processes and cannot read image entrypoints.
        "command": ["kiln"],
        "args": trainer_args(owner),
        "env": _trainer_env(owner, spec),
        "ports": ports,
        "resources": objects.resources(res.cpu or cfg.trainer_cpu, res.memory or cfg.trainer_memory, gpus),
        "volumeMounts": mounts,
        "securityContext": objects.container_security_context(),
        "terminationMessagePolicy": "FallbackToLogsOnError",
    }
    pod_spec: Manifest = {
        "restartPolicy": "Never",  # required by podFailurePolicy; retries are new pods
        "serviceAccountName": objects.service_account_name(owner.name),
        "automountServiceAccountToken": True,
        "enableServiceLinks": False,
        "securityContext": objects.pod_security_context(),
        "containers": [container],
        "volumes": volumes,
    }
    if cfg.image_pull_secrets:
        pod_spec["imagePullSecrets"] = objects.image_pull_secrets(cfg.image_pull_secrets)
    if workers > 1:
        pod_spec["subdomain"] = objects.workers_service_name(owner.name)
    pod_spec.update(objects.pod_placement(res, objects.selector(owner.name, objects.TRAINER)))
    queue = queue_labels(labels)
    job_spec: Manifest = {
        "completionMode": "Indexed",
        "completions": workers,
        "parallelism": workers,
        "suspend": policy.suspend or bool(queue),
        "podReplacementPolicy": "Failed",
        "podFailurePolicy": {
            "rules": [
                {
                    "action": "FailJob",
                    "onExitCodes": {
                        "containerName": objects.TRAINER_CONTAINER,
                        "operator": "In",
                        "values": [constants.EXIT_CONFIG_ERROR],
                    },
                },
                {
                    "action": "Ignore",
                    "onExitCodes": {
                        "containerName": objects.TRAINER_CONTAINER,
                        "operator": "In",
                        "values": [constants.EXIT_PEER_LOST],
                    },
                },
                {"action": "Ignore", "onPodConditions": [{"type": "DisruptionTarget", "status": "True"}]},
            ]
        },
        "template": {
            "metadata": objects.pod_metadata(
                res,
                objects.labels(owner.name, objects.TRAINER),
                objects.prometheus_annotations(constants.TRAINER_METRICS_PORT)
                | {objects.TRAINER_CONFIG_ANNOTATION: trainingjob_document(owner, spec)},
            ),
            "spec": pod_spec,
        },
    }
    job_spec.update(run_policy_fields(spec))
    held = {objects.SUSPENDED_BY_USER_ANNOTATION: "true"} if policy.suspend and not queue else None
    metadata = objects.metadata(owner, objects.job_name(owner.name), objects.TRAINER, held)
    metadata["labels"].update(queue)
    return {"apiVersion": "batch/v1", "kind": "Job", "metadata": metadata, "spec": job_spec}


# Every kind build_trainer_objects makes, and those that may follow the Job's creation by a while: the
# trainer needs its Role and RoleBinding only to report status, and retries that.
TRAINER_KINDS: Final = ("ServiceAccount", "Job", "Service", "Role", "RoleBinding")
AFTER_START: Final = ("Role", "RoleBinding")


def build_trainer_objects(
    owner: Owner, spec: api.TrainingJobSpec, cfg: config.OperatorConfig, labels: Mapping[str, str] | None = None
) -> list[Manifest]:
    """Everything training needs, in creation order (see the module docstring: one write before the Job)."""
    children = [build_service_account(owner), build_job(owner, spec, cfg, labels)]
    if spec.resources.workers > 1:
        children.append(build_workers_service(owner))
    return [*children, build_role(owner), build_role_binding(owner)]
