"""Scenario 4: failures. A config error fails the TrainingJob at once, naming the pod; a trainer killed
mid-training is retried by the Job and the new pod resumes from the last checkpoint without redoing an epoch.
"""

import signal
from typing import Any

import trainingjobs as tj
from kiln_cluster.chart import KilnOperator
from kiln_cluster.kubelet import NodeAgent
from kiln_cluster.rest import Kube

from kiln.api import constants

Obj = dict[str, Any]


def test_a_trainer_config_error_fails_the_trainingjob_at_once_naming_the_pod(
    kube: Kube, node: NodeAgent, kiln_operator: KilnOperator, workload_namespace: str
) -> None:
    namespace = workload_namespace
    manifest = tj.digits_job("no-data", data={"dataset": "imagefolder", "path": "/nonexistent/kiln-test-images"})
    manifest["spec"]["runPolicy"] = {"backoffLimit": 3}
    kube.create_object(manifest, namespace)
    status = tj.wait_for_phase(
        kube, node, namespace, "no-data", ("Failed", "Succeeded", "Serving"), describe=kiln_operator.tail
    )
    assert status["phase"] == "Failed"
    failed = tj.condition(status, "Failed")
    [pod] = tj.trainer_pods(kube, namespace, "no-data")  # exit code 78 is not retried
    assert failed["reason"] == "InvalidConfig"
    assert pod["metadata"]["name"] in failed["message"]
    assert f"exit code {constants.EXIT_CONFIG_ERROR}" in failed["message"]
    assert "/nonexistent/kiln-test-images" in failed["message"]


def test_a_trainer_killed_mid_training_is_retried_and_resumes_from_its_checkpoint(
    kube: Kube, node: NodeAgent, kiln_operator: KilnOperator, workload_namespace: str
) -> None:
    namespace, name, epochs = workload_namespace, "resume", 6
    manifest = tj.digits_job(name, data={"maxSamples": 1200}, training={"epochs": epochs, "checkpointEvery": 1})
    kube.create_object(manifest, namespace)
    checkpoints = tj.checkpoints_dir(node, namespace, name)

    # -- kill the trainer as soon as its first checkpoint is on the volume
    tj.wait_for_first_checkpoint(node, namespace, checkpoints)
    [first] = tj.trainer_pods(kube, namespace, name)
    node.kill(namespace, first["metadata"]["name"], signal.SIGKILL)
    runner = node.runner(namespace, first["metadata"]["name"])
    assert runner is not None and runner.containers[0].proc is not None
    runner.containers[0].proc.wait(30)
    done_before_kill = max(tj.saved_epochs(checkpoints))
    assert done_before_kill < epochs, "the kill came before training ended"

    # -- the Job replaces the pod; the new one continues after the checkpoint
    status = tj.wait_for_phase(kube, node, namespace, name, ("Succeeded", "Failed"), describe=kiln_operator.tail)
    assert status["phase"] == "Succeeded", status
    pods = tj.trainer_pods(kube, namespace, name)
    assert len(pods) == 2
    killed = pods[0]["status"]["containerStatuses"][0]["state"]["terminated"]
    assert killed["exitCode"] == 128 + signal.SIGKILL
    retry = node.runner(namespace, pods[1]["metadata"]["name"])
    assert retry is not None
    resumed = tj.logged_epochs(retry.containers[0].log)
    assert resumed == list(range(done_before_kill + 1, epochs + 1)), "no epoch redone, none skipped"
    assert status["progress"]["epoch"] == epochs
    assert status["restarts"] == 1
