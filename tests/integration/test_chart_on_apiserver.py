"""Scenario 1 (chart): what `helm template` renders from charts/kiln is accepted by a real API server.

Every manifest goes through a server-side dry run first (what `kubectl apply --dry-run=server` sends:
dryRun=All), then the default install is applied for real. The real install pins the operator pod to a
node that does not exist (the chart's operator.nodeSelector), because the tests run the operator themselves
(see kiln_cluster/chart.py) and a second one must not start. The CI values files are checked first, as fresh
installs, before the default install exists (its bound claim could not be resized by a dry run).
"""

import copy
from pathlib import Path
from typing import Any

import pytest

from kiln_cluster import chart
from kiln_cluster.rest import ApiError, Kube

Obj = dict[str, Any]
CI_VALUES = sorted((chart.CHART / "ci").glob("*.yaml")) if (chart.CHART / "ci").is_dir() else []
# Kinds of other projects' CRDs (prometheus-operator) that a bare API server does not serve.
FOREIGN_GROUPS = ("monitoring.coreos.com/",)


def namespaces_of(manifests: list[Obj]) -> set[str]:
    return {m["metadata"]["namespace"] for m in manifests if m.get("metadata", {}).get("namespace")}


def servable(kube: Kube, manifests: list[Obj]) -> list[Obj]:
    """The manifests whose kind this API server serves; any other must belong to a foreign CRD group."""
    kept = []
    for manifest in manifests:
        try:
            kube.resource(manifest["apiVersion"], manifest["kind"])
        except (LookupError, ApiError):
            assert manifest["apiVersion"].startswith(FOREIGN_GROUPS), f"unknown kind {manifest['kind']}"
            continue
        kept.append(manifest)
    return kept


@pytest.mark.parametrize("values", CI_VALUES, ids=[p.stem for p in CI_VALUES])
def test_every_ci_values_file_renders_manifests_the_api_server_accepts(
    kube: Kube, kiln_chart: list[Obj], trainingjob_crd: Obj, values: Path
) -> None:
    manifests = servable(kube, chart.render(values_files=(values,)))
    assert manifests
    for name in namespaces_of(manifests):
        chart.ensure_namespace(kube, name)
    for manifest in manifests:
        kube.apply_object(manifest, chart.RELEASE_NAMESPACE, dry_run=True)


def test_the_default_install_passes_a_server_side_dry_run_then_applies_for_real(
    kube: Kube, kiln_chart: list[Obj], trainingjob_crd: Obj
) -> None:
    manifests = chart.render("operator.nodeSelector.kiln\\.dev/no-such-node=absent", include_crds=True)
    assert {m["kind"] for m in manifests} >= {
        "CustomResourceDefinition",
        "ServiceAccount",
        "ClusterRole",
        "ClusterRoleBinding",
        "ConfigMap",
        "Deployment",
    }
    for name in namespaces_of(manifests):
        chart.ensure_namespace(kube, name)
    for manifest in manifests:
        kube.apply_object(copy.deepcopy(manifest), chart.RELEASE_NAMESPACE, dry_run=True)
    for manifest in manifests:
        applied = kube.apply_object(manifest, chart.RELEASE_NAMESPACE)
        assert applied["metadata"]["name"] == manifest["metadata"]["name"]
    deployment = kube.get(f"/apis/apps/v1/namespaces/{chart.RELEASE_NAMESPACE}/deployments/kiln")
    assert deployment["spec"]["template"]["spec"]["serviceAccountName"] == "kiln"
