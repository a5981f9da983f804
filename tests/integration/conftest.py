"""Fixtures for the integration tier: one real control plane (API server and controllers, no node) per tier.

Everything that needs running pods lives in the e2e tier (tests/e2e), on a real node.

- `control_plane`: etcd, kube-apiserver, kube-controller-manager and kube-scheduler on loopback
  (kiln_cluster/controlplane.py).
  Binaries come from KILN_TEST_BIN, else KUBEBUILDER_ASSETS, else PATH; without them every test here is
  skipped with one reason line.
- `kube`: an admin API client (system:masters), dicts in and out (kiln_cluster/rest.py).
- `trainingjob_crd`: the committed CRD (charts/kiln/crds/trainingjob.yaml) installed and Established.
- `namespace`: a fresh namespace per test; on failure the test's output gets every pod's state and log tail.
- `kiln_chart`: `helm template` of charts/kiln (skips when the chart or helm is missing).
- `kiln_operator`: `kiln operator` as the chart's ServiceAccount, with the chart's RBAC (kiln_cluster/chart.py).
- `workload_namespace`: a fresh namespace with the chart's artifacts claim, for TrainingJobs.
Everything started here is stopped when the tier ends (see __init__.py), and kiln_cluster/procs.py's atexit hook
kills stragglers.
"""

import json
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from kiln_cluster import binaries, chart
from kiln_cluster.controlplane import ControlPlane
from kiln_cluster.rest import ApiError, Kube
from kiln_cluster.waiting import wait_until

ROOT = Path(__file__).resolve().parents[2]
CRD_FILE = ROOT / "charts/kiln/crds/trainingjob.yaml"
_started: list[ControlPlane] = []


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    here = Path(__file__).parent
    for item in items:
        if here in Path(str(item.fspath)).parents:
            item.add_marker(pytest.mark.integration)


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Any:
    """Keep each phase's report on the item, so fixtures can tell in teardown whether the test failed."""
    report = yield
    setattr(item, f"report_{report.when}", report)
    if report.skipped and isinstance(report.longrepr, tuple) and binaries.MISSING in str(report.longrepr[2]):
        # Fold the tier's skips into one line of -ra's summary instead of one per test.
        report.longrepr = (str(Path(__file__).parent), None, report.longrepr[2])
    return report


def pytest_terminal_summary(terminalreporter: Any) -> None:
    for plane in _started:
        timings = ", ".join(f"{name} {seconds:.1f}s" for name, seconds in plane.timings.items())
        terminalreporter.write_line(f"control plane startup: {timings} (logs: {plane.logs})")


@pytest.fixture(scope="package")
def control_plane(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ControlPlane]:
    try:
        binaries.control_plane()
    except LookupError as missing:
        pytest.skip(str(missing))
    plane = ControlPlane(tmp_path_factory.mktemp("control-plane"))
    plane.start()
    _started.append(plane)
    try:
        yield plane
    finally:
        plane.stop()


@pytest.fixture(scope="package")
def kube(control_plane: ControlPlane) -> Kube:
    return control_plane.kube


def install_crd(kube: Kube, crd: dict[str, Any]) -> None:
    """Apply a CRD and wait until it is Established and its resource is served (as envtest does)."""
    kube.apply_object(crd)
    name = crd["metadata"]["name"]

    def established() -> bool:
        current = kube.get(f"/apis/apiextensions.k8s.io/v1/customresourcedefinitions/{name}")
        return any(
            c["type"] == "Established" and c["status"] == "True"
            for c in current.get("status", {}).get("conditions") or []
        )

    wait_until(established, 60, f"CRD {name} to be Established")
    group, version = crd["spec"]["group"], crd["spec"]["versions"][0]["name"]
    plural = crd["spec"]["names"]["plural"]

    def served() -> bool:
        try:
            resources = kube.get(f"/apis/{group}/{version}")["resources"]
        except ApiError:
            return False
        return any(r["name"] == plural for r in resources)

    wait_until(served, 60, f"{plural}.{group}/{version} to be served")


@pytest.fixture(scope="package")
def trainingjob_crd(kube: Kube) -> dict[str, Any]:
    crd: dict[str, Any] = yaml.safe_load(CRD_FILE.read_text())
    install_crd(kube, crd)
    return crd


@pytest.fixture
def namespace(kube: Kube, request: pytest.FixtureRequest) -> Iterator[str]:
    """A fresh namespace (with its default ServiceAccount); on failure, print what ran in it."""
    name = f"t-{request.node.name.removeprefix('test_')[:40].rstrip('_-').replace('_', '-')}-{uuid.uuid4().hex[:5]}"
    kube.create("/api/v1/namespaces", {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": name}})
    wait_until(
        lambda: kube.get_or_none(f"/api/v1/namespaces/{name}/serviceaccounts/default"),
        60,
        f"the default ServiceAccount in {name}",
    )
    yield name
    report = getattr(request.node, "report_call", None)
    if report is not None and report.failed:
        print(describe_namespace(kube, name, request))
    kube.delete(f"/api/v1/namespaces/{name}")


def describe_namespace(kube: Kube, namespace: str, request: pytest.FixtureRequest) -> str:
    """Pods, their statuses and log tails, and the namespace's events, for a failure report."""
    out = [f"===== namespace {namespace} at {time.strftime('%H:%M:%S')}"]
    if "kiln_operator" in request.fixturenames:
        out.append(request.getfixturevalue("kiln_operator").tail(80))
    try:
        for event in kube.list(f"/api/v1/namespaces/{namespace}/events")[-30:]:
            involved = event.get("involvedObject", {})
            out.append(
                f"event {involved.get('kind')}/{involved.get('name')}: {event.get('reason')}: {event.get('message')}"
            )
        for tj in kube.list(f"/apis/kiln.dev/v1alpha1/namespaces/{namespace}/trainingjobs"):
            out.append(f"trainingjob {tj['metadata']['name']} status: {json.dumps(tj.get('status', {}))[:3000]}")
        for pod in kube.list(f"/api/v1/namespaces/{namespace}/pods"):
            out.append(f"pod {pod['metadata']['name']} status: {json.dumps(pod.get('status', {}))[:1500]}")
    except (ApiError, LookupError) as err:
        out.append(f"(could not list: {err})")
    return "\n".join(out)


@pytest.fixture(scope="package")
def kiln_chart() -> list[dict[str, Any]]:
    reason = chart.skip_reason()
    if reason:
        pytest.skip(reason)
    return chart.render()


@pytest.fixture(scope="package")
def kiln_operator(
    control_plane: ControlPlane,
    trainingjob_crd: dict[str, Any],
    kiln_chart: list[dict[str, Any]],
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[chart.KilnOperator]:
    operator = chart.KilnOperator(control_plane, kiln_chart, tmp_path_factory.mktemp("operator"))
    operator.start()
    try:
        yield operator
    finally:
        operator.stop()


@pytest.fixture
def workload_namespace(kube: Kube, namespace: str, kiln_chart: list[dict[str, Any]]) -> str:
    """A fresh namespace holding the chart's artifacts PersistentVolumeClaim, as workloadNamespaces would."""
    kube.create_object(chart.artifacts_claim(namespace), namespace)
    return namespace
