"""Fixtures for the e2e tier: a real single-node cluster on this machine and kiln installed into it as a user would.

- `cluster`: `kiln_cluster.Cluster` — control plane, containerd + kubelet + kube-proxy + CoreDNS, storage and kiln's
  images built from the Dockerfiles (hack/build-images.sh) and imported into containerd. Started once for the
  tier and taken down after it (down puts the machine back as it was; test_cluster_lifecycle.py proves that).
- `kubectl` / `helm`: the real CLIs with the cluster's kubeconfig, run as the README writes them.
- `kiln_release`: `helm install kiln charts/kiln -n kiln-system --create-namespace`, the operator pod Ready.
- `workload_namespace`: a fresh namespace (restricted PodSecurity, the cluster's default) holding the chart's
  artifacts claim, for TrainingJobs; on failure the test's output gets pods, logs and events.
- `prometheus`: Debian's Prometheus discovering pods through the API server (kubernetes_sd, pod role).

A missing prerequisite (not root, no binaries, no image builder) skips the tier with one reason — and fails it
under CI=true, where everything must run.
"""

import subprocess
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from kiln_cluster import binaries, chart
from kiln_cluster import prometheus as prom
from kiln_cluster.cluster import Cluster
from kiln_cluster.rest import Kube
from kiln_cluster.waiting import wait_until

from . import clusterops

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="package")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    clusterops.require_prerequisites()
    node = Cluster(tmp_path_factory.mktemp("cluster"))
    node.up()
    try:
        yield node
    finally:
        node.down()


@pytest.fixture(scope="package")
def kube(cluster: Cluster) -> Kube:
    return cluster.kube


@pytest.fixture(scope="package")
def kubectl(cluster: Cluster) -> clusterops.Cli:
    return clusterops.Cli(binaries.find("kubectl"), cluster.kubeconfig, cwd=ROOT)


@pytest.fixture(scope="package")
def helm(cluster: Cluster) -> clusterops.Cli:
    return clusterops.Cli(binaries.find("helm"), cluster.kubeconfig, cwd=ROOT)


@pytest.fixture(scope="package")
def kiln_release(cluster: Cluster, helm: clusterops.Cli, kubectl: clusterops.Cli) -> Iterator[None]:
    """The chart installed exactly as the README says, waited for as the README says."""
    helm.shell(clusterops.README_INSTALL)
    kubectl.shell(clusterops.README_ROLLOUT, timeout=300)
    yield
    subprocess.run(
        [str(helm.binary), "uninstall", "kiln", "-n", "kiln-system", "--wait", "--timeout", "120s"],
        env=helm.env,
        capture_output=True,
        timeout=180,
        check=False,
    )


@pytest.fixture
def namespace(kube: Kube, request: pytest.FixtureRequest) -> Iterator[str]:
    name = f"e-{request.node.name.removeprefix('test_')[:40].rstrip('_-').replace('_', '-')}-{uuid.uuid4().hex[:5]}"
    kube.create("/api/v1/namespaces", {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": name}})
    wait_until(
        lambda: kube.get_or_none(f"/api/v1/namespaces/{name}/serviceaccounts/default"),
        60,
        f"the default ServiceAccount in {name}",
    )
    yield name
    report = getattr(request.node, "report_call", None)
    if report is not None and report.failed:
        print(clusterops.describe_namespace(kube, name))
    kube.delete(f"/api/v1/namespaces/{name}")


@pytest.fixture
def workload_namespace(cluster: Cluster, kiln_release: None, namespace: str) -> str:
    """A fresh namespace holding the chart's artifacts claim (as workloadNamespaces would create it), bound."""
    cluster.ensure_free_volumes(2)
    cluster.kube.create_object(chart.artifacts_claim(namespace), namespace)
    cluster.claim_path(namespace, "kiln-artifacts")
    return namespace


@pytest.fixture(scope="package")
def prometheus(cluster: Cluster, tmp_path_factory: pytest.TempPathFactory) -> Iterator[prom.Prometheus]:
    root = tmp_path_factory.mktemp("prometheus")
    kubeconfig = cluster.credentials("prometheus", "kiln:prometheus", root)
    cluster.kube.apply_object(clusterops.PROMETHEUS_ROLE)
    cluster.kube.apply_object(clusterops.PROMETHEUS_BINDING)
    server = prom.Prometheus(root)
    server.start_kubernetes_pods(kubeconfig)
    try:
        yield server
    finally:
        server.stop()


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Any:
    """Keep each phase's report on the item, so fixtures can tell in teardown whether the test failed."""
    report = yield
    setattr(item, f"report_{report.when}", report)
    return report
