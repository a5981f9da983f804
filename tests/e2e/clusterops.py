"""What the e2e tests do to the cluster as a person would: the README's commands, kubectl and helm, and what to
print when something fails.

The README's cluster quick start is the script: each command below is asserted to stand in README.md word for
word (test_quick_start.py), then run with the real kubectl / helm / curl against the real cluster.
"""

import datetime
import json
import os
import shlex
import shutil
import subprocess
import time
import uuid
from pathlib import Path
from typing import Any

import pytest

from kiln_cluster import binaries
from kiln_cluster import prometheus as prom
from kiln_cluster.rest import ApiError, Kube
from kiln_cluster.waiting import wait_until

Obj = dict[str, Any]
README = Path(__file__).resolve().parents[2] / "README.md"

README_INSTALL = "helm install kiln charts/kiln -n kiln-system --create-namespace"
README_ROLLOUT = "kubectl -n kiln-system rollout status deployment/kiln"
README_APPLY = "kubectl apply -f deploy/examples/digits-cnn.yaml"
README_GET = "kubectl get tj digits-cnn"
README_PORT_FORWARD = "kubectl port-forward svc/digits-cnn-serving 8080:8080"
README_READY = "curl -s localhost:8080/v2/health/ready"
README_CLASSIFY = (
    "curl -s -X POST --data-binary @deploy/kind/digit-8.png -H 'Content-Type: application/octet-stream' "
    "'localhost:8080/v2/models/digits-cnn/classify?top_k=3'"
)
README_COMMANDS = (
    README_INSTALL,
    README_ROLLOUT,
    README_APPLY,
    README_GET,
    README_PORT_FORWARD,
    README_READY,
    README_CLASSIFY,
)

PROMETHEUS_ROLE: Obj = {
    "apiVersion": "rbac.authorization.k8s.io/v1",
    "kind": "ClusterRole",
    "metadata": {"name": "kiln:prometheus"},
    "rules": [{"apiGroups": [""], "resources": ["pods"], "verbs": ["get", "list", "watch"]}],
}
PROMETHEUS_BINDING: Obj = {
    "apiVersion": "rbac.authorization.k8s.io/v1",
    "kind": "ClusterRoleBinding",
    "metadata": {"name": "kiln:prometheus"},
    "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole", "name": "kiln:prometheus"},
    "subjects": [{"apiGroup": "rbac.authorization.k8s.io", "kind": "User", "name": "kiln:prometheus"}],
}


class Cli:
    """A command-line tool (kubectl, helm) run with the cluster's kubeconfig from the repository root."""

    def __init__(self, binary: Path | None, kubeconfig: Path, cwd: Path) -> None:
        assert binary is not None, "the e2e fixtures check kubectl and helm exist first"
        self.binary, self.cwd = binary, cwd
        tools = f"{binary.parent}:{os.environ.get('PATH', '/usr/bin:/bin')}"
        self.env = {**os.environ, "KUBECONFIG": str(kubeconfig), "PATH": tools}

    def __call__(self, *args: str, timeout: float = 120, check: bool = True) -> str:
        done = subprocess.run(
            [str(self.binary), *args], env=self.env, cwd=self.cwd, capture_output=True, text=True, timeout=timeout
        )
        if check and done.returncode != 0:
            raise AssertionError(f"{self.binary.name} {shlex.join(args)} failed ({done.returncode}):\n{done.stderr}")
        return done.stdout

    def shell(self, command: str, timeout: float = 120, check: bool = True) -> str:
        """A README line as written (`kubectl ...`, `helm ...`, `curl ...`), through the shell; its stdout (with
        check=False, "" when it fails: for probes retried until they answer)."""
        done = subprocess.run(
            command, shell=True, env=self.env, cwd=self.cwd, capture_output=True, text=True, timeout=timeout
        )
        if done.returncode != 0 and not check:
            return ""
        if done.returncode != 0:
            raise AssertionError(f"`{command}` failed ({done.returncode}):\n{done.stdout}\n{done.stderr}")
        return done.stdout

    def background(self, command: str, log: Path) -> subprocess.Popen[bytes]:
        """A README line that keeps running (`kubectl port-forward ...`), its output to `log`."""
        with log.open("wb") as out:
            return subprocess.Popen(
                shlex.split(command), env=self.env, cwd=self.cwd, stdout=out, stderr=subprocess.STDOUT
            )


def describe_namespace(kube: Kube, namespace: str) -> str:
    """Pods with their states and log tails (through the API server, as `kubectl logs`), and the events."""
    out = [f"===== namespace {namespace} at {time.strftime('%H:%M:%S')}"]
    try:
        for event in kube.list(f"/api/v1/namespaces/{namespace}/events")[-40:]:
            involved = event.get("involvedObject", {})
            out.append(
                f"event {involved.get('kind')}/{involved.get('name')}: {event.get('reason')}: {event.get('message')}"
            )
        for tj in kube.list(f"/apis/kiln.dev/v1alpha1/namespaces/{namespace}/trainingjobs"):
            out.append(f"trainingjob {tj['metadata']['name']} status: {json.dumps(tj.get('status', {}))[:3000]}")
        for pod in kube.list(f"/api/v1/namespaces/{namespace}/pods"):
            name = pod["metadata"]["name"]
            out.append(f"pod {name} status: {json.dumps(pod.get('status', {}))[:1500]}")
            out.append(pod_log(kube, namespace, name, tail=40))
    except (ApiError, LookupError) as err:
        out.append(f"(could not list: {err})")
    return "\n".join(out)


def pod_log(kube: Kube, namespace: str, pod: str, tail: int | None = None) -> str:
    """A pod's log through the API server and kubelet (what `kubectl logs` shows)."""
    params: dict[str, Any] = {"tailLines": tail} if tail else {}
    try:
        return kube.text(f"/api/v1/namespaces/{namespace}/pods/{pod}/log", **params)
    except ApiError as err:
        return f"(no log for {pod}: {err.message})"


def missing_prerequisite() -> str | None:
    """Why a real node cannot run here, or None."""
    if os.geteuid() != 0:
        return "the real node needs root"
    try:
        binaries.control_plane()
        binaries.node()
    except LookupError as missing:
        return str(missing)
    for tool in ("helm", "kubectl"):
        if binaries.find(tool) is None:
            return f"{tool} is not built: run `make test` (hack/install-test-tools.sh builds it)"
    if shutil.which("docker") is None and shutil.which("podman") is None:
        return "no image builder (Docker or podman): hack/install-node-tools.sh installs podman on Debian"
    return prom.skip_reason()


def require_prerequisites() -> None:
    reason = missing_prerequisite()
    if reason is None:
        return
    if os.environ.get("CI") == "true":
        pytest.fail(f"e2e tier cannot run under CI: {reason}", pytrace=False)
    pytest.skip(reason)


CLIENT_SCRIPT = """
import json, sys, urllib.request
host, model = sys.argv[1], sys.argv[2]
sample = json.load(open("/client/digit-8.json"))
base = f"http://{host}:8080/v2/models/{model}"
meta = json.load(urllib.request.urlopen(base, timeout=30))
body = {"inputs": [{"name": meta["inputs"][0]["name"], "shape": sample["shape"], "datatype": "FP32",
                    "data": sample["data"]}]}
request = urllib.request.Request(base + "/infer", json.dumps(body).encode(), {"Content-Type": "application/json"})
scores = json.load(urllib.request.urlopen(request, timeout=30))["outputs"][0]["data"]
print(max(range(len(scores)), key=scores.__getitem__))
"""
RESTRICTED = {
    "runAsNonRoot": True,
    "runAsUser": 1000,
    "allowPrivilegeEscalation": False,
    "capabilities": {"drop": ["ALL"]},
    "seccompProfile": {"type": "RuntimeDefault"},
}


def run_client_pod(kube: Kube, namespace: str, host: str, model: str, card: Obj) -> str:
    """Run an OIP client (Python's http client in the kiln-serving image) in a pod that asks `host` to classify
    deploy/kind/digit-8.json; its log, whose last line is the predicted class."""
    sample = (README.parent / "deploy" / "kind" / "digit-8.json").read_text()
    name = f"client-{uuid.uuid4().hex[:6]}"
    kube.create_object(
        {
            "apiVersion": "v1",
            "kind": "ConfigMap",
            "metadata": {"name": name},
            "data": {"client.py": CLIENT_SCRIPT, "digit-8.json": sample},
        },
        namespace,
    )
    kube.create_object(
        {
            "apiVersion": "v1",
            "kind": "Pod",
            "metadata": {"name": name},
            "spec": {
                "restartPolicy": "Never",
                "containers": [
                    {
                        "name": "client",
                        "image": "kiln-serving:0.1.0",
                        "imagePullPolicy": "IfNotPresent",
                        "command": ["python", "/client/client.py", host, model],
                        "securityContext": RESTRICTED,
                        "volumeMounts": [{"name": "client", "mountPath": "/client"}],
                    }
                ],
                "volumes": [{"name": "client", "configMap": {"name": name}}],
            },
        },
        namespace,
    )

    def finished() -> str | None:
        phase = kube.get(f"/api/v1/namespaces/{namespace}/pods/{name}").get("status", {}).get("phase")
        return phase if phase in ("Succeeded", "Failed") else None

    phase = wait_until(
        finished, 120, f"client pod {name} to finish", describe=lambda: describe_namespace(kube, namespace)
    )
    log = pod_log(kube, namespace, name)
    assert phase == "Succeeded", log
    return log


def operator_log(kube: Kube, tail: int = 80) -> str:
    """The operator pod's log tail (kiln-system, as helm installed it), for failure messages."""
    pods = kube.list("/api/v1/namespaces/kiln-system/pods", labelSelector="app.kubernetes.io/component=operator")
    return "".join(
        f"\n--- operator {p['metadata']['name']} ---\n" + pod_log(kube, "kiln-system", p["metadata"]["name"], tail)
        for p in pods
    )


def serving_start_to_ready(kube: Kube, namespace: str, name: str) -> float:
    """Seconds from the serving container's start to its pod's Ready condition (kubelet's timestamps)."""
    selector = f"kiln.dev/trainingjob={name},app.kubernetes.io/component=serving"
    [pod] = kube.list(f"/api/v1/namespaces/{namespace}/pods", labelSelector=selector)
    started = pod["status"]["containerStatuses"][0]["state"]["running"]["startedAt"]
    ready = next(c["lastTransitionTime"] for c in pod["status"]["conditions"] if c["type"] == "Ready")
    return (_timestamp(ready) - _timestamp(started)).total_seconds()


def _timestamp(value: str) -> datetime.datetime:
    return datetime.datetime.fromisoformat(value.replace("Z", "+00:00"))
