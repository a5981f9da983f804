"""Scenario 7: least privilege. The chart's operator role can do what the operator needs and no more; the
role the operator gives each trainer lets it patch only its own TrainingJob's status.

Permissions are asked of the API server's authorizer with SubjectAccessReviews (what `kubectl auth can-i
--as` does), and the trainer's are also exercised for real with its service-account token.
"""

from typing import Any

import pytest
import trainingjobs as tj

from kiln_cluster.chart import RELEASE_NAMESPACE, KilnOperator
from kiln_cluster.controlplane import ControlPlane
from kiln_cluster.rest import ApiError, Kube
from kiln_cluster.waiting import wait_until

Obj = dict[str, Any]
OPERATOR = f"system:serviceaccount:{RELEASE_NAMESPACE}:kiln"


def can(
    kube: Kube,
    user: str,
    verb: str,
    resource: str,
    group: str = "",
    namespace: str | None = None,
    name: str | None = None,
    subresource: str | None = None,
) -> bool:
    """Whether the API server's authorizer allows `user` (a service account) to do this."""
    account_namespace = user.split(":")[2]
    attributes: Obj = {"verb": verb, "resource": resource, "group": group}
    for key, value in (("namespace", namespace), ("name", name), ("subresource", subresource)):
        if value is not None:
            attributes[key] = value
    review = {
        "apiVersion": "authorization.k8s.io/v1",
        "kind": "SubjectAccessReview",
        "spec": {
            "user": user,
            "groups": ["system:serviceaccounts", f"system:serviceaccounts:{account_namespace}", "system:authenticated"],
            "resourceAttributes": attributes,
        },
    }
    answer = kube.create("/apis/authorization.k8s.io/v1/subjectaccessreviews", review)
    return bool(answer["status"].get("allowed"))


NEEDED = [
    ("watch", "trainingjobs", "kiln.dev", None, None),
    ("patch", "trainingjobs", "kiln.dev", "team", "status"),
    ("update", "trainingjobs", "kiln.dev", "team", "finalizers"),
    ("create", "jobs", "batch", "team", None),
    ("create", "deployments", "apps", "team", None),
    ("create", "services", "", "team", None),
    ("create", "serviceaccounts", "", "team", None),
    ("create", "roles", "rbac.authorization.k8s.io", "team", None),
    ("create", "rolebindings", "rbac.authorization.k8s.io", "team", None),
    ("list", "pods", "", "team", None),
    ("create", "events", "", "team", None),
]
FORBIDDEN = [
    ("get", "secrets", "", "team", None),
    ("list", "secrets", "", None, None),
    ("create", "configmaps", "", "team", None),
    ("create", "pods", "", "team", None),
    ("delete", "jobs", "batch", "team", None),
    ("get", "pods", "", "team", "log"),
    ("update", "jobs", "batch", "team", None),
    ("delete", "nodes", "", None, None),
    ("create", "customresourcedefinitions", "apiextensions.k8s.io", None, None),
    ("create", "clusterrolebindings", "rbac.authorization.k8s.io", None, None),
    ("impersonate", "users", "", None, None),
    ("*", "*", "*", None, None),
]


@pytest.mark.parametrize(
    ("verb", "resource", "group", "namespace", "sub"),
    NEEDED,
    ids=[f"{v}-{r}{'-' + s if s else ''}" for v, r, _, _, s in NEEDED],
)
def test_the_chart_lets_the_operator_do_what_it_needs(
    kube: Kube,
    kiln_operator: KilnOperator,
    verb: str,
    resource: str,
    group: str,
    namespace: str | None,
    sub: str | None,
) -> None:
    assert can(kube, OPERATOR, verb, resource, group, namespace, subresource=sub)


@pytest.mark.parametrize(
    ("verb", "resource", "group", "namespace", "sub"),
    FORBIDDEN,
    ids=[f"{v}-{r}{'-' + s if s else ''}".replace("*", "any") for v, r, _, _, s in FORBIDDEN],
)
def test_the_chart_lets_the_operator_do_nothing_more(
    kube: Kube,
    kiln_operator: KilnOperator,
    verb: str,
    resource: str,
    group: str,
    namespace: str | None,
    sub: str | None,
) -> None:
    assert not can(kube, OPERATOR, verb, resource, group, namespace, subresource=sub)


def test_a_trainer_may_patch_only_its_own_trainingjobs_status(
    kube: Kube, control_plane: ControlPlane, kiln_operator: KilnOperator, workload_namespace: str
) -> None:
    namespace = workload_namespace
    # Suspended jobs: the operator creates each trainer's identity, but no training runs.
    for name in ("mine", "theirs"):
        kube.create_object(tj.digits_job(name, runPolicy={"suspend": True}), namespace)
    trainer = f"system:serviceaccount:{namespace}:mine-trainer"
    wait_until(
        lambda: kube.get_or_none(
            f"/apis/rbac.authorization.k8s.io/v1/namespaces/{namespace}/rolebindings/mine-trainer"
        ),
        120,
        "the trainer's RoleBinding",
        describe=kiln_operator.tail,
    )

    assert can(kube, trainer, "patch", "trainingjobs", "kiln.dev", namespace, "mine", "status")
    assert can(kube, trainer, "get", "trainingjobs", "kiln.dev", namespace, "mine")
    assert not can(kube, trainer, "patch", "trainingjobs", "kiln.dev", namespace, "theirs", "status")
    assert not can(kube, trainer, "patch", "trainingjobs", "kiln.dev", namespace, "mine")  # the spec
    assert not can(kube, trainer, "list", "trainingjobs", "kiln.dev", namespace)
    assert not can(kube, trainer, "get", "secrets", "", namespace)
    assert not can(kube, trainer, "create", "pods", "", namespace)

    # The same, for real, with the trainer's own token.
    as_trainer = control_plane.client_for_token(control_plane.service_account_token(namespace, "mine-trainer"))
    progress = {"status": {"progress": {"epoch": 1, "totalEpochs": 2}}}
    patched = as_trainer.patch(tj.path(namespace, "mine") + "/status", progress)
    assert patched["status"]["progress"]["epoch"] == 1
    with pytest.raises(ApiError) as refused:
        as_trainer.patch(tj.path(namespace, "theirs") + "/status", progress)
    assert refused.value.status == 403
