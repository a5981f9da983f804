"""The chart's RBAC and the operator's config: what the operator may do is what it builds, and the
ConfigMap the chart renders is what the operator's config reader expects."""

from pathlib import Path

import pytest
from chart_support import (
    CHART,
    EXAMPLES,
    NAMESPACE,
    VALUES_FILES,
    Obj,
    needs_helm,
    of_kind,
    one,
    operator_children,
    operator_container,
    render,
    values_args,
)

from kiln import api
from kiln.api import constants

# Verbs that let a subject act beyond its own permissions.
ESCALATING_VERBS = {"*", "escalate", "bind", "impersonate"}


def rules_in(objs: tuple[Obj, ...], namespace: str | None) -> list[Obj]:
    """The rules bound to the operator's ServiceAccount that apply in `namespace` (None: cluster-scoped)."""
    subject = {"kind": "ServiceAccount", "name": "kiln", "namespace": NAMESPACE}
    rules: list[Obj] = []
    for binding in of_kind(objs, "ClusterRoleBinding") + of_kind(objs, "RoleBinding"):
        if subject not in binding["subjects"]:
            continue
        if binding["kind"] == "RoleBinding" and binding["metadata"]["namespace"] != namespace:
            continue
        ref = binding["roleRef"]
        role = (
            one(objs, ref["kind"], ref["name"])
            if ref["kind"] == "ClusterRole"
            else next(
                r
                for r in of_kind(objs, "Role")
                if r["metadata"]["name"] == ref["name"] and r["metadata"]["namespace"] == namespace
            )
        )
        rules += role["rules"]
    return rules


def allowed(rules: list[Obj], group: str, resource: str, verb: str, name: str | None = None) -> bool:
    return any(
        group in r["apiGroups"]
        and resource in r["resources"]
        and verb in r["verbs"]
        and (not r.get("resourceNames") or name in r["resourceNames"])
        for r in rules
    )


def group_of(api_version: str) -> str:
    return api_version.rpartition("/")[0]


# --- the operator's config --------------------------------------------------------------------------------


@needs_helm
def test_the_operator_reads_its_defaults_from_the_chart_configmap() -> None:
    from kiln_operator import config

    objs = render()
    container = operator_container(objs)
    assert container["envFrom"] == [{"configMapRef": {"name": "kiln-config"}}]
    cfg = config.OperatorConfig.from_env(one(objs, "ConfigMap", "kiln-config")["data"])
    assert cfg == config.OperatorConfig(
        trainer_image="kiln-trainer:0.1.0",
        trainer_gpu_image="kiln-trainer-gpu:0.1.0",
        serving_image="kiln-serving:0.1.0",
        serving_gpu_image="kiln-serving-gpu:0.1.0",
        image_pull_policy="IfNotPresent",
        artifacts_pvc="kiln-artifacts",
        trainer_cpu="2",
        trainer_memory="4Gi",
        serving_cpu="1",
        serving_memory="1Gi",
        watch_namespaces=(),
        image_pull_secrets=(),
        serving_hpa_enabled=False,
        serving_hpa_min_replicas=1,
        serving_hpa_max_replicas=4,
        serving_hpa_target_cpu_utilization=70,
    )


@needs_helm
def test_a_registry_and_defaults_from_values_reach_the_operator_config() -> None:
    from kiln_operator import config

    objs = render(*values_args(CHART / "ci" / "gpu-values.yaml"), "--set", "workloads.serving.gpuImage.tag=0.2.0")
    cfg = config.OperatorConfig.from_env(one(objs, "ConfigMap", "kiln-config")["data"])
    assert cfg.trainer_image == "registry.example.com/ml/kiln-trainer:0.1.0"
    assert cfg.serving_gpu_image == "registry.example.com/ml/kiln-serving-gpu:0.2.0"
    assert cfg.image_pull_policy == "Always"
    assert (cfg.trainer_cpu, cfg.trainer_memory) == ("8", "32Gi")
    assert operator_container(objs)["image"] == "registry.example.com/ml/kiln-operator:0.1.0"
    pod = one(objs, "Deployment", "kiln")["spec"]["template"]["spec"]
    assert pod["imagePullSecrets"] == [{"name": "regcred"}]
    assert cfg.image_pull_secrets == ("regcred",)
    assert cfg.serving_hpa_enabled is True
    assert (cfg.serving_hpa_min_replicas, cfg.serving_hpa_max_replicas) == (2, 8)
    assert cfg.serving_hpa_target_cpu_utilization == 60


# --- RBAC -------------------------------------------------------------------------------------------------


@needs_helm
@pytest.mark.parametrize("values", VALUES_FILES, ids=lambda p: p.name)
def test_rbac_grants_no_secrets_no_wildcards_and_no_escalation(values: Path) -> None:
    objs = render(*values_args(values), "--set", "workloads.serving.autoscaling.enabled=true")
    roles = of_kind(objs, "ClusterRole") + of_kind(objs, "Role")
    assert roles
    for role in roles:
        for rule in role["rules"]:
            assert "*" not in rule["apiGroups"] and "*" not in rule["resources"], rule
            assert not ESCALATING_VERBS & set(rule["verbs"]), rule
            assert not {"secrets", "nodes", "persistentvolumes"} & set(rule["resources"]), rule
            assert not rule.get("nonResourceURLs"), rule


def grants(rules: list[Obj]) -> dict[tuple[str, str], tuple[str, ...]]:
    """Rules as {(group, resource): sorted verbs}, merged over rules."""
    found: dict[tuple[str, str], set[str]] = {}
    for rule in rules:
        assert not rule.get("resourceNames"), rule
        for group in rule["apiGroups"]:
            for resource in rule["resources"]:
                found.setdefault((group, resource), set()).update(rule["verbs"])
    return {key: tuple(sorted(verbs)) for key, verbs in found.items()}


def expected(*tables: dict[tuple[str, str], tuple[str, ...]]) -> dict[tuple[str, str], tuple[str, ...]]:
    return {key: tuple(sorted(verbs)) for table in tables for key, verbs in table.items()}


@needs_helm
@pytest.mark.parametrize("autoscaling", [False, True])
@pytest.mark.parametrize(
    "values", [CHART / "ci" / "default-values.yaml", CHART / "ci" / "namespaced-values.yaml"], ids=lambda p: p.name
)
def test_the_chart_grants_exactly_the_verbs_the_operators_calls_need(values: Path, autoscaling: bool) -> None:
    from kiln_operator import permissions

    objs = render(*values_args(values), "--set", f"workloads.serving.autoscaling.enabled={str(autoscaling).lower()}")
    namespaced = values.name == "namespaced-values.yaml"
    extra = permissions.AUTOSCALING if autoscaling else {}
    patterns = permissions.NAMESPACE_PATTERNS if namespaced else {}
    assert grants(rules_in(objs, "ml-team-a")) == expected(permissions.NAMESPACED, extra, permissions.CLUSTER, patterns)
    cluster = expected(permissions.CLUSTER, permissions.NAMESPACE_PATTERNS) if namespaced else None
    if cluster is not None:
        assert grants(rules_in(objs, None)) == cluster  # outside its namespaces: only the cluster reads


@needs_helm
@pytest.mark.parametrize(
    "values", [CHART / "ci" / "default-values.yaml", CHART / "ci" / "namespaced-values.yaml"], ids=lambda p: p.name
)
def test_the_operator_holds_what_its_builders_need_and_what_it_grants_trainers(values: Path) -> None:
    objs = render(*values_args(values))
    rules = rules_in(objs, "ml-team-a")
    for child in operator_children():
        assert allowed(rules, group_of(child["apiVersion"]), child["kind"].lower() + "s", "create"), child["kind"]
        # An operator can only grant a trainer what it holds itself (no escalate/bind).
        if child["kind"] == "Role":
            for rule in child["rules"]:
                for g in rule["apiGroups"]:
                    for r in rule["resources"]:
                        for verb in rule["verbs"]:
                            assert allowed(rules, g, r, verb, child["metadata"]["name"]), (g, r, verb)


@needs_helm
def test_watching_namespaces_confines_the_operator_to_a_role_in_each_of_them() -> None:
    objs = render(*values_args(CHART / "ci" / "namespaced-values.yaml"))
    args = operator_container(objs)["args"]
    assert "--namespace=ml-team-a" in args and "--namespace=ml-team-b" in args
    assert "--all-namespaces" not in args
    assert one(objs, "ConfigMap", "kiln-config")["data"]["KILN_WATCH_NAMESPACES"] == "ml-team-a,ml-team-b"
    assert sorted(r["metadata"]["namespace"] for r in of_kind(objs, "Role")) == ["ml-team-a", "ml-team-b"]
    # Cluster-wide it may only read CRDs; in a namespace it does not watch it may do nothing.
    (cluster_role,) = of_kind(objs, "ClusterRole")
    assert cluster_role["rules"] == [
        {"apiGroups": ["apiextensions.k8s.io"], "resources": ["customresourcedefinitions"], "verbs": ["list", "watch"]},
        {"apiGroups": [""], "resources": ["namespaces"], "verbs": ["list", "watch"]},
    ]
    for group, resource in [(constants.GROUP, "trainingjobs"), ("batch", "jobs"), ("", "pods")]:
        assert not allowed(rules_in(objs, "kube-system"), group, resource, "get")
    assert allowed(rules_in(objs, "ml-team-b"), "batch", "jobs", "create")


@needs_helm
def test_kopf_may_read_namespaces_only_when_it_matches_listed_ones() -> None:
    assert not allowed(rules_in(render(), None), "", "namespaces", "list")  # --all-namespaces never reads them
    namespaced = render(*values_args(CHART / "ci" / "namespaced-values.yaml"))
    assert allowed(rules_in(namespaced, None), "", "namespaces", "watch")


@needs_helm
def test_the_operator_may_manage_autoscalers_only_when_serving_autoscaling_is_on() -> None:
    assert not allowed(rules_in(render(), "default"), "autoscaling", "horizontalpodautoscalers", "patch")
    on = render("--set", "workloads.serving.autoscaling.enabled=true")
    assert allowed(rules_in(on, "default"), "autoscaling", "horizontalpodautoscalers", "patch")


@needs_helm
@pytest.mark.parametrize("enabled", [False, True])
def test_the_operator_autoscales_exactly_when_the_chart_grants_it_the_autoscalers_it_builds(enabled: bool) -> None:
    from kiln_operator import config, objects, serving_objects

    objs = render("--set", f"workloads.serving.autoscaling.enabled={str(enabled).lower()}")
    cfg = config.OperatorConfig.from_env(one(objs, "ConfigMap", "kiln-config")["data"])
    assert cfg.serving_hpa_enabled is enabled
    rules = rules_in(objs, "default")
    for path in EXAMPLES:
        job = api.load_trainingjob(path)
        assert serving_objects.autoscaled(job.spec, cfg) is (enabled and job.spec.serving.replicas > 0)
        owner = objects.Owner(name=job.metadata.name, namespace="default", uid="0000")
        hpa = serving_objects.build_autoscaler(owner, job.spec, cfg)
        for verb in ("patch", "delete"):  # server-side apply, and removal of a stale one
            assert allowed(rules, group_of(hpa["apiVersion"]), hpa["kind"].lower() + "s", verb) is enabled, verb


@needs_helm
def test_rbac_can_be_left_to_the_cluster_admin() -> None:
    objs = render("--set", "rbac.create=false")
    assert not {"ClusterRole", "ClusterRoleBinding", "Role", "RoleBinding"} & {o["kind"] for o in objs}


@needs_helm
def test_the_chart_policy_values_reach_the_operators_configuration() -> None:
    from kiln_operator import config

    def cfg_of(*values: str) -> config.OperatorConfig:
        return config.OperatorConfig.from_env(one(render(*values), "ConfigMap", "kiln-config")["data"])

    strict = cfg_of()
    assert (strict.allow_host_path, strict.allow_image_overrides, strict.allowed_image_prefixes) == (False, False, ())
    assert strict.export_deadline_seconds == config.OperatorConfig().export_deadline_seconds
    prefixes = "policy.allowedImagePrefixes={reg.example/ml,ghcr.example/x}"
    loose = cfg_of("--set", "policy.allowHostPath=true", "--set", prefixes, "--set", "policy.exportDeadlineSeconds=60")
    assert loose.allow_host_path and loose.allowed_image_prefixes == ("reg.example/ml", "ghcr.example/x")
    assert loose.export_deadline_seconds == 60


@needs_helm
def test_several_operator_replicas_elect_a_leader_through_one_lease_and_one_replica_needs_none() -> None:
    from kiln_operator import leader, permissions

    single = render()
    assert one(single, "Deployment", "kiln")["spec"]["replicas"] == 1
    assert "--leader-elect" not in operator_container(single)["args"]
    assert not allowed(rules_in(single, NAMESPACE), "coordination.k8s.io", "leases", "create")
    objs = render("--set", "operator.replicas=2")
    deployment = one(objs, "Deployment", "kiln")
    assert deployment["spec"]["replicas"] == 2 and deployment["spec"]["strategy"]["type"] == "RollingUpdate"
    container = operator_container(objs)
    assert "--leader-elect" in container["args"]
    env = {e["name"]: e for e in container["env"]}
    assert env["POD_NAMESPACE"]["valueFrom"]["fieldRef"]["fieldPath"] == "metadata.namespace"
    rules = [r for r in rules_in(objs, NAMESPACE) if "coordination.k8s.io" in r["apiGroups"]]
    granted = {v for r in rules for v in r["verbs"]}
    assert granted == set(permissions.LEADER_ELECTION[("coordination.k8s.io", "leases")])
    assert all(r["verbs"] == ["create"] or r["resourceNames"] == [leader.LEASE_NAME] for r in rules)
    assert not allowed(rules_in(objs, "default"), "coordination.k8s.io", "leases", "update", leader.LEASE_NAME)
