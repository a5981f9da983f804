"""`make cluster` / `make cluster-down` as a person runs them: up prints the kubeconfig to export and leaves a Ready
node; down stops every process and removes every bridge, veth, rule, mount, cgroup and sysctl change up made.

Runs first in the tier (before the shared `cluster` fixture exists), so the footprint it compares is the
machine's own.
"""

import json
import os
import subprocess
import sys

import pytest

from kiln_cluster import binaries, images
from kiln_cluster.cluster import EXPORT_DIR
from kiln_cluster.footprint import Footprint

from . import clusterops

# The first test of the tier builds and imports images and brings the node up: well past the default limit.
pytestmark = pytest.mark.timeout(2400)


def kiln_cluster(*args: str, timeout: float = 1800) -> subprocess.CompletedProcess[str]:
    """`python -m kiln_cluster ...`: what `make cluster` / `make cluster-down` run."""
    return subprocess.run(
        [sys.executable, "-m", "kiln_cluster", *args], capture_output=True, text=True, timeout=timeout, check=False
    )


def test_cluster_up_then_down_leaves_the_machine_exactly_as_it_found_it(
    tmp_path_factory: pytest.TempPathFactory,
) -> None:
    clusterops.require_prerequisites()
    # Not tmp_path: its name and pytest's run counter grow past what kubelet's unix sockets allow
    # (NodePaths.socket_path_problem).
    root = tmp_path_factory.mktemp("lifecycle") / "cluster"
    # The image builder's own state (podman's storage mount) belongs to the builder, not the cluster: build
    # first (cached), so `up` finds the images made and the footprint compares only what the cluster does.
    images.build_kiln_images(EXPORT_DIR)
    before = Footprint.take()
    up = kiln_cluster("up", "--root", str(root))
    try:
        assert up.returncode == 0, up.stdout + up.stderr
        assert up.stdout.strip().splitlines()[-1] == f"export KUBECONFIG={root / 'kubeconfig'}"

        # -- a person's kubectl sees a Ready node with kiln's images on it
        kubectl = binaries.find("kubectl")
        assert kubectl is not None
        env = {**os.environ, "KUBECONFIG": str(root / "kubeconfig")}
        got = subprocess.run(
            [str(kubectl), "get", "nodes", "-o", "json"], env=env, capture_output=True, text=True, timeout=60
        )
        assert got.returncode == 0, got.stderr
        [node] = json.loads(got.stdout)["items"]
        conditions = {c["type"]: c["status"] for c in node["status"]["conditions"]}
        assert conditions["Ready"] == "True"
        assert node["status"]["addresses"][0]["address"].startswith("198.18.")
        names = {name for image in node["status"].get("images") or [] for name in image.get("names") or []}
        for image in ("kiln-operator", "kiln-trainer", "kiln-serving"):
            assert f"docker.io/library/{image}:0.1.0" in names, sorted(names)

        during = Footprint.take()
        assert "kiln0" in during.links - before.links
        assert during.processes - before.processes, "the cluster's processes run detached"
    finally:
        down = kiln_cluster("down", "--root", str(root), timeout=600)
    assert down.returncode == 0, down.stdout + down.stderr
    assert before.difference(Footprint.take()) == {}
