"""Every API permission the operator uses, with the call that needs it: the one owner of the chart's RBAC.

charts/kiln/templates/_helpers.tpl (kiln.operatorRules) renders exactly these rules, a
unit test compares them, and the integration tier checks them against the calls the operator really makes.
Keys are (API group, resource); a verb listed here and not used, or used and not listed, is a bug.
"""

from typing import Final

Grants = dict[tuple[str, str], tuple[str, ...]]

# In every namespace the operator watches (a Role per namespace, or one ClusterRole when it watches all).
NAMESPACED: Final[Grants] = {
    # reconciler reads each job (get); kopf lists and watches them; retention patches the operator's
    # finalizer onto those with retentionPolicy Delete and off again (patch). The trainer's Role grants get
    # on its job, which the operator must hold itself.
    ("kiln.dev", "trainingjobs"): ("get", "list", "watch", "patch"),
    # reconciler.write_status; the trainer's Role grants get and patch on it.
    ("kiln.dev", "trainingjobs/status"): ("get", "patch"),
    # Children's ownerReferences carry blockOwnerDeletion (OwnerReferencesPermissionEnforcement).
    ("kiln.dev", "trainingjobs/finalizers"): ("update",),
    # reconciler.ensure_trainer: create_if_absent of the trainer's ServiceAccount, Role, RoleBinding; kopf
    # watches them (handlers.repair_deleted_child re-creates one deleted by hand).
    ("", "serviceaccounts"): ("list", "watch", "create"),
    ("rbac.authorization.k8s.io", "roles"): ("list", "watch", "create"),
    ("rbac.authorization.k8s.io", "rolebindings"): ("list", "watch", "create"),
    # The workers Service (create_if_absent); the serving Service (server-side apply, delete when disabled);
    # both watched like the others.
    ("", "services"): ("list", "watch", "create", "patch", "delete"),
    # The trainer Job: reconciler reads it (get), kopf watches it, create_if_absent (also the cleanup Job),
    # reconciler.converge_job patches it (runPolicy fields and suspend).
    ("batch", "jobs"): ("get", "list", "watch", "create", "patch"),
    # The serving Deployment: read back, watched, created (autoscaled) or applied, removed when disabled.
    ("apps", "deployments"): ("get", "list", "watch", "create", "patch", "delete"),
    # The serving PodDisruptionBudget (more than one replica): applied, removed when no longer needed.
    ("policy", "poddisruptionbudgets"): ("patch", "delete"),
    # Trainer and server pods: reconciler lists them by label, kopf watches them.
    ("", "pods"): ("list", "watch"),
    # kopf.event posts Events on TrainingJobs through the core API.
    ("", "events"): ("create",),
}
# Only when the chart turns serving autoscaling on: rollout.apply_serving applies the HPA or deletes a stale one.
AUTOSCALING: Final[Grants] = {("autoscaling", "horizontalpodautoscalers"): ("patch", "delete")}
# In the release namespace, only with several replicas: leader.LeaderElector reads, creates and updates the
# one Lease (create cannot be limited by name; get and update are, to kiln-operator).
LEADER_ELECTION: Final[Grants] = {("coordination.k8s.io", "leases"): ("create", "get", "update")}
# Cluster-wide, always: kopf discovers resources by listing and watching CRDs.
CLUSTER: Final[Grants] = {("apiextensions.k8s.io", "customresourcedefinitions"): ("list", "watch")}
# Cluster-wide, only when watching listed namespaces: kopf lists and watches namespaces to match the
# patterns (with --all-namespaces it uses cluster-wide endpoints and never reads namespaces).
NAMESPACE_PATTERNS: Final[Grants] = {("", "namespaces"): ("list", "watch")}
