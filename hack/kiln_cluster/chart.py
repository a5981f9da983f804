"""The Helm chart as the cluster would get it: `helm template` output, parsed, and the operator it deploys run
locally with the chart's own identity (for the API-only integration tier; the e2e tier helm-installs it for real).

`KilnOperator` applies the chart's ServiceAccount, ClusterRoles, ClusterRoleBindings and ConfigMap, asks the
TokenRequest API for the ServiceAccount's token, writes a kubeconfig with it, and runs the chart
Deployment's `kiln operator ...` arguments as a local process with the ConfigMap as its environment (the
Deployment's envFrom). Only the ports change: free loopback ports instead of the fixed 9401/8081, so two
test runs can coexist. The operator thus has exactly the permissions the chart grants, not admin's.
"""

import os
import subprocess
import sys
import urllib.request
from pathlib import Path
from typing import Any

import yaml

from kiln_cluster import binaries
from kiln_cluster.controlplane import ControlPlane, free_port
from kiln_cluster.procs import Process
from kiln_cluster.rest import Kube
from kiln_cluster.waiting import wait_until

Obj = dict[str, Any]
ROOT = Path(__file__).resolve().parents[2]
CHART = ROOT / "charts" / "kiln"
RELEASE, RELEASE_NAMESPACE = "kiln", "kiln-system"
IDENTITY_KINDS = ("ServiceAccount", "ClusterRole", "ClusterRoleBinding", "Role", "RoleBinding", "ConfigMap")


def skip_reason() -> str | None:
    """Why the chart cannot be rendered here, or None."""
    if not (CHART / "Chart.yaml").exists():
        return "charts/kiln does not exist yet"
    if binaries.find("helm") is None:
        return "helm is not installed: run `make test` (hack/install-test-tools.sh builds it) or set KILN_TEST_BIN"
    return None


def render(
    *values: str, values_files: tuple[Path, ...] = (), show_only: str | None = None, include_crds: bool = False
) -> list[Obj]:
    """`helm template kiln charts/kiln -n kiln-system [-f FILE]... [--set V]...`, as a list of manifests."""
    helm = binaries.find("helm")
    assert helm is not None, skip_reason()
    argv = [str(helm), "template", RELEASE, str(CHART), "-n", RELEASE_NAMESPACE]
    for path in values_files:
        argv += ["-f", str(path)]
    for value in values:
        argv += ["--set", value]
    if show_only:
        argv += ["--show-only", show_only]
    if include_crds:
        argv.append("--include-crds")
    done = subprocess.run(argv, capture_output=True, text=True, timeout=120)
    if done.returncode != 0:
        raise RuntimeError(f"helm template failed:\n{done.stderr}")
    return [doc for doc in yaml.safe_load_all(done.stdout) if doc]


def artifacts_claim(namespace: str) -> Obj:
    """The chart's artifacts PersistentVolumeClaim for one workload namespace."""
    [claim] = render(f"workloadNamespaces={{{namespace}}}", show_only="templates/workloads/artifacts-pvc.yaml")
    return claim


def ensure_namespace(kube: Kube, name: str) -> None:
    if kube.get_or_none(f"/api/v1/namespaces/{name}") is None:
        kube.create("/api/v1/namespaces", {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": name}})


def operator_account(manifests: list[Obj]) -> str:
    """The ServiceAccount the chart's operator Deployment runs as."""
    [deployment] = [m for m in manifests if m["kind"] == "Deployment"]
    account: str = deployment["spec"]["template"]["spec"].get("serviceAccountName", "default")
    return account


class KilnOperator:
    """`kiln operator` running as the chart's ServiceAccount; `start()`, `restart()`, `stop()`."""

    def __init__(self, control_plane: ControlPlane, manifests: list[Obj], root: Path) -> None:
        self.control_plane = control_plane
        self.manifests = manifests
        self.root = root
        root.mkdir(parents=True, exist_ok=True)
        self.proc: Process | None = None
        self.metrics_port = 0
        self.health_port = 0
        [self.deployment] = [m for m in manifests if m["kind"] == "Deployment"]
        self.pod_spec: Obj = self.deployment["spec"]["template"]["spec"]
        self.account = operator_account(manifests)

    def install_identity(self) -> None:
        """Apply what gives the operator its identity, permissions and settings."""
        kube = self.control_plane.kube
        ensure_namespace(kube, RELEASE_NAMESPACE)
        for manifest in self.manifests:
            if manifest["kind"] in IDENTITY_KINDS:
                kube.apply_object(manifest, RELEASE_NAMESPACE)

    def token(self) -> str:
        return self.control_plane.service_account_token(RELEASE_NAMESPACE, self.account)

    def environment(self) -> dict[str, str]:
        """The Deployment container's env and envFrom ConfigMaps, plus what a local process needs."""
        [container] = self.pod_spec["containers"]
        env = {
            "PATH": f"{Path(sys.executable).parent}:{os.environ.get('PATH', '/usr/bin:/bin')}",
            "HOME": str(self.root),
            "LANG": "C.UTF-8",
            "PYTHONUNBUFFERED": "1",
        }
        if os.environ.get("PYTHONPATH"):
            env["PYTHONPATH"] = os.environ["PYTHONPATH"]
        config_maps = {m["metadata"]["name"]: m for m in self.manifests if m["kind"] == "ConfigMap"}
        for source in container.get("envFrom") or []:
            if "configMapRef" in source:
                env.update(config_maps[source["configMapRef"]["name"]].get("data") or {})
        env.update({e["name"]: e["value"] for e in container.get("env") or [] if "value" in e})
        kubeconfig = self.control_plane.write_kubeconfig(self.root / "operator.kubeconfig", {"token": self.token()})
        env["KUBECONFIG"] = str(kubeconfig)
        return env

    def argv(self) -> list[str]:
        """The chart's command line, with this run's ports and loopback as the bind address."""
        [container] = self.pod_spec["containers"]
        args = [
            a
            for a in container.get("args") or []
            if not a.startswith(("--metrics-port", "--liveness-port", "--bind-host"))
        ]
        self.metrics_port, self.health_port = free_port(), free_port()
        args += [f"--metrics-port={self.metrics_port}", f"--liveness-port={self.health_port}", "--bind-host=127.0.0.1"]
        command = container.get("command") or ["kiln"]
        assert command == ["kiln"], f"the chart's operator container runs kiln, not {command}"
        return [str(Path(sys.executable).parent / "kiln"), *args]

    def start(self) -> None:
        self.install_identity()
        proc = self.proc = Process(
            "kiln-operator", self.argv(), self.root / "operator.log", env=self.environment(), cwd=self.root
        )
        wait_until(
            lambda: proc.poll() is not None or self.healthy(),
            120,
            "the operator's liveness endpoint",
            describe=self.tail,
        )
        if proc.poll() is not None:
            raise RuntimeError(f"kiln operator exited with {proc.poll()}\n{self.tail()}")

    def healthy(self) -> bool:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{self.health_port}/healthz", timeout=2) as answer:
                return bool(answer.status == 200)
        except OSError:
            return False

    def stop(self) -> None:
        if self.proc:
            self.proc.stop(grace=15)

    def restart(self) -> None:
        self.stop()
        self.start()

    def tail(self, lines: int = 60) -> str:
        return self.proc.tail(lines) if self.proc else "(operator not started)"
