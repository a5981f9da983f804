"""A real Kubernetes node on this machine: containerd 2.x + runc, the CNI bridge, kubelet, kube-proxy, CoreDNS.

Every setting below answers a fact measured on this machine kind (see docs/cluster.md):
- containerd keeps its own root, state, sockets, shim socket folder and runc root, and mounts pod network
  namespaces under its state folder, so `down` finds and removes everything it made. The VM's capability
  bounding set lacks CAP_SYS_RESOURCE, so `restrict_oom_score_adj` is mandatory (runc otherwise fails with
  "can't get final child's PID from pipe"). No registry is reachable: the sandbox image is the locally built
  pause image, pinned so it is never collected, and kubelet never garbage-collects images.
- cgroup v1 with the cgroupfs driver (kubelet >= 1.35 refuses v1 unless `failCgroupV1: false`).
- DNS never leaves: kubelet's resolvConf is an empty file and CoreDNS serves cluster.local only (no `forward`).
- kube-proxy in iptables mode answers NodePorts only on the node address and leaves conntrack sysctls alone.
"""

import json
import time
from dataclasses import dataclass
from pathlib import Path

import yaml

from kiln_cluster import images, network
from kiln_cluster.controlplane import ControlPlane
from kiln_cluster.procs import Process
from kiln_cluster.waiting import wait_until

NODE_NAME = "kiln-node"
CLUSTER_DOMAIN = "cluster.local"
KUBELET_PORT = 10250
PAUSE_IMAGE = "docker.io/kiln/pause:1"
CONTAINERD_NAMESPACE = "k8s.io"
# The longest path a unix socket may have on Linux (sun_path's 108 bytes, less the terminating NUL).
SOCKET_PATH_BYTES = 107


@dataclass(frozen=True)
class NodePaths:
    """Where the node keeps its state: `root` for data, `run` (short, for unix sockets) for runtime state."""

    root: Path
    run: Path

    @property
    def socket(self) -> Path:
        return self.run / "containerd.sock"

    @property
    def cni_conf(self) -> Path:
        return self.root / "cni" / "net.d"

    @property
    def kubelet_root(self) -> Path:
        return self.root / "kubelet"

    def socket_path_problem(self) -> str | None:
        """Why kubelet could not bind its unix sockets under kubelet_root (a path over SOCKET_PATH_BYTES: kubelet
        then fails 30 s later with "bind: invalid argument"), or None. Every other socket lives under `run`."""
        longest = self.kubelet_root / "pod-resources" / ("9" * 10)  # kubelet binds a 10-digit temporary name
        if len(bytes(longest)) <= SOCKET_PATH_BYTES:
            return None
        return (f"the node folder {self.root} is too long for kubelet's unix sockets ({longest} is "
                f"{len(bytes(longest))} bytes, over {SOCKET_PATH_BYTES}): choose a shorter --root")  # fmt: skip


def containerd_config(paths: NodePaths, bins: dict[str, Path]) -> str:
    """containerd's config (version 3 schema, accepted by 2.x) with every path private to this cluster."""
    root, run = paths.root / "containerd", paths.run
    cni_bin = bins["bridge"].parent
    return f"""version = 3
root = '{root}'
state = '{run / "state"}'
imports = []

[grpc]
  address = '{paths.socket}'

[ttrpc]
  address = '{paths.socket}.ttrpc'

[plugins]
  [plugins.'io.containerd.cri.v1.images']
    snapshotter = 'overlayfs'
    [plugins.'io.containerd.cri.v1.images'.pinned_images]
      sandbox = '{PAUSE_IMAGE}'

  [plugins.'io.containerd.cri.v1.runtime']
    restrict_oom_score_adj = true
    netns_mounts_under_state_dir = true
    cdi_spec_dirs = []
    [plugins.'io.containerd.cri.v1.runtime'.containerd]
      default_runtime_name = 'runc'
      [plugins.'io.containerd.cri.v1.runtime'.containerd.runtimes.runc]
        runtime_type = 'io.containerd.runc.v2'
        [plugins.'io.containerd.cri.v1.runtime'.containerd.runtimes.runc.options]
          BinaryName = '{bins["runc"]}'
          Root = '{run / "runc"}'
          SystemdCgroup = false
    [plugins.'io.containerd.cri.v1.runtime'.cni]
      bin_dirs = ['{cni_bin}']
      conf_dir = '{paths.cni_conf}'

  [plugins.'io.containerd.grpc.v1.cri']
    stream_server_address = '127.0.0.1'
    stream_server_port = '0'

  [plugins.'io.containerd.shim.v1.manager']
    socket_dir = '{run / "shims"}'

  [plugins.'io.containerd.internal.v1.opt']
    path = '{root / "opt"}'
"""


def cni_config(paths: NodePaths, addr: network.Addresses) -> dict[str, object]:
    """The bridge network: pods on `kiln0`, addresses from the pod CIDR, no masquerade (nothing leaves)."""
    return {
        "cniVersion": "1.0.0",
        "name": "kiln",
        "plugins": [
            {
                "type": "bridge",
                "bridge": addr.bridge,
                "isGateway": True,
                "ipMasq": False,
                "hairpinMode": True,
                "ipam": {
                    "type": "host-local",
                    "ranges": [[{"subnet": addr.pod_cidr, "gateway": addr.node_ip}]],
                    "routes": [{"dst": "0.0.0.0/0"}],
                    "dataDir": str(paths.root / "cni" / "ipam"),
                },
            },
            {"type": "portmap", "capabilities": {"portMappings": True}},
        ],
    }


def kubelet_config(paths: NodePaths, addr: network.Addresses, ca: Path, cert: Path, key: Path) -> dict[str, object]:
    empty_resolv = paths.root / "resolv.conf"
    empty_resolv.write_text("")
    return {
        "apiVersion": "kubelet.config.k8s.io/v1beta1",
        "kind": "KubeletConfiguration",
        "address": addr.node_ip,
        "port": KUBELET_PORT,
        "readOnlyPort": 0,
        "healthzBindAddress": "127.0.0.1",
        "healthzPort": 10248,
        "tlsCertFile": str(cert),
        "tlsPrivateKeyFile": str(key),
        "authentication": {
            "anonymous": {"enabled": False},
            "webhook": {"enabled": True},
            "x509": {"clientCAFile": str(ca)},
        },
        "authorization": {"mode": "Webhook"},
        "cgroupDriver": "cgroupfs",
        "failCgroupV1": False,
        "failSwapOn": False,
        "containerRuntimeEndpoint": f"unix://{paths.socket}",
        "clusterDNS": [addr.node_ip],
        "clusterDomain": CLUSTER_DOMAIN,
        "resolvConf": str(empty_resolv),
        "imageGCHighThresholdPercent": 100,
        "imageGCLowThresholdPercent": 99,
        "evictionHard": {"memory.available": "200Mi", "nodefs.available": "2%", "imagefs.available": "2%"},
        "serializeImagePulls": False,
        "rotateCertificates": False,
        "registerNode": True,
        "maxPods": 110,
        "podPidsLimit": -1,
        "shutdownGracePeriod": "0s",
        "volumeStatsAggPeriod": "10s",
        "nodeStatusReportFrequency": "10s",
        "syncFrequency": "10s",
        "fileCheckFrequency": "10s",
    }


def kube_proxy_config(addr: network.Addresses, kubeconfig: Path) -> dict[str, object]:
    return {
        "apiVersion": "kubeproxy.config.k8s.io/v1alpha1",
        "kind": "KubeProxyConfiguration",
        "clientConnection": {"kubeconfig": str(kubeconfig)},
        "mode": "iptables",
        "clusterCIDR": addr.pod_cidr,
        "hostnameOverride": NODE_NAME,
        "bindAddress": addr.node_ip,
        "healthzBindAddress": "127.0.0.1:10256",
        "metricsBindAddress": "127.0.0.1:10249",
        "nodePortAddresses": [f"{addr.node_ip}/32"],
        "conntrack": {"maxPerCore": 0, "min": 0, "tcpEstablishedTimeout": "0s", "tcpCloseWaitTimeout": "0s"},
        "iptables": {"localhostNodePorts": False, "syncPeriod": "10s", "minSyncPeriod": "0s"},
    }


def corefile(addr: network.Addresses, kubeconfig: Path) -> str:
    """cluster.local, reverse zones, nothing else: other names get REFUSED and no query leaves the machine."""
    return f"""{CLUSTER_DOMAIN}:53 in-addr.arpa:53 ip6.arpa:53 {{
    bind {addr.node_ip}
    errors
    kubernetes {CLUSTER_DOMAIN} in-addr.arpa ip6.arpa {{
        kubeconfig {kubeconfig}
        pods insecure
        fallthrough in-addr.arpa ip6.arpa
        ttl 5
    }}
    cache 5
}}
"""


COREDNS_RBAC: list[dict[str, object]] = [
    {
        "apiVersion": "rbac.authorization.k8s.io/v1",
        "kind": "ClusterRole",
        "metadata": {"name": "kiln:coredns"},
        "rules": [
            {
                "apiGroups": [""],
                "resources": ["services", "endpoints", "pods", "namespaces"],
                "verbs": ["list", "watch"],
            },
            {"apiGroups": ["discovery.k8s.io"], "resources": ["endpointslices"], "verbs": ["list", "watch"]},
        ],
    },
    {
        "apiVersion": "rbac.authorization.k8s.io/v1",
        "kind": "ClusterRoleBinding",
        "metadata": {"name": "kiln:coredns"},
        "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole", "name": "kiln:coredns"},
        "subjects": [{"apiGroup": "rbac.authorization.k8s.io", "kind": "User", "name": "system:coredns"}],
    },
]


class Node:
    """containerd, kubelet, kube-proxy and CoreDNS joined to `plane` (a started ControlPlane)."""

    def __init__(self, plane: ControlPlane, paths: NodePaths, addr: network.Addresses, detached: bool) -> None:
        self.plane, self.paths, self.addr, self.detached = plane, paths, addr, detached
        self.bins = plane.bins
        self.processes: dict[str, Process] = {}
        self.timings: dict[str, float] = {}

    def _start(self, name: str, argv: list[str]) -> Process:
        proc = Process(name, argv, self.paths.root / "logs" / f"{name}.log", detached=self.detached)
        self.processes[name] = proc
        return proc

    def credentials(self, name: str, user: str, groups: tuple[str, ...] = (), folder: Path | None = None) -> Path:
        """A kubeconfig for `user` (a client certificate from the cluster's CA), written as `<name>.kubeconfig`."""
        pair = self.plane.ca.client(user, groups)
        folder = folder or self.paths.root / "pki"
        folder.mkdir(parents=True, exist_ok=True)
        cert, key = pair.write(folder, name)
        return self.plane.write_kubeconfig(
            folder / f"{name}.kubeconfig", {"client-certificate": str(cert), "client-key": str(key)}
        )

    def start(self) -> None:
        began = time.monotonic()
        for folder in (self.paths.root / "logs", self.paths.cni_conf, self.paths.kubelet_root, self.paths.run):
            folder.mkdir(parents=True, exist_ok=True)
        self._start_containerd()
        images.import_pause(self.bins, self.paths.socket, self.paths.root / "images")
        self._start_kubelet()
        self._start_kube_proxy()
        self._start_coredns()
        self.wait_ready()
        self.timings["node"] = time.monotonic() - began

    def _start_containerd(self) -> None:
        config = self.paths.root / "containerd.toml"
        config.write_text(containerd_config(self.paths, self.bins))
        (self.paths.cni_conf / "10-kiln.conflist").write_text(json.dumps(cni_config(self.paths, self.addr), indent=1))
        proc = self._start("containerd", [str(self.bins["containerd"]), "--config", str(config)])
        wait_until(
            lambda: proc.poll() is not None or self.paths.socket.exists(), 60, "containerd's socket", describe=proc.tail
        )
        if proc.poll() is not None:
            raise RuntimeError(f"containerd exited at start\n{proc.tail()}")

    def _start_kubelet(self) -> None:
        folder = self.paths.root / "pki"
        folder.mkdir(parents=True, exist_ok=True)
        serving = self.plane.ca.serving(f"system:node:{NODE_NAME}", ips=(self.addr.node_ip,), names=(NODE_NAME,))
        cert, key = serving.write(folder, "kubelet-serving")
        config = self.paths.root / "kubelet.yaml"
        config.write_text(yaml.safe_dump(kubelet_config(self.paths, self.addr, self.plane.ca_path, cert, key)))
        kubeconfig = self.credentials("kubelet", f"system:node:{NODE_NAME}", ("system:nodes",))
        self._start(
            "kubelet",
            [
                str(self.bins["kubelet"]),
                f"--config={config}",
                f"--kubeconfig={kubeconfig}",
                f"--hostname-override={NODE_NAME}",
                f"--node-ip={self.addr.node_ip}",
                f"--root-dir={self.paths.kubelet_root}",
                f"--cert-dir={self.paths.kubelet_root / 'pki'}",
                "--v=1",
            ],
        )

    def _start_kube_proxy(self) -> None:
        kubeconfig = self.credentials("kube-proxy", "system:kube-proxy")
        config = self.paths.root / "kube-proxy.yaml"
        config.write_text(yaml.safe_dump(kube_proxy_config(self.addr, kubeconfig)))
        self._start("kube-proxy", [str(self.bins["kube-proxy"]), f"--config={config}", "--v=1"])

    def _start_coredns(self) -> None:
        for manifest in COREDNS_RBAC:
            self.plane.kube.apply_object(manifest)
        kubeconfig = self.credentials("coredns", "system:coredns")
        config = self.paths.root / "Corefile"
        config.write_text(corefile(self.addr, kubeconfig))
        self._start("coredns", [str(self.bins["coredns"]), "-conf", str(config)])

    def wait_ready(self, timeout: float = 120) -> None:
        """The Node object reports Ready (containerd, CNI config and kubelet all up)."""

        def ready() -> bool:
            node = self.plane.kube.get_or_none(f"/api/v1/nodes/{NODE_NAME}")
            conditions = {c["type"]: c["status"] for c in (node or {}).get("status", {}).get("conditions") or []}
            return conditions.get("Ready") == "True"

        wait_until(ready, timeout, f"node {NODE_NAME} to be Ready", describe=self.describe)

    def describe(self) -> str:
        return "\n".join(proc.tail(25) for proc in self.processes.values())

    def stop(self) -> None:
        """Stop kubelet first (so it restarts nothing), then the proxy, DNS and containerd."""
        for name in ("kubelet", "kube-proxy", "coredns"):
            if name in self.processes:
                self.processes.pop(name).stop(grace=10)
        images.remove_all_pods(self.bins, self.paths.socket)
        if "containerd" in self.processes:
            self.processes.pop("containerd").stop(grace=10)
