"""A real single-node Kubernetes cluster on this machine: the control plane, a node, storage and kiln's images.

`Cluster.up()` records what it is about to change (sysctls, the nf_tables ruleset, which fixed paths exist),
then starts in order: the bridge and guard (network.py), etcd + kube-apiserver + controller-manager +
scheduler (controlplane.py), containerd + kubelet + kube-proxy + CoreDNS (node.py); it then makes
PersistentVolumeClaims bindable (a default StorageClass and hostPath volumes it creates on demand) and imports
kiln's images. `down()` undoes all of it, from the state file when the processes were started detached by
another command (`make cluster`, then `make cluster-down`).

containerd's image store lives in the cache (~/.cache/kiln/cluster/containerd), not the cluster folder, so a
second `up` re-imports nothing: an image store is a cache, not a change to the machine.
"""

import contextlib
import hashlib
import json
import os
import shutil
import subprocess
import time
from pathlib import Path
from typing import Any

from kiln_cluster import binaries, footprint, images, network, procs
from kiln_cluster.controlplane import ControlPlane
from kiln_cluster.node import NODE_NAME, Node, NodePaths
from kiln_cluster.rest import Kube
from kiln_cluster.waiting import wait_until

CACHE = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "kiln"
EXPORT_DIR = CACHE / "images" / "export"
STATE_FILE = "cluster.json"
STORAGE_CLASS = "kiln-local"
VOLUME_SIZE = "50Gi"


def run_dir(root: Path) -> Path:
    """A short folder for unix sockets (their paths must stay within node.SOCKET_PATH_BYTES)."""
    return Path("/run") / f"kiln-cluster-{hashlib.sha256(str(root.resolve()).encode()).hexdigest()[:10]}"


class Cluster:
    """`up()`, then `kube` / `kubeconfig` / `claim_path()`; `down()` leaves the machine as it was."""

    def __init__(self, root: Path, *, detached: bool = False, addresses: network.Addresses | None = None) -> None:
        self.root = root.resolve()
        self.detached = detached
        self.addresses = addresses or network.Addresses()
        self.paths = NodePaths(root=self.root / "node", run=run_dir(self.root))
        self.plane: ControlPlane | None = None
        self.node: Node | None = None
        self.timings: dict[str, float] = {}

    # -- up -------------------------------------------------------------------------------------------------

    def up(self, with_images: bool = True) -> None:
        began = time.monotonic()
        self._preflight()
        # A fresh cluster every time: old etcd data or volumes would resurrect old objects and checkpoints.
        _unmount_below(self.root)
        shutil.rmtree(self.root, ignore_errors=True)
        self.root.mkdir(parents=True)
        state: dict[str, Any] = {
            "sysctls": network.snapshot_sysctls(),
            "ruleset": network.save_ruleset(),
            "paths": [str(p) for p in footprint.FIXED_PATHS if p.exists()],
            "run": str(self.paths.run),
            "bridge": self.addresses.bridge,
            "pids": [],
        }
        self._write_state(state)
        try:
            network.bring_up(self.addresses)
            self.plane = ControlPlane(self.root / "control-plane", addresses=self.addresses, detached=self.detached)
            self.plane.bins.update(binaries.node())
            self.plane.start()
            state["pids"] = [[name, p.pid] for name, p in self.plane.processes.items()]
            self._write_state(state)
            self.node = Node(self.plane, self.paths, self.addresses, detached=self.detached)
            self.node.paths.root.mkdir(parents=True, exist_ok=True)
            self._link_image_store()
            self.node.start()
            state["pids"] += [[name, p.pid] for name, p in self.node.processes.items()]
            self._write_state(state)
            self._install_storage()
            if with_images:
                self.import_images()
        except BaseException:
            self.down()
            raise
        (self.root / "kubeconfig").write_text(self.plane.kubeconfig_path.read_text())
        (self.root / "kubeconfig").chmod(0o600)
        self.timings = {**self.plane.timings, **self.node.timings, "total": time.monotonic() - began}

    def _preflight(self) -> None:
        if os.geteuid() != 0:
            raise RuntimeError("a real node needs root (network namespaces, bridges, cgroups, mounts)")
        if network.link_exists(self.addresses.bridge):
            raise RuntimeError(
                f"interface {self.addresses.bridge} exists: a kiln cluster is already up (`make cluster-down`)"
            )
        if (problem := self.paths.socket_path_problem()) is not None:
            raise RuntimeError(problem)
        binaries.node()

    def _link_image_store(self) -> None:
        """containerd's root (content store and snapshots) in the cache, linked into the node folder."""
        store = CACHE / "cluster" / "containerd"
        store.mkdir(parents=True, exist_ok=True)
        link = self.paths.root / "containerd"
        if not link.exists():
            link.symlink_to(store)

    def import_images(self) -> None:
        """Build (cached) and import kiln's CPU images; an archive whose image id was imported before is skipped."""
        assert self.node is not None
        began = time.monotonic()
        export = EXPORT_DIR
        stamps = CACHE / "cluster" / "imported"
        stamps.mkdir(parents=True, exist_ok=True)
        for archive in images.build_kiln_images(export):
            image_id = archive.with_suffix(".id").read_text().strip() if archive.with_suffix(".id").exists() else ""
            stamp = stamps / archive.with_suffix(".id").name
            if image_id and stamp.exists() and stamp.read_text().strip() == image_id:
                continue
            images.import_archive(self.node.bins, self.node.paths.socket, archive)
            stamp.write_text(image_id)
        images.remove_untagged(self.node.bins, self.node.paths.socket)
        self._wait_for_listed_images()
        self.timings["images"] = time.monotonic() - began

    def _wait_for_listed_images(self) -> None:
        """Until the node's status lists every kiln image: kubelet refreshes its image list only every 30 s, and
        `kubectl get node` should show what `up` imported as soon as it returns."""

        def listed() -> bool:
            node = self.kube.get_or_none(f"/api/v1/nodes/{NODE_NAME}") or {}
            names = {n for image in node.get("status", {}).get("images") or [] for n in image.get("names") or []}
            prefixes = [f"docker.io/library/kiln-{name}:" for name in images.KILN_IMAGES]
            return all(any(n.startswith(prefix) for n in names) for prefix in prefixes)

        wait_until(listed, 120, "the node's status to list kiln's images", interval=2)

    # -- storage --------------------------------------------------------------------------------------------

    def _install_storage(self) -> None:
        """A default StorageClass whose claims bind to hostPath volumes on this node (`ensure_free_volumes`)."""
        kube = self.kube
        kube.apply_object(
            {
                "apiVersion": "storage.k8s.io/v1",
                "kind": "StorageClass",
                "metadata": {
                    "name": STORAGE_CLASS,
                    "annotations": {"storageclass.kubernetes.io/is-default-class": "true"},
                },
                "provisioner": "kubernetes.io/no-provisioner",
                "volumeBindingMode": "Immediate",
                "reclaimPolicy": "Retain",
            }
        )
        self.ensure_free_volumes(8)

    def ensure_free_volumes(self, count: int) -> None:
        """At least `count` Available volumes (ReadWriteMany and ReadWriteOnce, writable by any uid)."""
        kube = self.kube
        existing = kube.list("/api/v1/persistentvolumes")
        free = [pv for pv in existing if pv.get("status", {}).get("phase") in (None, "Pending", "Available")]
        index = len(existing)
        for _ in range(count - len(free)):
            while True:
                name = f"kiln-local-{index:03d}"
                index += 1
                if kube.get_or_none(f"/api/v1/persistentvolumes/{name}") is None:
                    break
            folder = self.root / "volumes" / name
            folder.mkdir(parents=True, exist_ok=True)
            folder.chmod(0o777)
            kube.create(
                "/api/v1/persistentvolumes",
                {
                    "apiVersion": "v1",
                    "kind": "PersistentVolume",
                    "metadata": {"name": name},
                    "spec": {
                        "capacity": {"storage": VOLUME_SIZE},
                        "accessModes": ["ReadWriteMany", "ReadWriteOnce"],
                        "persistentVolumeReclaimPolicy": "Retain",
                        "storageClassName": STORAGE_CLASS,
                        "hostPath": {"path": str(folder), "type": "Directory"},
                    },
                },
            )

    def claim_path(self, namespace: str, claim: str) -> Path:
        """The host folder behind a bound PersistentVolumeClaim."""

        def bound() -> str | None:
            pvc = self.kube.get(f"/api/v1/namespaces/{namespace}/persistentvolumeclaims/{claim}")
            return pvc.get("spec", {}).get("volumeName") if pvc.get("status", {}).get("phase") == "Bound" else None

        volume = wait_until(bound, 60, f"claim {namespace}/{claim} to be Bound")
        pv = self.kube.get(f"/api/v1/persistentvolumes/{volume}")
        return Path(pv["spec"]["hostPath"]["path"])

    # -- access ---------------------------------------------------------------------------------------------

    @property
    def kube(self) -> Kube:
        assert self.plane is not None, "the cluster is not up"
        return self.plane.kube

    @property
    def kubeconfig(self) -> Path:
        return self.root / "kubeconfig"

    def credentials(self, name: str, user: str, folder: Path) -> Path:
        """A kubeconfig in `folder` authenticating as `user` (RBAC decides what it may do)."""
        assert self.node is not None, "the cluster is not up"
        return self.node.credentials(name, user, folder=folder)

    def container_pid(self, namespace: str, pod: str, container: str) -> int:
        """The host pid of a running container's first process (to kill it as the kernel's OOM killer would)."""
        assert self.node is not None
        crictl = images.crictl(self.node.bins, self.paths.socket)
        ids = subprocess.run(
            [*crictl, "ps", "-q", "--name", f"^{container}$", "--label", f"io.kubernetes.pod.name={pod}",
             "--label", f"io.kubernetes.pod.namespace={namespace}"],
            capture_output=True, text=True, timeout=30, check=True,
        ).stdout.split()  # fmt: skip
        if not ids:
            raise LookupError(f"no running container {container} in pod {namespace}/{pod}")
        info = subprocess.run(
            [*crictl, "inspect", "-o", "json", ids[0]], capture_output=True, text=True, timeout=30, check=True
        )
        pid: int = json.loads(info.stdout)["info"]["pid"]
        return pid

    # -- down -----------------------------------------------------------------------------------------------

    def _write_state(self, state: dict[str, Any]) -> None:
        (self.root / STATE_FILE).write_text(json.dumps(state, indent=1))

    def down(self) -> None:
        """Stop everything `up` started and put back what it changed; safe to call twice."""
        state_path = self.root / STATE_FILE
        if not state_path.exists():
            return
        state = json.loads(state_path.read_text())
        run = Path(state["run"])
        if self.node is not None:
            self.node.stop()
        if self.plane is not None:
            self.plane.stop()
        # Detached processes (another command started them): by pid, newest first; pods go before containerd.
        for name, pid in reversed(state.get("pids", [])):
            if name == "containerd" and (crictl := binaries.find("crictl")):
                images.remove_all_pods({"crictl": crictl}, NodePaths(self.paths.root, run).socket)
            if procs.alive(pid):
                procs.stop_pid(pid)
        _kill_leftovers(self.root, run)
        _unmount_below(self.root, run, *(Path(p) for p in footprint.FIXED_PATHS))
        _remove_cgroups()
        network.tear_down(network.Addresses(bridge=state["bridge"]))
        network.restore_ruleset(state["ruleset"])
        network.restore_sysctls(state["sysctls"])
        for path in footprint.FIXED_PATHS:
            if str(path) not in state["paths"] and path.exists():
                shutil.rmtree(path, ignore_errors=True)
        shutil.rmtree(run, ignore_errors=True)
        state_path.unlink()
        self.plane = self.node = None


def _kill_leftovers(root: Path, run: Path) -> None:
    """Any node program still running with this cluster's folders in its command line or environment (a shim
    re-parented to init, a component started after the state file was read) is stopped with its group."""
    for pid, _name in footprint.node_processes():
        with contextlib.suppress(OSError):
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace")
            environ = Path(f"/proc/{pid}/environ").read_bytes().decode(errors="replace")
            if any(str(folder) in text for folder in (root, run) for text in (cmdline, environ)):
                procs.stop_pid(pid, grace=2)
    # The pause processes of sandboxes whose shim died are orphans of init too.
    for pid, name in footprint.node_processes():
        if name == "pause":
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, 9)


def _unmount_below(*folders: Path) -> None:
    """Lazily unmount every mount point under `folders`, deepest first (kubelet's volumes, netns, overlays)."""
    prefixes = [str(f.resolve()) if f.exists() else str(f) for f in folders]
    points = [
        p for p in footprint.mount_points() if any(p == pre or p.startswith(pre.rstrip("/") + "/") for pre in prefixes)
    ]
    for point in sorted(points, key=len, reverse=True):
        subprocess.run(["umount", "-l", point], capture_output=True, timeout=30, check=False)


def _remove_cgroups() -> None:
    """Remove kubelet's cgroup folders (kubepods and below), leaves first; they are empty once pods are gone."""
    for path in sorted(footprint.kubelet_cgroups(), key=len, reverse=True):
        with contextlib.suppress(OSError):
            os.rmdir(path)
