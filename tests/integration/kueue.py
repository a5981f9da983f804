"""Kueue's real controller as a host process against the test API server, for the queueing scenario.

Kueue comes from hack/install-kueue.sh (its binary and CRDs in one folder: KILN_KUEUE_BIN, else the
script's cache folder). It runs without webhooks: nothing registers them with the API server, so kiln
creates queued Jobs suspended, as Kueue's own integrations do. Two things Kueue insists on are satisfied
locally: its webhook server needs a certificate in its certDir (a throwaway one is written), and without
internal cert management its metrics server reads a certificate from the fixed path
/etc/kueue/metrics/certs, so Kueue runs in a private mount namespace with a writable overlay on /etc (the
host's /etc is never written). That needs root; otherwise the scenario is skipped with the reason.
"""

import os
import shutil
from pathlib import Path
from typing import Any

import yaml

from kiln_cluster import pki
from kiln_cluster.controlplane import ControlPlane, free_port
from kiln_cluster.procs import Process
from kiln_cluster.waiting import wait_until

Obj = dict[str, Any]
VERSION = os.environ.get("KILN_KUEUE_VERSION", "0.17.0")
API = "kueue.x-k8s.io/v1beta2"
NAMESPACE = "kueue-system"
METRICS_CERTS = "/etc/kueue/metrics/certs"


def folder() -> Path:
    configured = os.environ.get("KILN_KUEUE_BIN", "").strip()
    if configured:
        return Path(configured)
    cache = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return cache / "kiln" / "bin" / f"kueue-{VERSION}"


def skip_reason() -> str | None:
    where = folder()
    if not (where / "kueue").is_file() or not (where / "crds").is_dir():
        return f"the Kueue scenario needs Kueue's controller and CRDs in {where}: run hack/install-kueue.sh"
    if os.geteuid() != 0 or not shutil.which("unshare"):
        return "the Kueue scenario runs Kueue in a private mount namespace, which needs root and unshare"
    return None


def crds() -> list[Obj]:
    return [yaml.safe_load(path.read_text()) for path in sorted((folder() / "crds").glob("*.yaml"))]


class Kueue:
    """One Kueue controller manager: Job integration only, no leader election, no visibility server."""

    def __init__(self, control_plane: ControlPlane, root: Path) -> None:
        self.control_plane, self.root = control_plane, root
        self.proc: Process | None = None

    def _configuration(self, certs: Path) -> Obj:
        return {
            "apiVersion": "config.kueue.x-k8s.io/v1beta2",
            "kind": "Configuration",
            "namespace": NAMESPACE,
            "health": {"healthProbeBindAddress": f"127.0.0.1:{self.health_port}"},
            "metrics": {"bindAddress": f"127.0.0.1:{free_port()}"},
            "webhook": {"host": "127.0.0.1", "port": free_port(), "certDir": str(certs)},
            "leaderElection": {"leaderElect": False},
            "internalCertManagement": {"enable": False},
            "manageJobsWithoutQueueName": False,
            "integrations": {"frameworks": ["batch/job"]},
            "featureGates": {"VisibilityOnDemand": False},
        }

    def start(self) -> None:
        certs = self.root / "certs"
        certs.mkdir(parents=True, exist_ok=True)
        pki.CertificateAuthority("kueue-test-ca").serving("kueue-webhook-service").write(certs, "tls")
        self.health_port = free_port()
        config = self.root / "kueue-config.yaml"
        config.write_text(yaml.safe_dump(self._configuration(certs)))
        upper, work = self.root / "etc-upper", self.root / "etc-work"
        upper.mkdir(exist_ok=True)
        work.mkdir(exist_ok=True)
        script = (
            f"mount -t overlay overlay -o lowerdir=/etc,upperdir={upper},workdir={work} /etc"
            f" && mkdir -p {METRICS_CERTS} && cp {certs}/tls.crt {certs}/tls.key {METRICS_CERTS}/"
            f' && exec "$0" --config={config} --zap-log-level=2'
        )
        argv = ["unshare", "--mount", "--propagation", "private", "sh", "-c", script, str(folder() / "kueue")]
        env = {**os.environ, "KUBECONFIG": str(self.control_plane.kubeconfig_path)}
        self.proc = Process("kueue", argv, self.root / "kueue.log", env=env)
        wait_until(self._healthy, 120, "Kueue to become healthy", describe=self.tail)

    def _healthy(self) -> bool:
        import urllib.request

        if self.proc is None or self.proc.poll() is not None:
            raise AssertionError(f"Kueue exited\n{self.tail()}")
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{self.health_port}/readyz", timeout=2) as answer:
                return bool(answer.status == 200)
        except OSError:
            return False

    def tail(self, lines: int = 60) -> str:
        return self.proc.tail(lines) if self.proc else "(Kueue not started)"

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.stop()


def resource_flavor(name: str) -> Obj:
    return {"apiVersion": API, "kind": "ResourceFlavor", "metadata": {"name": name}, "spec": {}}


def cluster_queue(name: str, flavor: str, cpu: str, memory: str) -> Obj:
    """A ClusterQueue open to every namespace with this much CPU and memory, and nothing to borrow."""
    return {
        "apiVersion": API,
        "kind": "ClusterQueue",
        "metadata": {"name": name},
        "spec": {
            "namespaceSelector": {},
            "resourceGroups": [
                {
                    "coveredResources": ["cpu", "memory"],
                    "flavors": [
                        {
                            "name": flavor,
                            "resources": [
                                {"name": "cpu", "nominalQuota": cpu},
                                {"name": "memory", "nominalQuota": memory},
                            ],
                        }
                    ],
                }
            ],
        },
    }


def local_queue(name: str, namespace: str, cluster_queue_name: str) -> Obj:
    return {
        "apiVersion": API,
        "kind": "LocalQueue",
        "metadata": {"name": name, "namespace": namespace},
        "spec": {"clusterQueue": cluster_queue_name},
    }
