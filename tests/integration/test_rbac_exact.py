"""Issue 14 point 8 on the API server: the chart's operator role allows exactly the verbs the operator's calls
need (kiln_operator.permissions, call by call) and no other verb on those resources, asked of the real
authorizer with SubjectAccessReviews, in both watch modes."""

from typing import Any

import pytest

from kiln_cluster import chart
from kiln_cluster.chart import RELEASE_NAMESPACE
from kiln_cluster.rest import Kube
from kiln_operator import permissions

Obj = dict[str, Any]
VERBS = ("get", "list", "watch", "create", "update", "patch", "delete", "deletecollection")
RBAC_KINDS = {"ClusterRole", "ClusterRoleBinding", "Role", "RoleBinding"}
WATCHED = ("ml-team-a", "ml-team-b")  # charts/kiln/ci/namespaced-values.yaml


def allowed(kube: Kube, user: str, verb: str, group: str, resource: str, namespace: str | None) -> bool:
    resource, _, subresource = resource.partition("/")
    attributes: Obj = {"verb": verb, "group": group, "resource": resource}
    if subresource:
        attributes["subresource"] = subresource
    if namespace:
        attributes["namespace"] = namespace
    review = {
        "apiVersion": "authorization.k8s.io/v1",
        "kind": "SubjectAccessReview",
        "spec": {"user": user, "groups": ["system:authenticated"], "resourceAttributes": attributes},
    }
    return bool(kube.create("/apis/authorization.k8s.io/v1/subjectaccessreviews", review)["status"].get("allowed"))


def install_rbac(kube: Kube, manifests: list[Obj], account: str) -> str:
    """Apply the chart's RBAC objects, bound to a service account of this test's own; return its user name."""
    for obj in manifests:
        if obj["kind"] not in RBAC_KINDS:
            continue
        obj = {**obj, "metadata": {**obj["metadata"], "name": f"{obj['metadata']['name']}-{account}"}}
        if "roleRef" in obj:
            obj["roleRef"] = {**obj["roleRef"], "name": f"{obj['roleRef']['name']}-{account}"}
            obj["subjects"] = [{"kind": "ServiceAccount", "name": account, "namespace": RELEASE_NAMESPACE}]
        kube.apply_object(obj)
    return f"system:serviceaccount:{RELEASE_NAMESPACE}:{account}"


@pytest.mark.parametrize("mode", ["all-namespaces", "watch-namespaces"])
def test_the_operator_may_do_exactly_what_its_calls_need(
    kube: Kube, kiln_chart: list[Obj], namespace: str, mode: str
) -> None:
    watched = mode == "watch-namespaces"
    for ns in WATCHED if watched else ():
        if kube.get_or_none(f"/api/v1/namespaces/{ns}") is None:
            kube.create("/api/v1/namespaces", {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": ns}})
    manifests = chart.render(values_files=(chart.CHART / "ci" / "namespaced-values.yaml",)) if watched else kiln_chart
    user = install_rbac(kube, manifests, f"rbac-{mode}")
    inside = WATCHED[0] if watched else namespace
    for (group, resource), verbs in permissions.NAMESPACED.items():
        for verb in VERBS:
            assert allowed(kube, user, verb, group, resource, inside) is (verb in verbs), (verb, group, resource)
            if watched:  # a namespace it does not watch: nothing at all
                assert not allowed(kube, user, verb, group, resource, namespace), (verb, group, resource)
    cluster = {**permissions.CLUSTER, **(permissions.NAMESPACE_PATTERNS if watched else {})}
    for group, resource in {**permissions.CLUSTER, **permissions.NAMESPACE_PATTERNS}:
        for verb in VERBS:
            expected = verb in cluster.get((group, resource), ())
            assert allowed(kube, user, verb, group, resource, None) is expected, (mode, verb, group, resource)
