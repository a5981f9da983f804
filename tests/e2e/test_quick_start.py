"""The README's cluster quick start, executed on the real node with the README's own commands.

helm installs the operator from the kiln-operator image (restricted PodSecurity enforced, probes make it Ready);
`kubectl apply` of deploy/examples/digits-cnn.yaml trains, compiles and serves in pods from the kiln-trainer and
kiln-serving images; the answer comes back through `kubectl port-forward` + curl, through the Service's ClusterIP
(kube-proxy) with tritonclient, and from another pod through cluster DNS; Prometheus finds every kiln pod through
the API server.
"""

import json
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import trainingjobs as tj
import tritonclient.http as triton

from kiln.api import constants
from kiln_cluster.cluster import Cluster
from kiln_cluster.prometheus import Prometheus
from kiln_cluster.rest import ApiError, Kube
from kiln_cluster.waiting import wait_until

from . import clusterops

Obj = dict[str, Any]
# The first test of the tier builds and imports images and brings the node up: well past the default limit.
pytestmark = pytest.mark.timeout(2400)
ROOT = Path(__file__).resolve().parents[2]
NAME, NAMESPACE = "digits-cnn", "default"
PRIVILEGED_POD: Obj = {
    "apiVersion": "v1",
    "kind": "Pod",
    "metadata": {"name": "privileged"},
    "spec": {"containers": [{"name": "c", "image": "kiln-serving:0.1.0", "securityContext": {"privileged": True}}]},
}


def test_every_command_the_e2e_runs_stands_in_the_readme_word_for_word() -> None:
    readme = (ROOT / "README.md").read_text()
    flattened = readme.replace(" \\\n  ", " ")
    for command in clusterops.README_COMMANDS:
        assert command in flattened, f"README.md no longer says `{command}`"


def test_helm_install_runs_the_operator_pod_ready_under_restricted_pod_security(kube: Kube, kiln_release: None) -> None:
    [pod] = kube.list("/api/v1/namespaces/kiln-system/pods", labelSelector="app.kubernetes.io/component=operator")
    [container] = pod["spec"]["containers"]
    assert container["image"] == "kiln-operator:0.1.0"
    assert container.get("readinessProbe") and container.get("livenessProbe")
    conditions = {c["type"]: c["status"] for c in pod["status"]["conditions"]}
    assert conditions["Ready"] == "True"
    for namespace in ("kiln-system", NAMESPACE):
        with pytest.raises(ApiError) as refused:
            kube.create_object(PRIVILEGED_POD, namespace, dry_run=True)
        assert refused.value.status == 403 and 'violates PodSecurity "restricted:latest"' in refused.value.message


def test_the_quick_start_trains_serves_and_answers_through_port_forward_cluster_ip_and_dns(
    cluster: Cluster,
    kube: Kube,
    kubectl: clusterops.Cli,
    kiln_release: None,
    prometheus: Prometheus,
    tmp_path: Path,
) -> None:
    # -- kubectl apply -f deploy/examples/digits-cnn.yaml, then follow it to Serving
    def describe() -> str:
        return clusterops.describe_namespace(kube, NAMESPACE)

    applied_at = time.monotonic()
    with tj.StatusRecorder(kube, NAMESPACE, NAME) as recorder:
        kubectl.shell(clusterops.README_APPLY)
        status = tj.wait_for_phase(
            kube,
            NAMESPACE,
            NAME,
            ("Serving", "Failed"),
            describe=lambda: clusterops.describe_namespace(kube, NAMESPACE),
        )
    assert status["phase"] == "Serving", status
    assert [p for p in recorder.phases if p in ("Running", "Exporting", "Serving")] == [
        "Running",
        "Exporting",
        "Serving",
    ]
    assert recorder.epochs_while("Running"), "progress was reported while training ran"
    trainer = tj.trainer_pods(kube, NAMESPACE, NAME)[0]
    assert trainer["spec"]["containers"][0]["image"] == "kiln-trainer:0.1.0"
    print(f"serving container start -> Ready: {clusterops.serving_start_to_ready(kube, NAMESPACE, NAME):.1f}s")

    # -- `kubectl get tj digits-cnn` shows phase, epoch, accuracy, model and endpoint
    table = kubectl.shell(clusterops.README_GET)
    header, row = table.strip().splitlines()
    columns = dict(zip(header.split(), row.split(), strict=False))
    assert columns["PHASE"] == "Serving"
    assert columns["EPOCH"] == str(status["progress"]["epoch"])
    assert float(columns["ACCURACY"]) == pytest.approx(status["progress"]["valAccuracy"], abs=1e-3)
    assert columns["MODEL"] == status["model"]["variant"]
    assert columns["ENDPOINT"] == status["endpoint"] == f"http://{NAME}-serving.{NAMESPACE}.svc:8080/v2/models/{NAME}"

    # -- port-forward + curl, exactly as the README
    forward = kubectl.background(clusterops.README_PORT_FORWARD, tmp_path / "port-forward.log")
    try:
        wait_until(
            lambda: '"ready":true' in kubectl.shell(clusterops.README_READY, timeout=10, check=False).replace(" ", ""),
            60,
            "the server to answer through kubectl port-forward",
            describe=lambda: (tmp_path / "port-forward.log").read_text(),
            interval=1,
        )
        first_answer_s = time.monotonic() - applied_at
        answer = json.loads(kubectl.shell(clusterops.README_CLASSIFY))
    finally:
        forward.terminate()
        forward.wait(10)
    assert answer["predictions"][0]["label"] == "8", answer
    print(f"kubectl apply -> first correct answer through the Service: {first_answer_s:.0f}s")

    # -- tritonclient through the Service's ClusterIP (kube-proxy), on real digits
    card = json.loads((tj.output_dir(cluster, NAMESPACE, NAME) / constants.MODEL_CARD_FILE).read_text())
    service = kube.get(f"/api/v1/namespaces/{NAMESPACE}/services/{NAME}-serving")
    assert service["spec"]["clusterIP"].startswith("198.19.")
    client = triton.InferenceServerClient(f"{service['spec']['clusterIP']}:{constants.SERVING_HTTP_PORT}")
    images, labels = tj.digits_inputs(card, 200)
    predictions = []
    for start in range(0, len(images), 50):
        batch = images[start : start + 50]
        tensor = triton.InferInput(card["input"]["name"], list(batch.shape), "FP32")
        tensor.set_data_from_numpy(batch)
        predictions.append(client.infer(NAME, [tensor]).as_numpy(card["output"]["name"]).argmax(axis=1))
    accuracy = float((np.concatenate(predictions) == labels).mean())
    assert accuracy >= 0.85, f"served model got {accuracy:.0%} of 200 real digits right"

    # -- from another pod, by the Service's DNS name
    log = clusterops.run_client_pod(kube, NAMESPACE, f"{NAME}-serving.{NAMESPACE}.svc", NAME, card)
    assert log.strip().splitlines()[-1] == "8", log

    # -- Prometheus found the trainer, serving and operator pods through the API server
    def scraped(query: str) -> float:
        found = prometheus.query(query)
        return float(found[0]["value"][1]) if found else 0.0

    for query, what in (
        (f'sum(kiln_serving_requests_total{{model="{NAME}"}})', "the server's request counter"),
        (f'max(max_over_time(kiln_trainer_epoch{{namespace="{NAMESPACE}"}}[30m]))', "the trainer's epochs"),
        ('sum(kiln_operator_phase_transitions_total{to="Serving"})', "the operator's phase transitions"),
    ):
        wait_until(lambda q=query: scraped(q) >= 1, 90, what, describe=lambda: str(prometheus.targets_health()))

    # -- leave the node's CPUs to the next tests (2 cores: the server holds one)
    kubectl("delete", "tj", NAME, "-n", NAMESPACE, "--wait=true", timeout=180)
