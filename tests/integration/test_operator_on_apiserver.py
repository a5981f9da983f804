"""Issue 14 against the real API server and the real operator (the chart's RBAC, no node): children created
under least privilege, a deleted child re-created, runPolicy edits reaching the live Job, observedGeneration,
hostile specs refused as a Failed condition naming the field, the artifacts folder keyed by uid."""

from typing import Any

import trainingjobs as tj
import yaml

from kiln_cluster.chart import KilnOperator
from kiln_cluster.rest import Kube
from kiln_cluster.waiting import wait_until

Obj = dict[str, Any]
REPAIR_SECONDS = 30.0  # issue 14: a child deleted by hand is back within 30 s


def wait_for(kube: Kube, path: str, what: str, operator: KilnOperator, timeout: float = 60.0) -> Obj:
    found: Obj = wait_until(lambda: kube.get_or_none(path), timeout, what, describe=operator.tail)
    return found


def test_children_are_created_under_the_charts_rbac_and_one_deleted_by_hand_comes_back(
    kube: Kube, kiln_operator: KilnOperator, workload_namespace: str
) -> None:
    namespace, name = workload_namespace, "repaired"
    created = kube.create_object(tj.digits_job(name, runPolicy={"suspend": True}), namespace)
    role = f"/apis/rbac.authorization.k8s.io/v1/namespaces/{namespace}/roles/{name}-trainer"
    wait_for(kube, f"/apis/batch/v1/namespaces/{namespace}/jobs/{name}-trainer", "the trainer Job", kiln_operator)
    first = wait_for(kube, role, "the trainer's Role", kiln_operator)
    kube.delete(role)
    back = wait_until(
        lambda: (r := kube.get_or_none(role)) and r["metadata"]["uid"] != first["metadata"]["uid"] and r,
        REPAIR_SECONDS,
        "the deleted Role to be re-created",
        describe=kiln_operator.tail,
    )
    assert back["rules"] == first["rules"]
    status = tj.wait_for_phase(kube, namespace, name, ("Suspended",), timeout=60, describe=kiln_operator.tail)
    assert status["artifactsPath"].endswith(f"/{namespace}/{name}/{created['metadata']['uid']}")
    assert {"Succeeded", "Ready", "Failed"} <= {c["type"] for c in status["conditions"]}


def test_run_policy_edits_reach_the_live_job_and_observed_generation_follows(
    kube: Kube, kiln_operator: KilnOperator, workload_namespace: str
) -> None:
    namespace, name = workload_namespace, "edited"
    kube.create_object(tj.digits_job(name, runPolicy={"suspend": True}), namespace)
    job_path = f"/apis/batch/v1/namespaces/{namespace}/jobs/{name}-trainer"
    wait_for(kube, job_path, "the trainer Job", kiln_operator)
    edited = kube.patch(
        tj.path(namespace, name), {"spec": {"runPolicy": {"activeDeadlineSeconds": 900, "backoffLimit": 5}}}
    )
    assert edited["metadata"]["generation"] == 2

    def converged() -> Obj | None:
        spec = kube.get(job_path)["spec"]
        return spec if (spec.get("activeDeadlineSeconds"), spec.get("backoffLimit")) == (900, 5) else None

    wait_until(converged, 60, "the Job to carry the edited runPolicy", describe=kiln_operator.tail)
    wait_until(
        lambda: tj.status_of(kube, namespace, name).get("observedGeneration") == 2 or None,
        60,
        "observedGeneration 2",
        describe=kiln_operator.tail,
    )


def test_a_host_path_volume_fails_the_job_naming_the_field_and_creates_nothing(
    kube: Kube, kiln_operator: KilnOperator, workload_namespace: str
) -> None:
    namespace, name = workload_namespace, "hostile"
    manifest = tj.digits_job(name, artifacts={"volume": {"hostPath": {"path": "/"}}}, resources={"image": "evil/x:1"})
    kube.create_object(manifest, namespace)
    status = tj.wait_for_phase(kube, namespace, name, ("Failed",), timeout=60, describe=kiln_operator.tail)
    failed = tj.condition(status, "Failed")
    assert failed["reason"] == "InvalidSpec"
    assert "spec.artifacts.volume.hostPath" in failed["message"] and "spec.resources.image" in failed["message"]
    assert kube.get_or_none(f"/apis/batch/v1/namespaces/{namespace}/jobs/{name}-trainer") is None


def test_the_operator_keeps_no_bookkeeping_on_a_trainingjob_and_its_trainer_config_rides_in_the_pod_template(
    kube: Kube, kiln_operator: KilnOperator, workload_namespace: str
) -> None:
    """Issue 15 (scale): no kopf progress or diff-base annotations, no finalizer (retention Retain), no
    ConfigMap: the TrainingJob gets a status and nothing else, and the pods read their config from the Job."""
    namespace, name = workload_namespace, "lean"
    kube.create_object(tj.digits_job(name, runPolicy={"suspend": True}), namespace)
    tj.wait_for_phase(kube, namespace, name, ("Suspended",), timeout=60, describe=kiln_operator.tail)
    meta = kube.get(tj.path(namespace, name))["metadata"]
    assert not [key for key in meta.get("annotations") or {} if key.startswith("kiln.dev/")], meta
    assert not meta.get("finalizers"), meta
    job = kube.get(f"/apis/batch/v1/namespaces/{namespace}/jobs/{name}-trainer")
    document = yaml.safe_load(job["spec"]["template"]["metadata"]["annotations"]["kiln.dev/trainingjob-config"])
    assert document["metadata"] == {"name": name, "namespace": namespace}
    assert document["spec"]["training"]["epochs"] == 2
    assert kube.get_or_none(f"/api/v1/namespaces/{namespace}/configmaps/{name}-config") is None


def test_retention_delete_holds_the_trainingjob_until_its_cleanup_job_is_started(
    kube: Kube, kiln_operator: KilnOperator, workload_namespace: str
) -> None:
    namespace, name = workload_namespace, "tidy"
    created = kube.create_object(
        tj.digits_job(name, runPolicy={"suspend": True}, artifacts={"retentionPolicy": "Delete"}), namespace
    )
    path = tj.path(namespace, name)
    wait_until(
        lambda: "kiln.dev/finalizer" in (kube.get(path)["metadata"].get("finalizers") or []) or None,
        30,
        "the operator's finalizer",
        describe=kiln_operator.tail,
    )
    kube.delete(path)
    cleanup = f"/apis/batch/v1/namespaces/{namespace}/jobs/{name}-cleanup-{created['metadata']['uid'][:8]}"
    job = wait_for(kube, cleanup, "the artifacts cleanup Job", kiln_operator)
    assert job["spec"]["template"]["spec"]["containers"][0]["command"][-1].endswith(created["metadata"]["uid"])
    wait_until(lambda: kube.get_or_none(path) is None, 30, "the TrainingJob to be gone", describe=kiln_operator.tail)
