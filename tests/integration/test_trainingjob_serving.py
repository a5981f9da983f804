"""Scenario 2: the quick-start example goes from `kubectl apply` to correct predictions through the operator.

The operator runs with the chart's ServiceAccount and RBAC; the Job controller, scheduler and node agent run
the trainer; the operator rolls out the server; the test asks the server, at its pod IP, to classify real
digits with tritonclient, and a real Prometheus scrapes the server and the operator meanwhile.
"""

import json
from typing import Any

import numpy as np
import trainingjobs as tj
import tritonclient.http as triton
from kiln_cluster.chart import KilnOperator
from kiln_cluster.kubelet import NodeAgent
from kiln_cluster.prometheus import Prometheus
from kiln_cluster.rest import Kube
from kiln_cluster.waiting import wait_until

from kiln.api import constants

Obj = dict[str, Any]


def serving_pod(kube: Kube, namespace: str, name: str) -> Obj | None:
    """The Ready serving pod of a TrainingJob, if there is one."""
    selector = f"{constants.LABEL_TRAININGJOB}={name},{constants.LABEL_COMPONENT}=serving"
    for pod in kube.list(f"/api/v1/namespaces/{namespace}/pods", labelSelector=selector):
        conditions = {c["type"]: c["status"] for c in pod.get("status", {}).get("conditions") or []}
        if conditions.get("Ready") == "True" and not pod["metadata"].get("deletionTimestamp"):
            return pod
    return None


def test_the_digits_example_trains_compiles_and_serves_correct_predictions(
    kube: Kube, node: NodeAgent, kiln_operator: KilnOperator, prometheus: Prometheus, workload_namespace: str
) -> None:
    namespace, manifest = workload_namespace, tj.example()
    name = manifest["metadata"]["name"]
    prometheus.scrape("operator", [f"127.0.0.1:{kiln_operator.metrics_port}"])

    # -- apply the example as a user would, and follow it to Serving
    with tj.StatusRecorder(kube, namespace, name) as recorder:
        kube.create_object(manifest, namespace)
        status = tj.wait_for_phase(kube, node, namespace, name, ("Serving", "Failed"), describe=kiln_operator.tail)
    assert status["phase"] == "Serving", status
    phases = recorder.phases
    assert [p for p in phases if p in ("Running", "Exporting", "Serving")] == ["Running", "Exporting", "Serving"]
    assert recorder.epochs_while("Running"), "progress was reported while training ran"
    assert status["progress"]["epoch"] >= 1
    assert status["model"]["variant"] in manifest["spec"]["export"]["variants"]
    assert status["endpoint"] == f"http://{name}-serving.{namespace}.svc:8080/v2/models/{name}"

    # -- the model card on the artifacts volume says how to prepare inputs
    output = node.claim_path(namespace, "kiln-artifacts") / namespace / name
    card = json.loads((output / constants.MODEL_CARD_FILE).read_text())
    assert card["training"]["dataset"] == "digits"

    # -- ask the server, at its pod IP, to classify real digits
    pod = wait_until(
        lambda: serving_pod(kube, namespace, name),
        120,
        "a Ready serving pod",
        describe=lambda: node.describe(namespace),
    )
    address = f"{pod['status']['podIP']}:{constants.SERVING_HTTP_PORT}"
    prometheus.scrape("serving", [address])
    client = triton.InferenceServerClient(address)
    assert client.is_model_ready(name)
    images, labels = tj.digits_inputs(card, 200)
    predictions = []
    for start in range(0, len(images), 50):
        batch = images[start : start + 50]
        tensor = triton.InferInput(card["input"]["name"], list(batch.shape), "FP32")
        tensor.set_data_from_numpy(batch)
        result = client.infer(name, [tensor])
        predictions.append(result.as_numpy(card["output"]["name"]).argmax(axis=1))
    accuracy = float((np.concatenate(predictions) == labels).mean())
    assert accuracy >= 0.85, f"served model got {accuracy:.0%} of 200 real digits right"

    # -- `kubectl get tj` columns
    table = kube.table(tj.path(namespace, name))
    row = dict(zip([c["name"] for c in table["columnDefinitions"]], table["rows"][0]["cells"], strict=True))
    assert row["Phase"] == "Serving"
    assert row["Epoch"] == status["progress"]["epoch"]
    assert row["Accuracy"] == status["progress"]["valAccuracy"]
    assert row["Endpoint"] == status["endpoint"]

    # -- Prometheus scraped the server's request counter and the operator's metrics
    def served_requests() -> float:
        found = prometheus.query(f'sum(kiln_serving_requests_total{{model="{name}"}})')
        return float(found[0]["value"][1]) if found else 0.0

    wait_until(
        lambda: served_requests() >= 4,
        60,
        "Prometheus to scrape kiln_serving_requests_total",
        describe=lambda: str(prometheus.targets_health()),
    )
    wait_until(
        lambda: prometheus.query('kiln_operator_phase_transitions_total{to="Serving"}'),
        60,
        "Prometheus to scrape the operator's phase transitions",
        describe=lambda: str(prometheus.targets_health()),
    )
