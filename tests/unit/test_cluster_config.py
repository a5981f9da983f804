"""The single-node cluster's settings (hack/kiln_cluster), as the node components will read them.

The node itself runs in tests/e2e; these pin the decisions its settings encode, each one a trap of this machine
kind (docs/cluster.md), so a later edit cannot drop one without a test saying which.
"""

import json
import tarfile
import tomllib
from pathlib import Path

import pytest

from kiln_cluster import images, network, node


def test_every_cluster_address_must_lie_in_the_benchmarking_range() -> None:
    default = network.Addresses()
    assert (default.node_ip, default.api_service_ip) == ("198.18.0.1", "198.19.0.1")
    for field in ("node_ip", "pod_cidr", "service_cidr"):
        with pytest.raises(ValueError, match="outside 198.18.0.0/15"):
            network.Addresses(**{field: "10.0.0.0/24" if field != "node_ip" else "10.0.0.1"})


def test_containerd_keeps_private_paths_restricts_oom_scores_and_pins_the_local_pause_image(tmp_path: Path) -> None:
    paths = node.NodePaths(root=tmp_path / "node", run=Path("/run/kiln-cluster-test"))
    bins = {"bridge": Path("/cache/bin/bridge"), "runc": Path("/usr/sbin/runc")}
    config = tomllib.loads(node.containerd_config(paths, bins))
    runtime = config["plugins"]["io.containerd.cri.v1.runtime"]
    assert runtime["restrict_oom_score_adj"] is True, "mandatory: the VM lacks CAP_SYS_RESOURCE"
    assert runtime["netns_mounts_under_state_dir"] is True
    runc = runtime["containerd"]["runtimes"]["runc"]["options"]
    assert runc == {"BinaryName": "/usr/sbin/runc", "Root": "/run/kiln-cluster-test/runc", "SystemdCgroup": False}
    assert runtime["cni"] == {"bin_dirs": ["/cache/bin"], "conf_dir": str(paths.cni_conf)}
    assert config["plugins"]["io.containerd.cri.v1.images"]["pinned_images"]["sandbox"] == images.PAUSE_IMAGE
    assert config["grpc"]["address"] == "/run/kiln-cluster-test/containerd.sock"
    assert config["plugins"]["io.containerd.shim.v1.manager"]["socket_dir"].startswith("/run/kiln-cluster-test/")
    assert config["root"].startswith(str(tmp_path)) and config["state"].startswith("/run/kiln-cluster-test/")


def test_pods_get_bridge_addresses_without_masquerade_and_dns_that_never_forwards(tmp_path: Path) -> None:
    addr = network.Addresses()
    paths = node.NodePaths(root=tmp_path, run=tmp_path / "run")
    bridge = node.cni_config(paths, addr)["plugins"][0]  # type: ignore[index]
    assert (bridge["bridge"], bridge["ipMasq"], bridge["hairpinMode"]) == ("kiln0", False, True)
    assert bridge["ipam"]["ranges"] == [[{"subnet": "198.18.0.0/24", "gateway": "198.18.0.1"}]]
    corefile = node.corefile(addr, tmp_path / "kubeconfig")
    assert "forward" not in corefile and "bind 198.18.0.1" in corefile


def test_kubelet_runs_on_cgroup_v1_keeps_imported_images_and_reads_an_empty_resolv_conf(tmp_path: Path) -> None:
    addr = network.Addresses()
    paths = node.NodePaths(root=tmp_path, run=tmp_path / "run")
    config = node.kubelet_config(paths, addr, tmp_path / "ca.crt", tmp_path / "k.crt", tmp_path / "k.key")
    assert (config["failCgroupV1"], config["cgroupDriver"]) == (False, "cgroupfs")
    assert config["imageGCHighThresholdPercent"] == 100
    assert Path(str(config["resolvConf"])).read_text() == ""
    assert config["clusterDNS"] == [addr.node_ip] and config["address"] == addr.node_ip
    proxy = node.kube_proxy_config(addr, tmp_path / "kubeconfig")
    assert proxy["nodePortAddresses"] == ["198.18.0.1/32"], "NodePorts never open on the machine's own interfaces"


def test_the_pause_image_is_an_oci_archive_whose_only_layer_holds_the_binary_as_its_entrypoint(tmp_path: Path) -> None:
    binary = tmp_path / "pause"
    binary.write_bytes(b"\x7fELF pretend")
    archive = images.pause_archive(binary, tmp_path / "pause.tar")
    with tarfile.open(archive) as layout:
        index = json.load(layout.extractfile("index.json"))  # type: ignore[arg-type]
        [entry] = index["manifests"]
        assert entry["annotations"]["io.containerd.image.name"] == images.PAUSE_IMAGE
        manifest = json.load(layout.extractfile(f"blobs/sha256/{entry['digest'].split(':')[1]}"))  # type: ignore[arg-type]
        config = json.load(layout.extractfile(f"blobs/sha256/{manifest['config']['digest'].split(':')[1]}"))  # type: ignore[arg-type]
        [layer] = manifest["layers"]
        with tarfile.open(fileobj=layout.extractfile(f"blobs/sha256/{layer['digest'].split(':')[1]}")) as files:
            [member] = files.getmembers()
            assert (member.name, member.mode) == ("pause", 0o755)
    assert config["config"]["Entrypoint"] == ["/pause"]


def test_a_node_folder_too_long_for_kubelets_unix_sockets_is_refused_before_anything_starts() -> None:
    # kubelet binds <root>/kubelet/pod-resources/<10 digits>; past 107 bytes it failed 30 s into `up`, obscurely.
    short = node.NodePaths(root=Path("/tmp/pytest-of-root/pytest-99/cluster0/node"), run=Path("/run/k"))
    assert short.socket_path_problem() is None
    deep = Path("/tmp/pytest-of-root/pytest-102/test_cluster_up_then_down_leav0/cluster/node")
    problem = node.NodePaths(root=deep, run=Path("/run/k")).socket_path_problem()
    assert problem is not None and "108 bytes, over 107" in problem and "choose a shorter --root" in problem
    edge = Path("/" + "n" * (node.SOCKET_PATH_BYTES - len("/kubelet/pod-resources/0123456789") - 1))
    assert node.NodePaths(root=edge, run=Path("/run/k")).socket_path_problem() is None
    assert node.NodePaths(root=Path(f"{edge}x"), run=Path("/run/k")).socket_path_problem() is not None
