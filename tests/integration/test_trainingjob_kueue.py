"""Scenario: TrainingJobs behind Kueue's real controller, proven at the Job level (this tier has no node, so
admitted pods stay Pending). With quota for one trainer, Kueue admits one Job; the operator leaves the other
suspended and reports it Queued; once the first TrainingJob is gone, Kueue, not kiln, admits the second."""

import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import trainingjobs as tj

from kiln.api import constants
from kiln_cluster import chart
from kiln_cluster.chart import KilnOperator
from kiln_cluster.controlplane import ControlPlane
from kiln_cluster.rest import Kube
from kiln_cluster.waiting import wait_until

from . import kueue
from .conftest import install_crd

Obj = dict[str, Any]
TIMEOUT = 180.0


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


def test_with_quota_for_one_trainer_the_second_trainingjob_stays_queued_until_the_first_is_gone(
    kube: Kube, kiln_operator: KilnOperator, kueue_controller: kueue.Kueue, workload_namespace: str
) -> None:
    namespace, suffix = workload_namespace, uuid.uuid4().hex[:5]
    flavor, cluster_queue = f"flavor-{suffix}", f"one-trainer-{suffix}"
    kube.create_object(kueue.resource_flavor(flavor))
    # Each trainer pod asks for 1 CPU and 2Gi (trainingjobs.digits_job): quota for exactly one at a time.
    kube.create_object(kueue.cluster_queue(cluster_queue, flavor, cpu="1", memory="2Gi"))
    kube.create_object(kueue.local_queue("team", namespace, cluster_queue), namespace)
    names = ("first", "second")
    for name in names:
        manifest = tj.digits_job(name)
        manifest["metadata"]["labels"] = {constants.KUEUE_QUEUE_LABEL: "team"}
        kube.create_object(manifest, namespace)

    def describe() -> str:
        jobs = {n: (job_of(kube, namespace, n) or {}).get("spec", {}).get("suspend") for n in names}
        statuses = {n: tj.status_of(kube, namespace, n) for n in names}
        return f"Job suspend: {jobs}\nstatus: {statuses}\n{kiln_operator.tail(40)}\n{kueue_controller.tail(40)}"

    # -- every Job is created suspended, with the TrainingJob's queue label
    for name in names:
        job = wait_until(lambda n=name: job_of(kube, namespace, n), TIMEOUT, f"the Job of {name}", describe=describe)
        assert job["metadata"]["labels"][constants.KUEUE_QUEUE_LABEL] == "team"

    # -- Kueue admits one Job (it unsuspends it); the other stays suspended and its TrainingJob says Queued
    def admitted() -> list[str] | None:
        jobs = {n: job_of(kube, namespace, n) for n in names}
        return [n for n, job in jobs.items() if job and job["spec"].get("suspend") is False] or None

    [winner] = wait_until(admitted, TIMEOUT, "Kueue to admit one trainer Job", describe=describe)
    [waiting] = [n for n in names if n != winner]
    wait_until(lambda: suspended_reason(kube, namespace, waiting) == "Queued", TIMEOUT, f"{waiting} Queued",
               describe=describe)  # fmt: skip
    queued = tj.status_of(kube, namespace, waiting)
    assert queued["phase"] == "Pending", queued
    assert "LocalQueue team" in tj.condition(queued, "Suspended")["message"]
    # The admitted one is no longer reported as queued (its pods wait for a node here).
    wait_until(lambda: suspended_reason(kube, namespace, winner) == "NotSuspended", TIMEOUT, f"{winner} admitted",
               describe=describe)  # fmt: skip
    still = job_of(kube, namespace, waiting)
    assert still is not None and still["spec"]["suspend"] is True, "the operator must not resume a queued Job"

    # -- the first TrainingJob goes away (its Job and Workload with it): Kueue admits the second
    kube.delete(tj.path(namespace, winner))
    wait_until(lambda: (job_of(kube, namespace, waiting) or {}).get("spec", {}).get("suspend") is False, TIMEOUT,
               f"Kueue to admit {waiting} once {winner} is gone", describe=describe)  # fmt: skip
    wait_until(lambda: suspended_reason(kube, namespace, waiting) == "NotSuspended", TIMEOUT,
               f"{waiting} to leave Queued", describe=describe)  # fmt: skip
    kube.delete(f"/apis/{kueue.API}/clusterqueues/{cluster_queue}")
