"""TrainingJob scenarios on the real node, with the operator running from its image as helm installed it.

Distributed training meets through the headless Service's DNS names (CoreDNS, no rewriting anywhere); the kernel's
OOM killer and a SIGKILLed container produce the failures the operator must report or recover from; deleting the
operator pod or the TrainingJob exercises what a cluster user does on day two.
"""

import json
import os
import signal
from typing import Any

import pytest
import trainingjobs as tj

from kiln.api import constants
from kiln_cluster.cluster import Cluster
from kiln_cluster.rest import Kube
from kiln_cluster.waiting import wait_until

from . import clusterops

Obj = dict[str, Any]
# The first test of the tier builds and imports images and brings the node up: well past the default limit.
pytestmark = pytest.mark.timeout(2400)
INDEX = "batch.kubernetes.io/job-completion-index"


def describer(kube: Kube, namespace: str) -> Any:
    return lambda: clusterops.describe_namespace(kube, namespace) + clusterops.operator_log(kube)


def children(kube: Kube, namespace: str, name: str) -> dict[str, list[str]]:
    """Names of the objects labelled as the TrainingJob's, by kind."""
    selector = f"{constants.LABEL_TRAININGJOB}={name}"
    kinds = {
        "Job": "/apis/batch/v1",
        "Deployment": "/apis/apps/v1",
        "ReplicaSet": "/apis/apps/v1",
        "Pod": "/api/v1",
        "Service": "/api/v1",
        "ServiceAccount": "/api/v1",
        "Role": "/apis/rbac.authorization.k8s.io/v1",
        "RoleBinding": "/apis/rbac.authorization.k8s.io/v1",
    }
    found = {}
    for kind, prefix in kinds.items():
        items = kube.list(f"{prefix}/namespaces/{namespace}/{kind.lower()}s", labelSelector=selector)
        if items:
            found[kind] = sorted(i["metadata"]["name"] for i in items)
    return found


def test_two_workers_rendezvous_through_the_headless_services_dns_and_rank_zero_alone_writes(
    cluster: Cluster, kube: Kube, workload_namespace: str
) -> None:
    namespace, name = workload_namespace, "ddp"
    manifest = tj.digits_job(name, resources={"workers": 2, "cpu": "500m", "memory": "2Gi"})
    kube.create_object(manifest, namespace)
    status = tj.wait_for_phase(kube, namespace, name, ("Succeeded", "Failed"), describe=describer(kube, namespace))
    assert status["phase"] == "Succeeded", status

    job = kube.get(f"/apis/batch/v1/namespaces/{namespace}/jobs/{name}-trainer")
    assert (job["spec"]["completionMode"], job["spec"]["completions"], job["status"]["succeeded"]) == ("Indexed", 2, 2)
    assert kube.get(f"/api/v1/namespaces/{namespace}/services/{name}-workers")["spec"]["clusterIP"] == "None"
    pods = {p["metadata"]["annotations"][INDEX]: p for p in tj.trainer_pods(kube, namespace, name)}
    assert sorted(pods) == ["0", "1"]
    assert pods["0"]["status"]["podIP"] != pods["1"]["status"]["podIP"]
    master = next(e["value"] for e in pods["1"]["spec"]["containers"][0]["env"] if e["name"] == "MASTER_ADDR")
    assert master == f"{name}-trainer-0.{name}-workers.{namespace}.svc", "rank 1 dialled rank 0 by its DNS name"

    logs = {rank: clusterops.pod_log(kube, namespace, p["metadata"]["name"]) for rank, p in pods.items()}
    assert '"event": "epoch"' in logs["0"] and "compile: wrote" in logs["0"]
    assert '"event": "epoch"' not in logs["1"] and "wrote" not in logs["1"]
    card = json.loads((tj.output_dir(cluster, namespace, name) / constants.MODEL_CARD_FILE).read_text())
    assert card["training"]["workers"] == 2


def test_a_trainer_over_its_memory_limit_fails_the_trainingjob_as_oomkilled(
    kube: Kube, workload_namespace: str
) -> None:
    namespace, name = workload_namespace, "oom"
    manifest = tj.digits_job(name, resources={"cpu": "500m", "memory": "96Mi"})
    manifest["spec"]["runPolicy"] = {"backoffLimit": 0}
    kube.create_object(manifest, namespace)
    status = tj.wait_for_phase(kube, namespace, name, ("Failed", "Succeeded"), describe=describer(kube, namespace))
    assert status["phase"] == "Failed", status
    failed = tj.condition(status, "Failed")
    assert failed["reason"] == "OOMKilled", failed
    [pod] = tj.trainer_pods(kube, namespace, name)
    terminated = pod["status"]["containerStatuses"][0]["state"]["terminated"]
    assert (terminated["reason"], terminated["exitCode"]) == ("OOMKilled", 137)


def test_a_trainer_config_error_fails_the_trainingjob_at_once_naming_the_pod(
    kube: Kube, workload_namespace: str
) -> None:
    namespace = workload_namespace
    manifest = tj.digits_job("no-data", data={"dataset": "imagefolder", "path": "/nonexistent/kiln-test-images"})
    manifest["spec"]["runPolicy"] = {"backoffLimit": 3}
    kube.create_object(manifest, namespace)
    status = tj.wait_for_phase(kube, namespace, "no-data", ("Failed", "Succeeded", "Serving"))
    assert status["phase"] == "Failed"
    failed = tj.condition(status, "Failed")
    [pod] = tj.trainer_pods(kube, namespace, "no-data")  # exit code 78 is not retried
    assert failed["reason"] == "InvalidConfig"
    assert pod["metadata"]["name"] in failed["message"]
    assert "/nonexistent/kiln-test-images" in failed["message"]


def test_a_trainer_container_killed_mid_training_is_replaced_and_resumes_from_its_checkpoint(
    cluster: Cluster, kube: Kube, workload_namespace: str
) -> None:
    namespace, name, epochs = workload_namespace, "resume", 6
    manifest = tj.digits_job(name, data={"maxSamples": 1200}, training={"epochs": epochs, "checkpointEvery": 1})
    kube.create_object(manifest, namespace)
    checkpoints = tj.output_dir(cluster, namespace, name) / constants.CHECKPOINTS_DIR

    # -- SIGKILL the trainer container's process from the host as soon as its first checkpoint is written
    tj.wait_for_first_checkpoint(checkpoints, describe=describer(kube, namespace))
    [first] = tj.trainer_pods(kube, namespace, name)
    os.kill(cluster.container_pid(namespace, first["metadata"]["name"], "trainer"), signal.SIGKILL)
    done_before_kill = max(tj.saved_epochs(checkpoints))
    assert done_before_kill < epochs, "the kill came before training ended"

    # -- the Job replaces the pod; the new one continues after the checkpoint
    status = tj.wait_for_phase(kube, namespace, name, ("Succeeded", "Failed"), describe=describer(kube, namespace))
    assert status["phase"] == "Succeeded", status
    pods = tj.trainer_pods(kube, namespace, name)
    assert len(pods) == 2
    assert pods[0]["status"]["containerStatuses"][0]["state"]["terminated"]["exitCode"] == 128 + signal.SIGKILL
    resumed = tj.logged_epochs(clusterops.pod_log(kube, namespace, pods[1]["metadata"]["name"]))
    assert resumed == list(range(done_before_kill + 1, epochs + 1)), "no epoch redone, none skipped"
    assert status["restarts"] == 1


def test_deleting_the_operator_pod_mid_training_duplicates_nothing_and_the_job_completes(
    kube: Kube, workload_namespace: str
) -> None:
    namespace, name = workload_namespace, "restart"
    kube.create_object(tj.digits_job(name, data={"maxSamples": 1200}, training={"epochs": 4}), namespace)

    def training() -> Obj | None:
        status = tj.status_of(kube, namespace, name)
        return status if status.get("phase") == "Running" and status.get("progress") else None

    before = wait_until(training, tj.TRAINING_TIMEOUT, "training progress", describe=describer(kube, namespace))
    [operator] = kube.list("/api/v1/namespaces/kiln-system/pods", labelSelector="app.kubernetes.io/component=operator")
    kube.delete(f"/api/v1/namespaces/kiln-system/pods/{operator['metadata']['name']}")
    status = tj.wait_for_phase(kube, namespace, name, ("Succeeded", "Failed"), describe=describer(kube, namespace))
    assert status["phase"] == "Succeeded", status
    [replacement] = kube.list(
        "/api/v1/namespaces/kiln-system/pods", labelSelector="app.kubernetes.io/component=operator"
    )
    assert replacement["metadata"]["uid"] != operator["metadata"]["uid"]
    found = children(kube, namespace, name)
    assert found["Job"] == [f"{name}-trainer"]
    assert len(found["Pod"]) == 1, "one trainer pod: nothing was re-created"
    assert status["startTime"] == before["startTime"]
    assert not status.get("restarts")


def test_a_suspended_trainingjob_stops_its_pod_and_resumes_from_the_checkpoint(
    cluster: Cluster, kube: Kube, workload_namespace: str
) -> None:
    namespace, name, epochs = workload_namespace, "pause", 5
    kube.create_object(tj.digits_job(name, data={"maxSamples": 1200}, training={"epochs": epochs}), namespace)
    checkpoints = tj.output_dir(cluster, namespace, name) / constants.CHECKPOINTS_DIR
    tj.wait_for_first_checkpoint(checkpoints, describe=describer(kube, namespace))
    [pod] = tj.trainer_pods(kube, namespace, name)

    kube.patch(tj.path(namespace, name), {"spec": {"runPolicy": {"suspend": True}}})
    status = tj.wait_for_phase(kube, namespace, name, ("Suspended",), timeout=120, describe=describer(kube, namespace))
    assert tj.condition(status, "Suspended")["status"] == "True"
    assert kube.get(f"/apis/batch/v1/namespaces/{namespace}/jobs/{name}-trainer")["spec"]["suspend"] is True
    pod_path = f"/api/v1/namespaces/{namespace}/pods/{pod['metadata']['name']}"
    wait_until(lambda: kube.get_or_none(pod_path) is None, 120, "the suspended trainer's pod to go")
    done = max(tj.saved_epochs(checkpoints))
    assert done < epochs, "suspended before training ended"

    kube.patch(tj.path(namespace, name), {"spec": {"runPolicy": {"suspend": False}}})
    status = tj.wait_for_phase(kube, namespace, name, ("Succeeded", "Failed"), describe=describer(kube, namespace))
    assert status["phase"] == "Succeeded", status
    [resumed] = tj.trainer_pods(kube, namespace, name)
    assert tj.logged_epochs(clusterops.pod_log(kube, namespace, resumed["metadata"]["name"])) == list(
        range(done + 1, epochs + 1)
    ), "resumed after the last checkpoint"


def test_kubectl_delete_tj_cascades_to_every_child(
    kube: Kube, kubectl: clusterops.Cli, workload_namespace: str
) -> None:
    namespace, name = workload_namespace, "cascade"
    manifest = tj.digits_job(name, data={"maxSamples": 300}, training={"epochs": 1}, serving={"enabled": True})
    kube.create_object(manifest, namespace)
    status = tj.wait_for_phase(kube, namespace, name, ("Serving", "Failed"), describe=describer(kube, namespace))
    assert status["phase"] == "Serving", status
    kinds = {"Job", "Deployment", "ReplicaSet", "Pod", "Service", "ServiceAccount", "Role", "RoleBinding"}
    assert kinds <= children(kube, namespace, name).keys()

    kubectl("delete", "tj", name, "-n", namespace, "--wait=true", timeout=180)
    wait_until(
        lambda: not children(kube, namespace, name),
        120,
        "the garbage collector to delete every child, pods included",
        describe=lambda: str(children(kube, namespace, name)),
    )
