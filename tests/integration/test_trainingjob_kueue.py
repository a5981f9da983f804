"""Scenario: TrainingJobs behind Kueue. With quota for one trainer, the second TrainingJob's Job stays
suspended (status Queued) while the first trains, and is admitted by Kueue, not by kiln, once it is done."""

import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import kueue
import pytest
import trainingjobs as tj
from conftest import install_crd

from kiln.api import constants
from kiln_cluster import chart
from kiln_cluster.chart import KilnOperator
from kiln_cluster.controlplane import ControlPlane
from kiln_cluster.kubelet import NodeAgent
from kiln_cluster.rest import Kube
from kiln_cluster.waiting import wait_until

Obj = dict[str, Any]


@pytest.fixture(scope="module")
def kueue_controller(control_plane: ControlPlane, tmp_path_factory: pytest.TempPathFactory) -> Iterator[kueue.Kueue]:
    reason = kueue.skip_reason()
    if reason:
        pytest.skip(reason)
    for crd in kueue.crds():
        install_crd(control_plane.kube, crd)
    chart.ensure_namespace(control_plane.kube, kueue.NAMESPACE)
    controller = kueue.Kueue(control_plane, Path(tmp_path_factory.mktemp("kueue")))
    controller.start()
    try:
        yield controller
    finally:
        controller.stop()


def job_of(kube: Kube, namespace: str, name: str) -> Obj | None:
    return kube.get_or_none(f"/apis/batch/v1/namespaces/{namespace}/jobs/{name}-trainer")


def suspended_reason(kube: Kube, namespace: str, name: str) -> str:
    return str(tj.condition(tj.status_of(kube, namespace, name), "Suspended").get("reason", ""))


def test_with_quota_for_one_trainer_the_second_trainingjob_waits_in_the_queue_until_the_first_is_done(
    kube: Kube, node: NodeAgent, kiln_operator: KilnOperator, kueue_controller: kueue.Kueue, workload_namespace: str
) -> None:
    namespace, suffix = workload_namespace, uuid.uuid4().hex[:5]
    flavor, cluster_queue = f"flavor-{suffix}", f"one-trainer-{suffix}"
    kube.create_object(kueue.resource_flavor(flavor))
    # Each trainer pod asks for 1 CPU and 2Gi (trainingjobs.digits_job): quota for exactly one at a time.
    kube.create_object(kueue.cluster_queue(cluster_queue, flavor, cpu="1", memory="2Gi"))
    kube.create_object(kueue.local_queue("team", namespace, cluster_queue), namespace)
    names = ("first", "second")
    for name in names:
        manifest = tj.digits_job(name, training={"epochs": 2})
        manifest["metadata"]["labels"] = {constants.KUEUE_QUEUE_LABEL: "team"}
        kube.create_object(manifest, namespace)

    def describe() -> str:
        jobs = {n: (job_of(kube, namespace, n) or {}).get("spec", {}).get("suspend") for n in names}
        return f"Job suspend: {jobs}\n{kiln_operator.tail(40)}\n{kueue_controller.tail(40)}"

    # -- Kueue admits one Job; the other stays suspended and its TrainingJob says Queued
    def admitted() -> list[str] | None:
        jobs = {n: job_of(kube, namespace, n) for n in names}
        running = [n for n, job in jobs.items() if job and job["spec"].get("suspend") is False]
        return running or None

    [winner] = wait_until(admitted, 180, "Kueue to admit one trainer Job", describe=describe)
    [waiting] = [n for n in names if n != winner]
    wait_until(
        lambda: suspended_reason(kube, namespace, waiting) == "Queued", 120, f"{waiting} to report Queued",
        describe=describe,
    )  # fmt: skip
    waiting_status = tj.status_of(kube, namespace, waiting)
    assert waiting_status["phase"] == "Pending", waiting_status
    assert "LocalQueue team" in tj.condition(waiting_status, "Suspended")["message"]

    # -- while the first trains, the second's Job is never resumed (not by kiln, not by Kueue)
    first = tj.wait_for_phase(kube, node, namespace, winner, ("Succeeded", "Failed"), describe=describe)
    assert first["phase"] == "Succeeded", first
    finished = job_of(kube, namespace, winner)
    assert finished is not None and finished["status"].get("completionTime"), finished
    # -- then Kueue admits the second, which trains to completion
    second = tj.wait_for_phase(kube, node, namespace, waiting, ("Succeeded", "Failed"), describe=describe)
    assert second["phase"] == "Succeeded", second
    later = job_of(kube, namespace, waiting)
    assert later is not None
    assert later["status"]["startTime"] >= finished["status"]["completionTime"], (later["status"], finished["status"])
    kube.delete(f"/apis/{kueue.API}/clusterqueues/{cluster_queue}")
