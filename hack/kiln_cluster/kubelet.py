"""The node agent: a test double for the kubelet that runs the pods bound to its node as local processes.

It registers one Ready Node (generous cpu/memory, `nvidia.com/gpu: 4` so GPU requests schedule), renews its
Lease in kube-node-lease and its Ready condition so the node lifecycle controller never taints it, watches
the pods with `spec.nodeName=<node>` and gives each a PodRunner (podrunner.py) and its own loopback address
(127.R.x.y, R random per agent so two test runs differ). It also provisions a hostPath PersistentVolume,
pre-bound, for every pending PersistentVolumeClaim, one folder per claim, so pods sharing a claim share files.

How a container's command, environment and volumes are translated is described in launch.py, podenv.py
and volumes.py; a pod's life and status in podrunner.py.
"""

import os
import random
import signal
import threading
import time
import traceback
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from kiln_cluster import launch, podenv
from kiln_cluster.controlplane import ControlPlane
from kiln_cluster.podrunner import Container, PodRunner, now
from kiln_cluster.procs import Process
from kiln_cluster.rest import STRATEGIC, ApiError, Kube

Obj = dict[str, Any]
CAPACITY = podenv.NODE_CAPACITY


class NodeAgent:
    """Start with `start()`, stop with `stop()`; the test-facing helpers are at the bottom."""

    def __init__(self, control_plane: ControlPlane, root: Path, node_name: str = "kiln-node") -> None:
        self.control_plane = control_plane
        self.kube: Kube = control_plane.kube
        self.root = root
        self.claims_root = root / "claims"
        self.node_name = node_name
        self.subnet = random.randint(100, 250)
        self.host_ip = f"127.{self.subnet}.0.1"
        self._next = 0
        self._reserved: dict[tuple[str, str, str], str] = {}
        self.runners: dict[str, PodRunner] = {}
        self._finalized: set[str] = set()
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []
        self.log_path = root / "node-agent.log"

    # -- lifecycle ------------------------------------------------------------------------------------------

    def start(self) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        self._register()
        for target in (self._watch_pods, self._housekeep):
            thread = threading.Thread(target=target, name=f"node-agent-{target.__name__}", daemon=True)
            thread.start()
            self._threads.append(thread)

    def stop(self) -> None:
        """Kill every pod's processes (without reporting) and stop the agent's threads."""
        self._stop.set()
        with self._lock:
            runners = list(self.runners.values())
        for runner in runners:
            runner.stop()
        for runner in runners:
            runner.join(15)
        for thread in self._threads:
            thread.join(5)

    def log(self, message: str) -> None:
        with self.log_path.open("a") as out:
            out.write(f"{now()} {message}\n")

    # -- the node -------------------------------------------------------------------------------------------

    def _register(self) -> None:
        node = {
            "apiVersion": "v1",
            "kind": "Node",
            "metadata": {
                "name": self.node_name,
                "labels": {
                    "kubernetes.io/hostname": self.node_name,
                    "kubernetes.io/os": "linux",
                    "kubernetes.io/arch": "amd64",
                },
            },
        }
        try:
            self.kube.create("/api/v1/nodes", node)
        except ApiError as err:
            if err.status != 409:
                raise
        self._report_node()

    def _report_node(self) -> None:
        stamp = now()
        healthy = {
            "MemoryPressure": "KubeletHasSufficientMemory",
            "DiskPressure": "KubeletHasNoDiskPressure",
            "PIDPressure": "KubeletHasSufficientPID",
        }
        conditions = [
            {"type": kind, "status": "False", "reason": reason, "lastHeartbeatTime": stamp, "lastTransitionTime": stamp}
            for kind, reason in healthy.items()
        ]
        conditions.append(
            {
                "type": "Ready",
                "status": "True",
                "reason": "KubeletReady",
                "message": "node agent ready",
                "lastHeartbeatTime": stamp,
                "lastTransitionTime": stamp,
            }
        )
        status = {
            "capacity": CAPACITY,
            "allocatable": CAPACITY,
            "conditions": conditions,
            "addresses": [
                {"type": "InternalIP", "address": self.host_ip},
                {"type": "Hostname", "address": self.node_name},
            ],
            "nodeInfo": {
                "kubeletVersion": "v1.36.3",
                "kubeProxyVersion": "",
                "containerRuntimeVersion": "kiln-node-agent://1",
                "operatingSystem": "linux",
                "architecture": "amd64",
                "osImage": "kiln node agent",
                "kernelVersion": os.uname().release,
                "machineID": "kiln",
                "systemUUID": "kiln",
                "bootID": "kiln",
            },
        }
        self.kube.patch(f"/api/v1/nodes/{self.node_name}/status", {"status": status}, content_type=STRATEGIC)

    def _renew_lease(self) -> None:
        path = f"/apis/coordination.k8s.io/v1/namespaces/kube-node-lease/leases/{self.node_name}"
        renew = datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")
        spec = {"holderIdentity": self.node_name, "leaseDurationSeconds": 40, "renewTime": renew}
        try:
            self.kube.patch(path, {"spec": spec})
        except ApiError as err:
            if err.status != 404:
                raise
            self.kube.create(
                path.rsplit("/", 1)[0],
                {
                    "apiVersion": "coordination.k8s.io/v1",
                    "kind": "Lease",
                    "metadata": {"name": self.node_name},
                    "spec": spec,
                },
            )

    def _housekeep(self) -> None:
        """Every second: provision claims; every 5 s: renew the Lease; every 20 s: report the node Ready."""
        tick = 0
        while not self._stop.wait(1.0):
            try:
                self._provision_claims()
                if tick % 5 == 0:
                    self._renew_lease()
                if tick % 20 == 0:
                    self._report_node()
            except Exception:
                self.log(f"housekeeping failed:\n{traceback.format_exc()}")
            tick += 1

    def _provision_claims(self) -> None:
        for pvc in self.kube.list("/api/v1/persistentvolumeclaims"):
            meta, spec = pvc["metadata"], pvc["spec"]
            if spec.get("volumeName") or pvc.get("status", {}).get("phase") != "Pending":
                continue
            folder = self.claims_root / meta["namespace"] / meta["name"]
            folder.mkdir(parents=True, exist_ok=True)
            storage = ((spec.get("resources") or {}).get("requests") or {}).get("storage", "1Gi")
            volume: Obj = {
                "apiVersion": "v1",
                "kind": "PersistentVolume",
                "metadata": {"name": f"kiln-claim-{meta['uid']}", "labels": {"kiln.dev/node-agent": self.node_name}},
                "spec": {
                    "capacity": {"storage": storage},
                    "accessModes": spec.get("accessModes") or ["ReadWriteOnce"],
                    "persistentVolumeReclaimPolicy": "Retain",
                    "storageClassName": spec.get("storageClassName") or "",
                    "volumeMode": spec.get("volumeMode", "Filesystem"),
                    "hostPath": {"path": str(folder), "type": "DirectoryOrCreate"},
                    "claimRef": {
                        "apiVersion": "v1",
                        "kind": "PersistentVolumeClaim",
                        "namespace": meta["namespace"],
                        "name": meta["name"],
                        "uid": meta["uid"],
                    },
                },
            }
            try:
                self.kube.create("/api/v1/persistentvolumes", volume)
                self.log(f"provisioned {volume['metadata']['name']} for {meta['namespace']}/{meta['name']}")
            except ApiError as err:
                if err.status != 409:
                    raise

    # -- pods -----------------------------------------------------------------------------------------------

    def _watch_pods(self) -> None:
        """List, then watch, the node's pods; relist whenever the watch ends or fails."""
        selector = f"spec.nodeName={self.node_name}"
        while not self._stop.is_set():
            try:
                listing = self.kube.get("/api/v1/pods", fieldSelector=selector)
                for pod in listing.get("items") or []:
                    self._handle(pod, deleted=False)
                version = listing["metadata"]["resourceVersion"]
                for event in self.kube.watch("/api/v1/pods", version, timeout_seconds=20, fieldSelector=selector):
                    if self._stop.is_set() or event["type"] == "ERROR":
                        break
                    if event["type"] != "BOOKMARK":
                        self._handle(event["object"], deleted=event["type"] == "DELETED")
            except Exception:
                self.log(f"pod watch failed:\n{traceback.format_exc()}")
                self._stop.wait(1.0)

    def _handle(self, pod: Obj, deleted: bool) -> None:
        meta = pod["metadata"]
        uid = meta["uid"]
        with self._lock:
            runner = self.runners.get(uid)
        if deleted:
            if runner and runner.is_alive():
                runner.request_delete(0, gone=True)
            return
        if meta.get("deletionTimestamp"):
            grace = float(meta.get("deletionGracePeriodSeconds") or 0)
            if runner and runner.is_alive():
                runner.request_delete(grace)
            elif uid not in self._finalized:
                self._finalized.add(uid)
                self.kube.delete(
                    f"/api/v1/namespaces/{meta['namespace']}/pods/{meta['name']}", grace_seconds=0, uid=uid
                )
            return
        if runner is None and pod.get("status", {}).get("phase") not in ("Succeeded", "Failed"):
            runner = PodRunner(self, pod, self._address_for(pod))
            with self._lock:
                self.runners[uid] = runner
            self.log(f"starting pod {meta['namespace']}/{meta['name']} at {runner.ip}")
            runner.start()

    def _fresh_ip(self) -> str:
        self._next += 1
        return f"127.{self.subnet}.{1 + self._next // 250}.{1 + self._next % 250}"

    def resolve(self, namespace: str, hostname: str, subdomain: str) -> str:
        """The address of the pod `<hostname>.<subdomain>.<namespace>.svc`, reserved before it exists."""
        with self._lock:
            key = (namespace, hostname, subdomain)
            if key not in self._reserved:
                self._reserved[key] = self._fresh_ip()
            return self._reserved[key]

    def _address_for(self, pod: Obj) -> str:
        spec = pod["spec"]
        if spec.get("hostname") and spec.get("subdomain"):
            return self.resolve(pod["metadata"]["namespace"], spec["hostname"], spec["subdomain"])
        with self._lock:
            return self._fresh_ip()

    def launch_plan(
        self, runner: PodRunner, container: Container, folders: dict[str, Path], token: str | None
    ) -> tuple[list[str], dict[str, str], Path]:
        """(argv, env, cwd) for one container; see launch.py and podenv.py."""
        return launch.plan(self, runner, container, folders, token)

    # -- for tests ------------------------------------------------------------------------------------------

    def runner(self, namespace: str, name: str) -> PodRunner | None:
        """The newest runner of the pod named `name` (pods of a Job retry under new names, Deployments too)."""
        with self._lock:
            found = [r for r in self.runners.values() if r.namespace == namespace and r.pod_name == name]
        return found[-1] if found else None

    def process(self, namespace: str, name: str, container: str | None = None) -> Process | None:
        runner = self.runner(namespace, name)
        if runner is None:
            return None
        chosen = next((c for c in runner.containers if container in (None, c.name)), None)
        return chosen.proc if chosen else None

    def kill(self, namespace: str, name: str, sig: int = signal.SIGKILL) -> None:
        """Signal a pod's container processes, as an OOM kill or a crash would end them."""
        proc = self.process(namespace, name)
        if proc is None:
            raise LookupError(f"no process for pod {namespace}/{name} on {self.node_name}")
        proc.signal(sig)

    def claim_path(self, namespace: str, claim: str) -> Path:
        """The local folder behind a PersistentVolumeClaim."""
        return self.claims_root / namespace / claim

    def describe(self, namespace: str | None = None, lines: int = 30) -> str:
        """Every pod's phase, container states and log tails: what a failure message needs."""
        with self._lock:
            runners = [r for r in self.runners.values() if namespace in (None, r.namespace)]
        out = [f"node agent log: {self.log_path}"]
        for runner in runners:
            out.append(f"== pod {runner.namespace}/{runner.pod_name} ({runner.ip}) phase={runner.phase}")
            for container in runner.init + runner.containers:
                out.append(f"   {container.name}: {container.state} restarts={container.restarts}")
                if container.log.exists():
                    tail = container.log.read_text(errors="replace").splitlines()[-lines:]
                    out.extend(f"   | {line}" for line in tail)
            error = runner.folder / "agent-error.log"
            if error.exists():
                out.append(error.read_text())
        return "\n".join(out)


def wait_for_node_ready(kube: Kube, name: str, timeout: float = 60) -> None:
    """Block until the node is Ready and carries no NoSchedule taint."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        node = kube.get_or_none(f"/api/v1/nodes/{name}") or {}
        conditions = {c["type"]: c["status"] for c in node.get("status", {}).get("conditions") or []}
        taints = [t for t in node.get("spec", {}).get("taints") or [] if t.get("effect") == "NoSchedule"]
        if conditions.get("Ready") == "True" and not taints:
            return
        time.sleep(0.25)
    raise TimeoutError(f"node {name} not Ready after {timeout}s")
