"""The node agent behaves like a kubelet to the real controllers: Jobs complete, Deployments become ready,
deletion kills processes, owners' deletion cascades, volumes and identities reach the processes.

Not covered, because the API server refuses it: Services get no endpoints. EndpointSlice and Endpoints
validation rejects loopback addresses ("may not be in the loopback range"), and pod IPs here are 127.x.y.z.
kiln relies on neither: status comes from Jobs, Deployments and pods, and tests dial pod IPs.
"""

import signal
import textwrap
import urllib.request
from typing import Any

from kiln_cluster.kubelet import NodeAgent
from kiln_cluster.procs import alive
from kiln_cluster.rest import Kube
from kiln_cluster.waiting import wait_until

Obj = dict[str, Any]


def job(name: str, script: str, **spec: Any) -> Obj:
    """A Job of one python container running `script`."""
    pod_spec = {
        "restartPolicy": "Never",
        "containers": [
            {
                "name": "main",
                "image": "python:3",
                "command": ["python", "-c", textwrap.dedent(script)],
                "env": [{"name": "POD_NAME", "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}}}],
            }
        ],
    }
    template_extra = spec.pop("pod", {})
    return {
        "apiVersion": "batch/v1",
        "kind": "Job",
        "metadata": {"name": name},
        "spec": {"backoffLimit": 0, **spec, "template": {"spec": {**pod_spec, **template_extra}}},
    }


def job_condition(kube: Kube, namespace: str, name: str) -> str | None:
    """'Complete' or 'Failed' once the Job controller has decided, else None."""
    current = kube.get(f"/apis/batch/v1/namespaces/{namespace}/jobs/{name}")
    for condition in current.get("status", {}).get("conditions") or []:
        if condition["type"] in ("Complete", "Failed") and condition["status"] == "True":
            return str(condition["type"])
    return None


def pods_of(kube: Kube, namespace: str, selector: str) -> list[Obj]:
    return kube.list(f"/api/v1/namespaces/{namespace}/pods", labelSelector=selector)


def finished(kube: Kube, node: NodeAgent, namespace: str, name: str) -> str:
    return wait_until(
        lambda: job_condition(kube, namespace, name),
        120,
        f"job {name} to finish",
        describe=lambda: node.describe(namespace),
    )


def test_a_job_running_python_completes_with_its_field_refs_and_termination_message(
    kube: Kube, node: NodeAgent, namespace: str
) -> None:
    script = """
        import os
        print("hello from", os.environ["POD_NAME"], "at", os.environ["POD_IP"], flush=True)
        open(os.environ["KILN_TERMINATION_LOG"], "w").write("all good")
    """
    manifest = job("hello", script)
    manifest["spec"]["template"]["spec"]["containers"][0]["env"].append(
        {"name": "POD_IP", "valueFrom": {"fieldRef": {"fieldPath": "status.podIP"}}}
    )
    kube.create_object(manifest, namespace)
    assert finished(kube, node, namespace, "hello") == "Complete"
    [pod] = pods_of(kube, namespace, "job-name=hello")
    terminated = pod["status"]["containerStatuses"][0]["state"]["terminated"]
    assert (terminated["exitCode"], terminated["reason"], terminated["message"]) == (0, "Completed", "all good")
    assert pod["status"]["phase"] == "Succeeded"
    runner = node.runner(namespace, pod["metadata"]["name"])
    assert runner is not None
    log = runner.containers[0].log.read_text()
    assert f"hello from {pod['metadata']['name']} at {pod['status']['podIP']}" in log


def test_a_failing_job_reports_exit_code_reason_and_message(kube: Kube, node: NodeAgent, namespace: str) -> None:
    script = """
        import os, sys
        open(os.environ["KILN_TERMINATION_LOG"], "w").write("data.path: /nowhere does not exist")
        sys.exit(78)
    """
    kube.create_object(job("broken", script), namespace)
    assert finished(kube, node, namespace, "broken") == "Failed"
    [pod] = pods_of(kube, namespace, "job-name=broken")
    terminated = pod["status"]["containerStatuses"][0]["state"]["terminated"]
    assert (terminated["exitCode"], terminated["reason"]) == (78, "Error")
    assert terminated["message"] == "data.path: /nowhere does not exist"
    assert pod["status"]["phase"] == "Failed"


def test_an_indexed_job_reaches_its_rank_zero_through_the_headless_service_dns_name(
    kube: Kube, node: NodeAgent, namespace: str
) -> None:
    # Rank 0 listens on 0.0.0.0 (rewritten to its own pod IP); rank 1 dials MASTER_ADDR, a pod DNS name.
    script = """
        import os, socket, time
        rank = int(os.environ["JOB_COMPLETION_INDEX"])
        if rank == 0:
            server = socket.create_server(("0.0.0.0", 29500))
            conn, _ = server.accept()
            print("rank 0 got", conn.recv(16).decode(), flush=True)
        else:
            for _ in range(600):
                try:
                    socket.create_connection((os.environ["MASTER_ADDR"], 29500), timeout=1).sendall(b"hello")
                    break
                except OSError:
                    time.sleep(0.1)
            print("rank 1 sent to", os.environ["MASTER_ADDR"], flush=True)
    """
    kube.create_object(
        {
            "apiVersion": "v1",
            "kind": "Service",
            "metadata": {"name": "workers"},
            "spec": {"clusterIP": "None", "selector": {"job-name": "ranks"}, "ports": [{"port": 29500}]},
        },
        namespace,
    )
    manifest = job(
        "ranks", script, completionMode="Indexed", completions=2, parallelism=2, pod={"subdomain": "workers"}
    )
    manifest["spec"]["template"]["spec"]["containers"][0]["env"].append(
        {"name": "MASTER_ADDR", "value": f"ranks-0.workers.{namespace}.svc.cluster.local"}
    )
    kube.create_object(manifest, namespace)
    assert finished(kube, node, namespace, "ranks") == "Complete"
    pods = {
        p["metadata"]["annotations"]["batch.kubernetes.io/job-completion-index"]: p
        for p in pods_of(kube, namespace, "job-name=ranks")
    }
    rank0_ip = pods["0"]["status"]["podIP"]
    assert rank0_ip != pods["1"]["status"]["podIP"]
    logs = {
        rank: node.runner(namespace, p["metadata"]["name"]).containers[0].log.read_text()  # type: ignore[union-attr]
        for rank, p in pods.items()
    }
    assert "rank 0 got hello" in logs["0"]
    assert f"rank 1 sent to {rank0_ip}" in logs["1"]


def http_server(name: str, replicas: int) -> Obj:
    container = {
        "name": "web",
        "image": "python:3",
        "command": ["python", "-m", "http.server", "8080", "--bind", "0.0.0.0"],
        "ports": [{"name": "http", "containerPort": 8080}],
        "readinessProbe": {"httpGet": {"path": "/", "port": "http"}, "periodSeconds": 1},
    }
    labels = {"app": name}
    return {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": {"name": name},
        "spec": {
            "replicas": replicas,
            "selector": {"matchLabels": labels},
            "template": {
                "metadata": {"labels": labels},
                "spec": {"containers": [container], "terminationGracePeriodSeconds": 5},
            },
        },
    }


def test_deployment_pods_become_ready_through_http_probes_on_their_own_ips_and_gc_cascades(
    kube: Kube, node: NodeAgent, namespace: str
) -> None:
    kube.create_object(http_server("web", replicas=2), namespace)
    path = f"/apis/apps/v1/namespaces/{namespace}/deployments/web"
    wait_until(
        lambda: kube.get(path).get("status", {}).get("readyReplicas") == 2,
        120,
        "two ready replicas",
        describe=lambda: node.describe(namespace),
    )

    pods = pods_of(kube, namespace, "app=web")
    ips = {p["status"]["podIP"] for p in pods}
    assert len(ips) == 2, "each pod has its own loopback address"
    for ip in ips:
        with urllib.request.urlopen(f"http://{ip}:8080/", timeout=10) as answer:
            assert answer.status == 200

    # Deleting the Deployment cascades through the garbage collector to ReplicaSets, pods and processes.
    pids = [node.process(namespace, p["metadata"]["name"]).pid for p in pods]  # type: ignore[union-attr]
    kube.delete(path, propagation="Background")
    wait_until(
        lambda: not kube.list(f"/apis/apps/v1/namespaces/{namespace}/replicasets"),
        60,
        "the garbage collector to delete the ReplicaSet",
    )
    wait_until(
        lambda: not pods_of(kube, namespace, "app=web"),
        60,
        "the pods to be deleted",
        describe=lambda: node.describe(namespace),
    )
    assert not any(alive(pid) for pid in pids)


def test_deleting_a_pod_sends_sigterm_and_removes_the_object_once_the_process_exits(
    kube: Kube, node: NodeAgent, namespace: str
) -> None:
    script = """
        import signal, sys, time
        signal.signal(signal.SIGTERM, lambda *_: (print("got SIGTERM", flush=True), sys.exit(0)))
        print("started", flush=True)
        time.sleep(600)
    """
    pod = {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": "sleeper"},
        "spec": {
            "terminationGracePeriodSeconds": 20,
            "containers": [{"name": "main", "image": "python:3", "command": ["python", "-c", textwrap.dedent(script)]}],
        },
    }
    kube.create_object(pod, namespace)
    path = f"/api/v1/namespaces/{namespace}/pods/sleeper"
    wait_until(lambda: kube.get(path)["status"].get("phase") == "Running", 60, "the pod to run")
    runner = node.runner(namespace, "sleeper")
    assert runner is not None
    wait_until(lambda: "started" in runner.containers[0].log.read_text(), 60, "the process to start")
    pid = runner.containers[0].proc.pid  # type: ignore[union-attr]
    kube.delete(path)
    wait_until(
        lambda: kube.get_or_none(path) is None,
        60,
        "the pod object to be removed",
        describe=lambda: node.describe(namespace),
    )
    assert not alive(pid)
    assert "got SIGTERM" in runner.containers[0].log.read_text()


def test_restart_policy_always_restarts_a_crashing_container_in_place(
    kube: Kube, node: NodeAgent, namespace: str
) -> None:
    pod = {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": "crasher"},
        "spec": {
            "restartPolicy": "Always",
            "terminationGracePeriodSeconds": 1,
            "containers": [{"name": "main", "image": "python:3", "command": ["python", "-c", "raise SystemExit(3)"]}],
        },
    }
    kube.create_object(pod, namespace)
    path = f"/api/v1/namespaces/{namespace}/pods/crasher"

    def restarted() -> Obj | None:
        statuses = kube.get(path)["status"].get("containerStatuses") or [{}]
        return statuses[0] if statuses[0].get("restartCount", 0) >= 2 else None

    status = wait_until(restarted, 60, "two restarts", describe=lambda: node.describe(namespace))
    assert status["lastState"]["terminated"]["exitCode"] == 3
    assert kube.get(path)["status"]["phase"] == "Running"


def test_volumes_and_the_service_account_token_reach_the_process(kube: Kube, node: NodeAgent, namespace: str) -> None:
    kube.create_object(
        {
            "apiVersion": "v1",
            "kind": "ConfigMap",
            "metadata": {"name": "settings"},
            "data": {"greeting.txt": "hello from a ConfigMap"},
        },
        namespace,
    )
    kube.create_object(
        {
            "apiVersion": "v1",
            "kind": "PersistentVolumeClaim",
            "metadata": {"name": "shared"},
            "spec": {"accessModes": ["ReadWriteMany"], "resources": {"requests": {"storage": "1Gi"}}},
        },
        namespace,
    )
    script = """
        import os, sys
        from kubernetes import client, config
        config.load_kube_config()
        review = client.AuthenticationV1Api().create_self_subject_review({"apiVersion": "authentication.k8s.io/v1",
                                                                          "kind": "SelfSubjectReview"})
        greeting = open(sys.argv[1]).read()
        with open(os.path.join(sys.argv[2], "out.txt"), "w") as out:
            out.write(f"{greeting} / {review.status.user_info.username}")
    """
    manifest = job("volumes", script)
    container = manifest["spec"]["template"]["spec"]["containers"][0]
    container["args"] = ["/etc/demo/greeting.txt", "/data/results"]
    container["volumeMounts"] = [
        {"name": "settings", "mountPath": "/etc/demo"},
        {"name": "shared", "mountPath": "/data"},
    ]
    manifest["spec"]["template"]["spec"]["volumes"] = [
        {"name": "settings", "configMap": {"name": "settings"}},
        {"name": "shared", "persistentVolumeClaim": {"claimName": "shared"}},
    ]
    (node.claim_path(namespace, "shared") / "results").mkdir(parents=True)
    kube.create_object(manifest, namespace)
    assert finished(kube, node, namespace, "volumes") == "Complete"
    written = (node.claim_path(namespace, "shared") / "results" / "out.txt").read_text()
    assert written == f"hello from a ConfigMap / system:serviceaccount:{namespace}:default"


def test_killing_a_pods_process_fails_it_with_the_signal_exit_code(kube: Kube, node: NodeAgent, namespace: str) -> None:
    kube.create_object(job("victim", "import time; print('up', flush=True); time.sleep(600)"), namespace)
    wait_until(lambda: pods_of(kube, namespace, "job-name=victim"), 60, "the pod to exist")
    name = pods_of(kube, namespace, "job-name=victim")[0]["metadata"]["name"]
    wait_until(lambda: node.process(namespace, name), 60, "the process to start")
    node.kill(namespace, name, signal.SIGKILL)
    assert finished(kube, node, namespace, "victim") == "Failed"
    [pod] = pods_of(kube, namespace, "job-name=victim")
    assert pod["status"]["containerStatuses"][0]["state"]["terminated"]["exitCode"] == 128 + signal.SIGKILL
