"""Day two on the real node: what a cluster user does to a TrainingJob after it runs, and what the operator must do
about it — children deleted by hand come back, a serving outage is Ready=False while the phase stays, TTL cleanup
of the trainer Job never retrains, a live serving edit rolls out, retentionPolicy Delete removes the job's folder
(and a same-name job starts clean), and with two operator replicas exactly one acts and the other takes over.
"""

import time
from collections.abc import Callable
from typing import Any

import pytest
import trainingjobs as tj

from kiln.api import constants
from kiln_cluster.cluster import Cluster
from kiln_cluster.rest import Kube
from kiln_cluster.waiting import wait_until

from . import clusterops

Obj = dict[str, Any]
# A test may be the first of the tier (it then builds images and brings the node up).
pytestmark = pytest.mark.timeout(2400)
# The operator watches every child kind: a deleted one is back well within this (the periodic resync is 60 s).
HEAL_SECONDS = 30.0
LEASE = "/apis/coordination.k8s.io/v1/namespaces/kiln-system/leases/kiln-operator"
OPERATOR_PODS = "/api/v1/namespaces/kiln-system/pods"
OPERATOR_SELECTOR = "app.kubernetes.io/component=operator"


def describer(kube: Kube, namespace: str) -> Callable[[], str]:
    return lambda: clusterops.describe_namespace(kube, namespace) + clusterops.operator_log(kube)


def uid_of(kube: Kube, path: str) -> str | None:
    found = kube.get_or_none(path)
    return None if found is None else str(found["metadata"]["uid"])


def heal_each(kube: Kube, children: dict[str, str]) -> None:
    """Delete each child by hand; each must come back (a new uid) within HEAL_SECONDS."""
    for what, path in children.items():
        before = uid_of(kube, path)
        assert before is not None, f"{what} {path} exists before it is deleted"
        kube.delete(path)
        wait_until(
            lambda p=path, b=before: uid_of(kube, p) not in (None, b), HEAL_SECONDS, f"the {what} to be re-created"
        )


def ready(status: Obj) -> str:
    return str(tj.condition(status, "Ready").get("status"))


def test_a_served_job_heals_what_is_deleted_reports_outages_and_rolls_out_serving_edits(
    cluster: Cluster, kube: Kube, workload_namespace: str
) -> None:
    namespace, name = workload_namespace, "heal"
    serving = f"{name}-serving"
    manifest = tj.digits_job(
        name,
        data={"maxSamples": 300},
        training={"epochs": 1},
        serving={"enabled": True},
        runPolicy={"ttlSecondsAfterFinished": 0, "suspend": True},
        artifacts={"retentionPolicy": "Delete"},
    )
    kube.create_object(manifest, namespace)
    describe = describer(kube, namespace)

    # -- while it waits (suspended: the trainer's helpers exist, no pod runs), each helper deleted comes back
    helpers = {
        "ServiceAccount": f"/api/v1/namespaces/{namespace}/serviceaccounts/{name}-trainer",
        "Role": f"/apis/rbac.authorization.k8s.io/v1/namespaces/{namespace}/roles/{name}-trainer",
        "RoleBinding": f"/apis/rbac.authorization.k8s.io/v1/namespaces/{namespace}/rolebindings/{name}-trainer",
    }
    tj.wait_for_phase(kube, namespace, name, ("Suspended",), timeout=120, describe=describe)
    for what, path in helpers.items():
        wait_until(lambda p=path: uid_of(kube, p), 60, f"the {what} to be created", describe=describe)
    heal_each(kube, helpers)
    kube.patch(tj.path(namespace, name), {"spec": {"runPolicy": {"suspend": False}}})

    status = tj.wait_for_phase(kube, namespace, name, ("Serving", "Failed"), describe=describe)
    assert status["phase"] == "Serving", status
    wait_until(lambda: ready(tj.status_of(kube, namespace, name)) == "True", 120, "Ready=True", describe=describe)
    endpoint = status["endpoint"]
    folder = tj.output_dir(cluster, namespace, name)
    assert (folder / constants.MODEL_CARD_FILE).is_file()
    assert status["artifactsPath"].endswith(folder.relative_to(folder.parents[2]).as_posix())

    # -- ttlSecondsAfterFinished: 0 deletes the finished trainer Job; completion is remembered, nothing retrains
    job = f"/apis/batch/v1/namespaces/{namespace}/jobs/{name}-trainer"
    wait_until(lambda: kube.get_or_none(job) is None, 120, "the TTL controller to delete the trainer Job")
    time.sleep(HEAL_SECONDS)  # long enough for the operator to have re-created it, were it going to
    assert kube.get_or_none(job) is None, "the finished Job was re-created: training would run again"
    assert tj.status_of(kube, namespace, name)["phase"] == "Serving"

    # -- the serving Service deleted by hand comes back; the endpoint stays right
    heal_each(kube, {"serving Service": f"/api/v1/namespaces/{namespace}/services/{serving}"})
    status = tj.status_of(kube, namespace, name)
    assert (status["phase"], status["endpoint"]) == ("Serving", endpoint)

    # -- the serving Deployment deleted: an outage is Ready=False with a reason, the phase stays, then it heals
    deployment = f"/apis/apps/v1/namespaces/{namespace}/deployments/{serving}"
    with tj.StatusRecorder(kube, namespace, name) as recorder:
        kube.delete(deployment)
        wait_until(lambda: uid_of(kube, deployment) is not None, HEAL_SECONDS, "the serving Deployment to return")
        wait_until(
            lambda: (
                any(ready(s) == "False" for s in recorder.statuses)
                and ready(tj.status_of(kube, namespace, name)) == "True"
            ),
            180,
            "Ready to go False during the outage, then True again",
            describe=lambda: str([tj.condition(s, "Ready") for s in recorder.statuses]) + describe(),
        )
    outage = next(tj.condition(s, "Ready") for s in recorder.statuses if ready(s) == "False")
    assert outage["reason"] in ("DeploymentMissing", "RollingOut") and outage["message"], outage
    assert {s.get("phase") for s in recorder.statuses} == {"Serving"}, "the phase never left Serving"

    # -- a live serving edit rolls out; observedGeneration follows only once the Deployment has it
    kube.patch(tj.path(namespace, name), {"spec": {"serving": {"maxBatchSize": 8}}})
    generation = kube.get(tj.path(namespace, name))["metadata"]["generation"]

    def rolled_out() -> bool:
        args = kube.get(deployment)["spec"]["template"]["spec"]["containers"][0]["args"]
        observed = tj.status_of(kube, namespace, name).get("observedGeneration")
        return args[args.index("--max-batch-size") + 1] == "8" and observed == generation

    wait_until(rolled_out, 60, "the maxBatchSize edit in the Deployment and observedGeneration", describe=describe)

    # -- retentionPolicy Delete: deleting the TrainingJob removes its folder (a cleanup Job on the node)
    kube.delete(tj.path(namespace, name))
    wait_until(lambda: not folder.exists(), 180, f"the cleanup Job to remove {folder}", describe=describe)

    # -- a same-name TrainingJob starts clean: its own folder, training from epoch 1
    kube.create_object(tj.digits_job(name, data={"maxSamples": 300}, training={"epochs": 1}), namespace)
    status = tj.wait_for_phase(kube, namespace, name, ("Succeeded", "Failed"), describe=describe)
    assert status["phase"] == "Succeeded", status
    again = tj.output_dir(cluster, namespace, name)
    assert again != folder and (again / constants.MODEL_CARD_FILE).is_file()
    [pod] = tj.trainer_pods(kube, namespace, name)
    assert tj.logged_epochs(clusterops.pod_log(kube, namespace, pod["metadata"]["name"])) == [1]


def operator_pods(kube: Kube) -> list[Obj]:
    pods: list[Obj] = kube.list(OPERATOR_PODS, labelSelector=OPERATOR_SELECTOR)
    return [p for p in pods if not p["metadata"].get("deletionTimestamp")]


def pod_ready(pod: Obj) -> bool:
    return any(c["type"] == "Ready" and c["status"] == "True" for c in pod["status"].get("conditions") or [])


def test_two_operator_replicas_one_leads_and_the_other_takes_over_when_it_goes(
    kube: Kube, helm: clusterops.Cli, kubectl: clusterops.Cli, kiln_release: None, workload_namespace: str
) -> None:
    namespace, name = workload_namespace, "leader"
    helm("upgrade", "kiln", "charts/kiln", "-n", "kiln-system", "--reuse-values", "--set", "operator.replicas=2")
    try:
        kubectl("-n", "kiln-system", "rollout", "status", "deployment/kiln", "--timeout=300s", timeout=320)
        wait_until(lambda: len([p for p in operator_pods(kube) if pod_ready(p)]) == 2, 120, "two Ready operators")
        leader = kube.get(LEASE)["spec"]["holderIdentity"]
        assert leader in {p["metadata"]["name"] for p in operator_pods(kube)}

        kube.create_object(tj.digits_job(name, data={"maxSamples": 1200}, training={"epochs": 4}), namespace)
        describe = describer(kube, namespace)
        wait_until(
            lambda: tj.status_of(kube, namespace, name).get("progress"),
            tj.TRAINING_TIMEOUT,
            "training",
            describe=describe,
        )
        kube.delete(f"{OPERATOR_PODS}/{leader}")
        deleted_at = time.monotonic()
        successor = wait_until(
            lambda: (holder := kube.get(LEASE)["spec"].get("holderIdentity")) != leader and holder,
            60,
            "another replica to take the Lease",
        )
        took_over_s = time.monotonic() - deleted_at
        assert took_over_s <= 30, f"the standby took over after {took_over_s:.0f}s"
        status = tj.wait_for_phase(kube, namespace, name, ("Succeeded", "Failed"), describe=describe)
        assert status["phase"] == "Succeeded", status
        assert successor != leader

        # -- exactly one operator acted: one Job, one trainer pod, no Event recorded twice
        jobs = kube.list(
            f"/apis/batch/v1/namespaces/{namespace}/jobs", labelSelector=f"{constants.LABEL_TRAININGJOB}={name}"
        )
        assert [j["metadata"]["name"] for j in jobs] == [f"{name}-trainer"]
        assert len(tj.trainer_pods(kube, namespace, name)) == 1
        selector = f"involvedObject.kind=TrainingJob,involvedObject.name={name}"

        def reasons() -> list[str]:
            events = kube.list(f"/api/v1/namespaces/{namespace}/events", fieldSelector=selector)
            return [e["reason"] for e in events for _ in range(e.get("count") or 1)]

        # kopf posts Events from a queue of its own, after the status patch: the phase can be read a moment first.
        wait_until(lambda: "Succeeded" in reasons(), 30, "the Succeeded Event", describe=describe)
        recorded = reasons()
        assert len(recorded) == len(set(recorded)), f"an Event was recorded twice: {recorded}"
    finally:
        helm("upgrade", "kiln", "charts/kiln", "-n", "kiln-system", "--reuse-values", "--set", "operator.replicas=1")
        kubectl("-n", "kiln-system", "rollout", "status", "deployment/kiln", "--timeout=300s", timeout=320)
        wait_until(lambda: len(kube.list(OPERATOR_PODS, labelSelector=OPERATOR_SELECTOR)) == 1, 120, "one operator")
