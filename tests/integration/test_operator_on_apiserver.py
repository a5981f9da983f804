"""Issue 14 against the real API server and the real operator (the chart's RBAC, no node): children created
under least privilege, a deleted child re-created, runPolicy edits reaching the live Job, observedGeneration,
hostile specs refused as a Failed condition naming the field, the artifacts folder keyed by uid."""

from typing import Any

import trainingjobs as tj

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
    config_map = f"/api/v1/namespaces/{namespace}/configmaps/{name}-config"
    first = wait_for(kube, config_map, "the trainer's ConfigMap", kiln_operator)
    wait_for(kube, f"/apis/batch/v1/namespaces/{namespace}/jobs/{name}-trainer", "the trainer Job", kiln_operator)
    kube.delete(config_map)
    back = wait_until(
        lambda: (cm := kube.get_or_none(config_map)) and cm["metadata"]["uid"] != first["metadata"]["uid"] and cm,
        REPAIR_SECONDS,
        "the deleted ConfigMap to be re-created",
        describe=kiln_operator.tail,
    )
    assert back["data"] == first["data"]
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
