"""Scenario 3: two workers train with gloo DDP as an Indexed Job, meeting through the headless Service's DNS
name for rank 0 (which the node agent resolves to rank 0's pod IP); rank 0 alone writes the artifacts."""

import json
from typing import Any

import trainingjobs as tj
from kiln_cluster.chart import KilnOperator
from kiln_cluster.kubelet import NodeAgent
from kiln_cluster.rest import Kube

from kiln.api import constants

Obj = dict[str, Any]
INDEX = "batch.kubernetes.io/job-completion-index"


def test_two_workers_train_with_ddp_through_the_headless_service_and_rank_zero_alone_writes(
    kube: Kube, node: NodeAgent, kiln_operator: KilnOperator, workload_namespace: str
) -> None:
    namespace, name = workload_namespace, "ddp"
    manifest = tj.digits_job(name, resources={"workers": 2})
    kube.create_object(manifest, namespace)
    status = tj.wait_for_phase(kube, node, namespace, name, ("Succeeded", "Failed"), describe=kiln_operator.tail)
    assert status["phase"] == "Succeeded", status

    # -- an Indexed Job of two pods behind the headless workers Service
    job = kube.get(f"/apis/batch/v1/namespaces/{namespace}/jobs/{name}-trainer")
    assert (job["spec"]["completionMode"], job["spec"]["completions"], job["status"]["succeeded"]) == ("Indexed", 2, 2)
    service = kube.get(f"/api/v1/namespaces/{namespace}/services/{name}-workers")
    assert service["spec"]["clusterIP"] == "None"
    selector = f"{constants.LABEL_TRAININGJOB}={name},{constants.LABEL_COMPONENT}=trainer"
    pods = {
        p["metadata"]["annotations"][INDEX]: p
        for p in kube.list(f"/api/v1/namespaces/{namespace}/pods", labelSelector=selector)
    }
    assert sorted(pods) == ["0", "1"]
    assert all(p["status"]["phase"] == "Succeeded" for p in pods.values())
    assert pods["0"]["status"]["podIP"] != pods["1"]["status"]["podIP"]
    master = next(e["value"] for e in pods["1"]["spec"]["containers"][0]["env"] if e["name"] == "MASTER_ADDR")
    assert master == f"{name}-trainer-0.{name}-workers.{namespace}.svc"

    # -- rank 0 trained, reported and compiled; rank 1 only trained
    logs = {
        rank: node.runner(namespace, p["metadata"]["name"]).containers[0].log.read_text()  # type: ignore[union-attr]
        for rank, p in pods.items()
    }
    assert '"event": "epoch"' in logs["0"] and "compile: wrote" in logs["0"]
    assert '"event": "epoch"' not in logs["1"] and "wrote" not in logs["1"]
    output = node.claim_path(namespace, "kiln-artifacts") / namespace / name
    card = json.loads((output / constants.MODEL_CARD_FILE).read_text())
    assert card["training"]["workers"] == 2
    assert status["progress"]["epoch"] == manifest["spec"]["training"]["epochs"]
