"""The trainer's objects: ConfigMap, ServiceAccount + Role + RoleBinding, headless Service and Job.

Semantics with several workers (the Job is Indexed, completions = parallelism = workers, restartPolicy Never):
- The Job succeeds only when every index succeeded; rank 0 writes the model, the others must finish too.
- A worker that fails is replaced by a new pod with the same index once it has fully terminated
  (podReplacementPolicy Failed, so a stale rank never shares its DNS name with its replacement). Its peers
  usually fail as well when their collective operations break, and every replacement resumes from the last
  checkpoint. One incident can thus cost up to `workers` pod failures, so the Job's backoffLimit is
  runPolicy.backoffLimit x workers: runPolicy.backoffLimit counts retries of the whole gang.
- Exit code 78 (invalid config or data) fails the Job at once; evictions and preemptions
  (DisruptionTarget) are retried without counting against the limit.
"""

from typing import Final

import yaml

from kiln import api
from kiln.api import constants
from kiln_operator import config, objects
from kiln_operator.objects import Manifest, Owner

COMPLETION_INDEX_ANNOTATION: Final = "batch.kubernetes.io/job-completion-index"
GPU_SHM_SIZE: Final = "2Gi"


def trainingjob_document(owner: Owner, spec: api.TrainingJobSpec) -> str:
    """The trainingjob.yaml the trainer reads: the whole TrainingJob with its validated spec."""
    body = {
        "apiVersion": constants.API_VERSION,
        "kind": constants.KIND,
        "metadata": {"name": owner.name, "namespace": owner.namespace},
        "spec": spec.to_dict(),
    }
    return yaml.safe_dump(body, sort_keys=False)


def build_config_map(owner: Owner, spec: api.TrainingJobSpec) -> Manifest:
    return {
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": objects.metadata(owner, objects.config_map_name(owner.name), objects.TRAINER),
        "data": {constants.CONFIG_FILE: trainingjob_document(owner, spec)},
    }


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
    """Rank 0's stable address: its pod's DNS name under the headless Service, or loopback alone."""
    if workers == 1:
        return "127.0.0.1"
    return f"{objects.job_name(owner.name)}-0.{objects.workers_service_name(owner.name)}.{owner.namespace}.svc"


def _trainer_env(owner: Owner, workers: int) -> list[Manifest]:
    rank_ref = f"metadata.annotations['{COMPLETION_INDEX_ANNOTATION}']"
    return [
        {"name": constants.ENV_TRAININGJOB_NAME, "value": owner.name},
        {"name": constants.ENV_TRAININGJOB_NAMESPACE, "value": owner.namespace},
        {"name": "WORLD_SIZE", "value": str(workers)},
        {"name": "RANK", "valueFrom": {"fieldRef": {"fieldPath": rank_ref}}},
        {"name": "LOCAL_RANK", "value": "0"},
        {"name": "MASTER_ADDR", "value": master_address(owner, workers)},
        {"name": "MASTER_PORT", "value": str(constants.DDP_MASTER_PORT)},
        {"name": "PYTHONUNBUFFERED", "value": "1"},
        *objects.home_env(),
    ]


def _trainer_volumes(
    owner: Owner, spec: api.TrainingJobSpec, cfg: config.OperatorConfig
) -> tuple[list[Manifest], list[Manifest]]:
    tmp_volume, tmp_mount = objects.tmp_volume()
    volumes: list[Manifest] = [
        {"name": "config", "configMap": {"name": objects.config_map_name(owner.name)}},
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
    if spec.resources.gpus_per_worker:
        # NCCL and DataLoader workers exchange tensors through /dev/shm; the runtime's 64 MiB is too small.
        volumes.append({"name": "dshm", "emptyDir": {"medium": "Memory", "sizeLimit": GPU_SHM_SIZE}})
        mounts.append({"name": "dshm", "mountPath": "/dev/shm"})
    return volumes, mounts


def trainer_args(owner: Owner) -> list[str]:
    return [
        "train",
        "--config", f"{constants.CONFIG_MOUNT}/{constants.CONFIG_FILE}",
        "--output", objects.artifacts_dir(owner.name, owner.namespace),
        "--metrics-port", str(constants.TRAINER_METRICS_PORT),
    ]  # fmt: skip


def build_job(owner: Owner, spec: api.TrainingJobSpec, cfg: config.OperatorConfig) -> Manifest:
    """The Indexed trainer Job; see the module docstring for its multi-worker semantics."""
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
        "env": _trainer_env(owner, workers),
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
    if res.node_selector:
        pod_spec["nodeSelector"] = dict(res.node_selector)
    if res.tolerations:
        pod_spec["tolerations"] = [dict(t) for t in res.tolerations]
    if res.priority_class_name:
        pod_spec["priorityClassName"] = res.priority_class_name
    job_spec: Manifest = {
        "completionMode": "Indexed",
        "completions": workers,
        "parallelism": workers,
        "backoffLimit": policy.backoff_limit * workers,
        "suspend": policy.suspend,
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
                {"action": "Ignore", "onPodConditions": [{"type": "DisruptionTarget", "status": "True"}]},
            ]
        },
        "template": {
            "metadata": {
                "labels": objects.labels(owner.name, objects.TRAINER),
                "annotations": objects.prometheus_annotations(constants.TRAINER_METRICS_PORT),
            },
            "spec": pod_spec,
        },
    }
    if policy.active_deadline_seconds is not None:
        job_spec["activeDeadlineSeconds"] = policy.active_deadline_seconds
    if policy.ttl_seconds_after_finished is not None:
        job_spec["ttlSecondsAfterFinished"] = policy.ttl_seconds_after_finished
    return {
        "apiVersion": "batch/v1",
        "kind": "Job",
        "metadata": objects.metadata(owner, objects.job_name(owner.name), objects.TRAINER),
        "spec": job_spec,
    }


def build_trainer_objects(owner: Owner, spec: api.TrainingJobSpec, cfg: config.OperatorConfig) -> list[Manifest]:
    """Everything training needs, in creation order (the Job last, so its pods find the rest in place)."""
    children = [build_config_map(owner, spec), build_service_account(owner), build_role(owner),
                build_role_binding(owner)]  # fmt: skip
    if spec.resources.workers > 1:
        children.append(build_workers_service(owner))
    children.append(build_job(owner, spec, cfg))
    return children
