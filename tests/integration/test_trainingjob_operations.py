"""Scenarios 5 and 6: day-2 operations. The operator restarts mid-training without duplicating anything;
a suspended job resumes from its checkpoint; deleting a TrainingJob removes every child through the garbage
collector (ownerReferences), down to the processes."""

from typing import Any

import trainingjobs as tj
from kiln_cluster.chart import KilnOperator
from kiln_cluster.kubelet import NodeAgent
from kiln_cluster.procs import alive
from kiln_cluster.rest import Kube
from kiln_cluster.waiting import wait_until

from kiln.api import constants

Obj = dict[str, Any]


def children(kube: Kube, namespace: str, name: str) -> dict[str, list[str]]:
    """Names of the objects labelled as the TrainingJob's, by kind."""
    selector = f"{constants.LABEL_TRAININGJOB}={name}"
    kinds = {
        "Job": "/apis/batch/v1",
        "Deployment": "/apis/apps/v1",
        "ReplicaSet": "/apis/apps/v1",
        "Pod": "/api/v1",
        "Service": "/api/v1",
        "ConfigMap": "/api/v1",
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


def test_restarting_the_operator_mid_training_duplicates_nothing_and_the_job_completes(
    kube: Kube, node: NodeAgent, kiln_operator: KilnOperator, workload_namespace: str
) -> None:
    namespace, name = workload_namespace, "restart"
    kube.create_object(tj.digits_job(name, data={"maxSamples": 1200}, training={"epochs": 4}), namespace)

    def training() -> Obj | None:
        status = tj.status_of(kube, namespace, name)
        return status if status.get("phase") == "Running" and status.get("progress") else None

    before = wait_until(training, tj.TRAINING_TIMEOUT, "training progress", describe=lambda: node.describe(namespace))
    kiln_operator.restart()
    status = tj.wait_for_phase(kube, node, namespace, name, ("Succeeded", "Failed"), describe=kiln_operator.tail)
    assert status["phase"] == "Succeeded", status
    found = children(kube, namespace, name)
    assert found["Job"] == [f"{name}-trainer"]
    assert len(found["Pod"]) == 1, "one trainer pod: nothing was re-created"
    assert found["ConfigMap"] == [f"{name}-config"]
    assert status["startTime"] == before["startTime"]
    assert not status.get("restarts")
    assert status["progress"]["epoch"] == 4


def test_a_suspended_trainingjob_stops_its_pod_and_resumes_from_the_checkpoint(
    kube: Kube, node: NodeAgent, kiln_operator: KilnOperator, workload_namespace: str
) -> None:
    namespace, name, epochs = workload_namespace, "pause", 5
    kube.create_object(tj.digits_job(name, data={"maxSamples": 1200}, training={"epochs": epochs}), namespace)
    checkpoints = tj.checkpoints_dir(node, namespace, name)
    tj.wait_for_first_checkpoint(node, namespace, checkpoints)

    # -- suspend: the Job is suspended, its pod deleted and its process ended
    [pod] = tj.trainer_pods(kube, namespace, name)
    runner = node.runner(namespace, pod["metadata"]["name"])
    assert runner is not None and runner.containers[0].proc is not None
    pid = runner.containers[0].proc.pid
    kube.patch(tj.path(namespace, name), {"spec": {"runPolicy": {"suspend": True}}})
    status = tj.wait_for_phase(kube, node, namespace, name, ("Suspended",), timeout=120, describe=kiln_operator.tail)
    assert tj.condition(status, "Suspended")["status"] == "True"
    assert kube.get(f"/apis/batch/v1/namespaces/{namespace}/jobs/{name}-trainer")["spec"]["suspend"] is True
    wait_until(lambda: not alive(pid), 120, "the suspended trainer's process to end")
    done = max(tj.saved_epochs(checkpoints))
    assert done < epochs, "suspended before training ended"

    # -- resume: a new pod continues after the last checkpoint
    kube.patch(tj.path(namespace, name), {"spec": {"runPolicy": {"suspend": False}}})
    status = tj.wait_for_phase(kube, node, namespace, name, ("Succeeded", "Failed"), describe=kiln_operator.tail)
    assert status["phase"] == "Succeeded", status
    resumed = [p for p in tj.trainer_pods(kube, namespace, name) if p["metadata"]["name"] != pod["metadata"]["name"]]
    assert len(resumed) == 1
    retry = node.runner(namespace, resumed[0]["metadata"]["name"])
    assert retry is not None
    assert tj.logged_epochs(retry.containers[0].log) == list(range(done + 1, epochs + 1)), "resumed after it"


def test_deleting_a_serving_trainingjob_cascades_to_every_child_and_process(
    kube: Kube, node: NodeAgent, kiln_operator: KilnOperator, workload_namespace: str
) -> None:
    namespace, name = workload_namespace, "cascade"
    manifest = tj.digits_job(name, data={"maxSamples": 300}, training={"epochs": 1}, serving={"enabled": True})
    kube.create_object(manifest, namespace)
    status = tj.wait_for_phase(kube, node, namespace, name, ("Serving", "Failed"), describe=kiln_operator.tail)
    assert status["phase"] == "Serving", status
    found = children(kube, namespace, name)
    assert {
        "Job",
        "Deployment",
        "ReplicaSet",
        "Pod",
        "Service",
        "ConfigMap",
        "ServiceAccount",
        "Role",
        "RoleBinding",
    } <= found.keys(), found
    serving = [p for p in found["Pod"] if p.startswith(f"{name}-serving")]
    process = node.process(namespace, serving[0])
    assert process is not None

    kube.delete(tj.path(namespace, name))
    wait_until(lambda: kube.get_or_none(tj.path(namespace, name)) is None, 120, "the TrainingJob to be deleted")
    wait_until(
        lambda: not children(kube, namespace, name),
        120,
        "the garbage collector to delete every child",
        describe=lambda: str(children(kube, namespace, name)),
    )
    wait_until(lambda: process.poll() is not None, 60, "the serving process to end")
