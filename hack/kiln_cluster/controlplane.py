"""A real Kubernetes control plane on loopback: etcd, kube-apiserver, kube-controller-manager, kube-scheduler.

envtest's flags are the baseline, taken further so workloads behave as in a cluster:

- The API server authorizes with RBAC, authenticates x509 client certificates from the session's CA and
  service-account tokens signed by the session's key pair, and serves TokenRequest (issuer
  `https://127.0.0.1:<port>`, audience the same). The ServiceAccount admission plugin stays *enabled*
  (envtest disables it because it has no controller-manager): here the controller-manager runs the
  serviceaccount and root-ca-cert-publisher controllers, so every namespace gets its `default`
  ServiceAccount and `kube-root-ca.crt`, and pods get the standard projected `kube-api-access-*` volume,
  which the node agent fills with a TokenRequest token bound to the pod.
- kube-controller-manager runs every default controller (Jobs create pods, Deployments ReplicaSets,
  EndpointSlices, garbage collection, namespace deletion, PV binding), each with its own
  service-account credentials, as in kubeadm clusters.
- kube-scheduler binds pods to the node agent's node.

Every component binds 127.0.0.1 on free ports chosen at start, under a temp folder, so two test runs can
coexist. `stop()` (and, failing that, the atexit hook in `procs`) leaves no process behind.
"""

import base64
import contextlib
import socket
import ssl
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import urllib3
import yaml

from kiln_cluster import binaries, network, pki
from kiln_cluster.procs import Process
from kiln_cluster.rest import ApiError, Kube
from kiln_cluster.waiting import wait_until

ADMIN_USER = "kiln-test-admin"
SERVICE_CIDR = network.Addresses().service_cidr
API_PORT = 6443
# PodSecurity: every namespace enforces `restricted` unless labelled otherwise; kube-system is exempt.
ADMISSION_CONFIG = {
    "apiVersion": "apiserver.config.k8s.io/v1",
    "kind": "AdmissionConfiguration",
    "plugins": [
        {
            "name": "PodSecurity",
            "configuration": {
                "apiVersion": "pod-security.admission.config.k8s.io/v1",
                "kind": "PodSecurityConfiguration",
                "defaults": {
                    "enforce": "restricted",
                    "enforce-version": "latest",
                    "audit": "restricted",
                    "audit-version": "latest",
                    "warn": "restricted",
                    "warn-version": "latest",
                },
                "exemptions": {"usernames": [], "runtimeClasses": [], "namespaces": ["kube-system"]},
            },
        }
    ],
}


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago (a component that loses the race is restarted)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def kubeconfig(server: str, ca_pem: bytes, user: dict[str, str], name: str = "kiln-test") -> dict[str, Any]:
    """A one-context kubeconfig; `user` holds `token`, or `client-certificate-data`/`client-key-data`."""
    return {
        "apiVersion": "v1",
        "kind": "Config",
        "clusters": [
            {
                "name": name,
                "cluster": {"server": server, "certificate-authority-data": base64.b64encode(ca_pem).decode()},
            }
        ],
        "users": [{"name": name, "user": user}],
        "contexts": [{"name": name, "context": {"cluster": name, "user": name}}],
        "current-context": name,
    }


def _ok(url: str, pool: urllib3.PoolManager) -> bool:
    try:
        response = pool.request("GET", url, timeout=3.0, retries=False)
    except urllib3.exceptions.HTTPError:
        return False
    return response.status == 200


class ControlPlane:
    """Start with `start()`, use `kube` (admin client), `kubeconfig_path`, `server`; end with `stop()`.

    ``scheduler=False`` leaves kube-scheduler out (and does not need its binary): for callers whose pods are
    never scheduled, such as the operator benchmark's suspended Jobs."""

    def __init__(
        self,
        root: Path,
        *,
        scheduler: bool = True,
        addresses: network.Addresses | None = None,
        detached: bool = False,
        audit_policy: dict[str, Any] | None = None,
    ) -> None:
        self.root = root
        self.scheduler = scheduler
        # With `addresses`, the API server serves a real node: it listens on the node address (pods reach it
        # through the `kubernetes` Service), authorizes Node,RBAC, admits with NodeRestriction and PodSecurity
        # (restricted by default), and can reach kubelets for logs, exec and port-forward.
        self.addresses = addresses
        self.detached = detached
        # An audit policy makes the API server log the requests it selects, one JSON line each, to
        # `audit_log` (batched, so logging does not sit on the request path): how benchmarks count API writes.
        self.audit_policy = audit_policy
        self.audit_log = root / "logs" / "audit.jsonl"
        self.bins = binaries.control_plane(scheduler=scheduler)
        self.processes: dict[str, Process] = {}
        self.timings: dict[str, float] = {}
        self.pki_dir = root / "pki"
        self.logs = root / "logs"
        self.server = ""

    # -- lifecycle ------------------------------------------------------------------------------------------

    def start(self) -> None:
        """Start the components in order (kube-scheduler last, if wanted), each once the previous one is
        healthy."""
        began = time.monotonic()
        try:
            self._write_pki()
            self._start_etcd()
            self._start_apiserver()
            self._start_controller_manager()
            if self.scheduler:
                self._start_scheduler()
            self._await_controllers()
        except BaseException:
            self.stop()
            raise
        self.timings["total"] = time.monotonic() - began

    def stop(self) -> None:
        """Stop every component, newest first."""
        for name in reversed(list(self.processes)):
            self.processes.pop(name).stop(grace=10)

    def describe(self) -> str:
        """Each component's log tail, for a failure message."""
        return "\n".join(proc.tail(20) for proc in self.processes.values())

    # -- credentials ----------------------------------------------------------------------------------------

    def _write_pki(self) -> None:
        self.pki_dir.mkdir(parents=True, exist_ok=True)
        self.ca = pki.CertificateAuthority()
        self.ca_path, _ = self.ca.pair.write(self.pki_dir, "ca")
        ips: tuple[str, ...] = ()
        if self.addresses:
            ips = (self.addresses.node_ip, self.addresses.api_service_ip)
        names = ("kubernetes", "kubernetes.default", "kubernetes.default.svc", "kubernetes.default.svc.cluster.local")
        serving = self.ca.serving("kube-apiserver", ips=ips, names=names)
        self.serving_cert, self.serving_key = serving.write(self.pki_dir, "apiserver")
        self.kubelet_client = self.ca.client("kube-apiserver-kubelet-client", ("system:masters",))
        self.sa_public, self.sa_private = pki.service_account_signer().write(self.pki_dir, "sa")
        self.admin = self.ca.client(ADMIN_USER, ("system:masters",))

    @property
    def ca_pem(self) -> bytes:
        return self.ca.pair.cert_pem

    def write_kubeconfig(self, path: Path, user: dict[str, str]) -> Path:
        """Write a kubeconfig for this API server with `user`'s credentials."""
        path.write_text(yaml.safe_dump(kubeconfig(self.server, self.ca_pem, user)))
        path.chmod(0o600)
        return path

    def client_for_token(self, token: str) -> Kube:
        """An API client that authenticates with a bearer token (e.g. a service account's)."""
        return Kube(self.server, self.ca_pem, token=token)

    def service_account_token(
        self, namespace: str, name: str, seconds: int = 3600, bound_to: dict[str, str] | None = None
    ) -> str:
        """A token from the TokenRequest API, optionally bound to an object (e.g. {kind: Pod, name, uid})."""
        spec: dict[str, Any] = {"expirationSeconds": seconds}
        if bound_to:
            spec["boundObjectRef"] = {"apiVersion": "v1", **bound_to}
        request = {"apiVersion": "authentication.k8s.io/v1", "kind": "TokenRequest", "spec": spec}
        answer = self.kube.create(f"/api/v1/namespaces/{namespace}/serviceaccounts/{name}/token", request)
        token: str = answer["status"]["token"]
        return token

    # -- components -----------------------------------------------------------------------------------------

    def _launch(self, name: str, plan: Callable[[], tuple[list[str], Callable[[], bool]]], timeout: float) -> None:
        """Start a component, wait until `healthy`; retry with fresh ports when one was taken meanwhile."""
        began = time.monotonic()
        for _attempt in range(3):
            argv, healthy = plan()
            proc = Process(name, argv, self.logs / f"{name}.log", detached=self.detached)
            self.processes[name] = proc

            def up(p: Process = proc, h: Callable[[], bool] = healthy) -> bool:
                return p.poll() is not None or h()

            wait_until(up, timeout, f"{name} to be healthy", describe=proc.tail)
            if proc.poll() is None:
                self.timings[name] = time.monotonic() - began
                return
            self.processes.pop(name).stop()
            if "address already in use" not in proc.tail(200):
                break
        raise RuntimeError(f"{name} exited at start\n{proc.tail()}")

    def _start_etcd(self) -> None:
        health = urllib3.PoolManager(retries=False)

        def plan() -> tuple[list[str], Callable[[], bool]]:
            client, peer = free_port(), free_port()
            self.etcd_url = f"http://127.0.0.1:{client}"
            argv = [
                str(self.bins["etcd"]),
                f"--data-dir={self.root / 'etcd'}",
                "--name=default",
                f"--listen-client-urls={self.etcd_url}",
                f"--advertise-client-urls={self.etcd_url}",
                f"--listen-peer-urls=http://127.0.0.1:{peer}",
                f"--initial-advertise-peer-urls=http://127.0.0.1:{peer}",
                f"--initial-cluster=default=http://127.0.0.1:{peer}",
                "--unsafe-no-fsync=true",
                "--log-level=warn",
            ]
            return argv, lambda: _ok(f"{self.etcd_url}/health", health)

        self._launch("etcd", plan, timeout=60)

    def _start_apiserver(self) -> None:
        context = ssl.create_default_context(cadata=self.ca_pem.decode())
        certs = self.pki_dir / "admin"
        certs.mkdir(exist_ok=True)
        context.load_cert_chain(*self.admin.write(certs, "admin"))
        health = urllib3.PoolManager(ssl_context=context, retries=False)

        def plan() -> tuple[list[str], Callable[[], bool]]:
            port = free_port() if self.addresses is None else API_PORT
            host = "127.0.0.1" if self.addresses is None else self.addresses.node_ip
            self.server = f"https://{host}:{port}"
            argv = [
                str(self.bins["kube-apiserver"]),
                f"--etcd-servers={self.etcd_url}",
                f"--bind-address={host}",
                f"--advertise-address={host}",
                f"--secure-port={port}",
                f"--cert-dir={self.root / 'apiserver-certs'}",
                f"--tls-cert-file={self.serving_cert}",
                f"--tls-private-key-file={self.serving_key}",
                f"--client-ca-file={self.ca_path}",
                *self._node_flags(),
                *self._audit_flags(),
                "--allow-privileged=true",
                f"--service-account-issuer={self.server}",
                f"--api-audiences={self.server}",
                f"--service-account-key-file={self.sa_public}",
                f"--service-account-signing-key-file={self.sa_private}",
                "--profiling=false",
                "--v=1",
            ]
            return argv, lambda: _ok(f"{self.server}/readyz", health)

        self._launch("kube-apiserver", plan, timeout=180)
        self.kubeconfig_path = self.write_kubeconfig(
            self.root / "admin.kubeconfig",
            {
                "client-certificate-data": base64.b64encode(self.admin.cert_pem).decode(),
                "client-key-data": base64.b64encode(self.admin.key_pem).decode(),
            },
        )
        self.kube = Kube(self.server, self.ca_pem, self.admin.cert_pem, self.admin.key_pem)

    def _audit_flags(self) -> list[str]:
        if self.audit_policy is None:
            return []
        policy = self.root / "audit-policy.yaml"
        policy.write_text(yaml.safe_dump(self.audit_policy))
        self.audit_log.parent.mkdir(parents=True, exist_ok=True)
        return [f"--audit-policy-file={policy}", f"--audit-log-path={self.audit_log}", "--audit-log-format=json",
                "--audit-log-mode=batch", "--audit-log-batch-max-wait=1s"]  # fmt: skip

    def _node_flags(self) -> list[str]:
        """Authorization, admission and kubelet-client flags: RBAC alone without a node; with one, what a
        kubeadm cluster has (Node,RBAC, NodeRestriction, PodSecurity restricted by default outside kube-system)."""
        if self.addresses is None:
            return ["--authorization-mode=RBAC", f"--service-cluster-ip-range={SERVICE_CIDR}"]
        admission = self.root / "admission.yaml"
        admission.write_text(yaml.safe_dump(ADMISSION_CONFIG))
        certs = self.pki_dir / "kubelet-client"
        certs.mkdir(exist_ok=True)
        cert, key = self.kubelet_client.write(certs, "client")
        return [
            "--authorization-mode=Node,RBAC",
            "--enable-admission-plugins=NodeRestriction",
            f"--admission-control-config-file={admission}",
            f"--service-cluster-ip-range={self.addresses.service_cidr}",
            f"--kubelet-client-certificate={cert}",
            f"--kubelet-client-key={key}",
            f"--kubelet-certificate-authority={self.ca_path}",
            "--kubelet-preferred-address-types=InternalIP",
        ]

    def _serving_flags(self, name: str, port: int) -> list[str]:
        """Flags a controller-manager or scheduler needs to serve /healthz on loopback."""
        return [
            f"--kubeconfig={self.kubeconfig_path}",
            f"--authentication-kubeconfig={self.kubeconfig_path}",
            f"--authorization-kubeconfig={self.kubeconfig_path}",
            "--leader-elect=false",
            "--bind-address=127.0.0.1",
            f"--secure-port={port}",
            f"--cert-dir={self.root / f'{name}-certs'}",
            "--v=1",
        ]

    def _start_controller_manager(self) -> None:
        insecure = urllib3.PoolManager(cert_reqs="CERT_NONE", retries=False)

        def plan() -> tuple[list[str], Callable[[], bool]]:
            port = free_port()
            argv = [
                str(self.bins["kube-controller-manager"]),
                *self._serving_flags("kube-controller-manager", port),
                f"--root-ca-file={self.ca_path}",
                f"--service-account-private-key-file={self.sa_private}",
                "--use-service-account-credentials=true",
                "--controllers=*",
                *(
                    [
                        "--allocate-node-cidrs=true",
                        f"--cluster-cidr={self.addresses.pod_cidr}",
                        f"--node-cidr-mask-size={self.addresses.prefix}",
                        f"--service-cluster-ip-range={self.addresses.service_cidr}",
                    ]
                    if self.addresses
                    else []
                ),
            ]
            return argv, lambda: _ok(f"https://127.0.0.1:{port}/healthz", insecure)

        with contextlib.suppress(Exception):
            urllib3.disable_warnings(urllib3.exceptions.InsecureRequestWarning)
        self._launch("kube-controller-manager", plan, timeout=120)

    def _start_scheduler(self) -> None:
        insecure = urllib3.PoolManager(cert_reqs="CERT_NONE", retries=False)

        def plan() -> tuple[list[str], Callable[[], bool]]:
            port = free_port()
            argv = [str(self.bins["kube-scheduler"]), *self._serving_flags("kube-scheduler", port)]
            return argv, lambda: _ok(f"https://127.0.0.1:{port}/healthz", insecure)

        self._launch("kube-scheduler", plan, timeout=120)

    def _await_controllers(self) -> None:
        """Ready means pods can be admitted: `default` has its ServiceAccount and root CA ConfigMap."""

        def ready() -> bool:
            try:
                self.kube.get("/api/v1/namespaces/default/serviceaccounts/default")
                self.kube.get("/api/v1/namespaces/default/configmaps/kube-root-ca.crt")
            except ApiError:
                return False
            return True

        began = time.monotonic()
        wait_until(ready, 120, "the controller-manager to create default's ServiceAccount", describe=self.describe)
        self.timings["controllers"] = time.monotonic() - began
