"""The Helm chart, rendered by the real helm: lint, render every values file, and check what a cluster gets.

helm comes from $KILN_TEST_BIN (set by `make test`), else PATH. The operator's own code is the reference
for what the chart must allow and configure: its CLI parses the rendered args, its config reader parses the
rendered ConfigMap, and its builders produce the children whose permissions the RBAC must grant.
"""

import functools
import json
import os
import re
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from kiln import api
from kiln.api import constants, crd

ROOT = Path(__file__).resolve().parents[2]
CHART = ROOT / "charts" / "kiln"
VALUES_FILES = [*sorted((CHART / "ci").glob("*-values.yaml")), ROOT / "deploy" / "kind" / "values.yaml"]
EXAMPLES = sorted((ROOT / "deploy" / "examples").glob("*.yaml"))
NAMESPACE = "kiln-system"
MONITORING_API = "monitoring.coreos.com/v1"
CLUSTER_SCOPED = {"ClusterRole", "ClusterRoleBinding", "CustomResourceDefinition"}
# Verbs that let a subject act beyond its own permissions.
ESCALATING_VERBS = {"*", "escalate", "bind", "impersonate"}

Obj = dict[str, Any]


def _find_helm() -> str | None:
    test_bin = os.environ.get("KILN_TEST_BIN")
    if test_bin and (Path(test_bin) / "helm").is_file():
        return str(Path(test_bin) / "helm")
    return shutil.which("helm")


HELM = _find_helm()
needs_helm = pytest.mark.skipif(
    HELM is None, reason="helm not found: run `make test` (sets KILN_TEST_BIN) or put helm on PATH"
)


def _helm(*args: str) -> subprocess.CompletedProcess[str]:
    assert HELM is not None
    return subprocess.run([HELM, *args], capture_output=True, text=True, timeout=60, check=False)


@functools.cache
def render(*args: str) -> tuple[Obj, ...]:
    """`helm template kiln charts/kiln -n kiln-system ARGS`, parsed; fails the test on a helm error."""
    result = _helm("template", "kiln", str(CHART), "--namespace", NAMESPACE, *args)
    assert result.returncode == 0, result.stderr
    return tuple(doc for doc in yaml.safe_load_all(result.stdout) if doc)


def values_args(path: Path) -> tuple[str, ...]:
    return ("--values", str(path))


def of_kind(objs: tuple[Obj, ...], kind: str) -> list[Obj]:
    return [o for o in objs if o["kind"] == kind]


def one(objs: tuple[Obj, ...], kind: str, name: str | None = None) -> Obj:
    found = [o for o in of_kind(objs, kind) if name is None or o["metadata"]["name"] == name]
    assert len(found) == 1, f"expected one {kind} {name or ''}, found {[o['metadata']['name'] for o in found]}"
    return found[0]


def operator_container(objs: tuple[Obj, ...]) -> Obj:
    pod = one(objs, "Deployment", "kiln")["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    return dict(container)


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


def operator_children() -> Iterator[Obj]:
    """What the operator creates for each example TrainingJob, from its own builders."""
    from kiln_operator import config, objects, serving_objects, trainer_objects

    cfg = config.OperatorConfig()
    for path in EXAMPLES:
        job = api.load_trainingjob(path)
        owner = objects.Owner(name=job.metadata.name, namespace="ml-team-a", uid="0000")
        yield from trainer_objects.build_trainer_objects(owner, job.spec, cfg)
        yield serving_objects.build_deployment(owner, job.spec, cfg, None)
        yield serving_objects.build_service(owner)


def group_of(api_version: str) -> str:
    return api_version.rpartition("/")[0]


# --- the chart as a whole ---------------------------------------------------------------------------------


def test_the_chart_ships_exactly_the_crd_kiln_generates() -> None:
    assert (CHART / "crds" / "trainingjob.yaml").read_text() == crd.trainingjob_crd_yaml()


@needs_helm
@pytest.mark.parametrize("values", [None, *VALUES_FILES], ids=lambda p: p.name if p else "defaults")
def test_the_chart_lints_strictly(values: Path | None) -> None:
    result = _helm("lint", "--strict", str(CHART), *(values_args(values) if values else ()))
    assert result.returncode == 0, result.stdout + result.stderr
    assert "0 chart(s) failed" in result.stdout


@needs_helm
@pytest.mark.parametrize("values", VALUES_FILES, ids=lambda p: p.name)
def test_every_values_file_renders_labelled_objects_in_their_namespaces(values: Path) -> None:
    objs = render(*values_args(values))
    assert {"Deployment", "ServiceAccount", "ConfigMap", "ClusterRole", "ClusterRoleBinding"} <= {
        o["kind"] for o in objs
    }
    for obj in objs:
        meta = obj["metadata"]
        assert meta["labels"]["app.kubernetes.io/part-of"] == "kiln", obj["kind"]
        assert meta["labels"]["app.kubernetes.io/managed-by"] == "Helm"
        assert ("namespace" in meta) == (obj["kind"] not in CLUSTER_SCOPED), (obj["kind"], meta["name"])
    names = [(o["kind"], o["metadata"].get("namespace"), o["metadata"]["name"]) for o in objs]
    assert len(names) == len(set(names)), "two objects share a kind, namespace and name"


@needs_helm
def test_the_chart_refuses_clusters_older_than_1_29() -> None:
    old = _helm("template", "kiln", str(CHART), "--kube-version", "1.28.0")
    assert old.returncode != 0
    assert "kubeVersion" in old.stderr
    assert _helm("template", "kiln", str(CHART), "--kube-version", "1.29.0").returncode == 0


@needs_helm
@pytest.mark.parametrize(
    ("setting", "message"),
    [
        ("operater.logFormat=json", "additional properties 'operater' not allowed"),
        ("workloads.imagePullPolicy=Sometimes", "workloads/imagePullPolicy"),
        ("workloads.trainer.memory=lots", "workloads/trainer/memory"),
        ("artifacts.persistentVolumeClaim.accessModes[0]=ReadWriteAlways", "accessModes"),
        ("watchNamespaces[0]=Team_A", "watchNamespaces"),
        ("workloads.imagePullSecrets[0].name=Reg_Cred", "workloads/imagePullSecrets/0/name"),
        ("workloads.serving.autoscaling.minReplicas=5", "maxReplicas (4) must be at least minReplicas (5)"),
    ],
)
def test_mistyped_values_are_refused_by_the_schema(setting: str, message: str) -> None:
    result = _helm("template", "kiln", str(CHART), "--set", setting)
    assert result.returncode != 0
    assert message in result.stderr


def _schema_nodes(node: Obj, path: str = "") -> Iterator[tuple[str, Obj]]:
    yield path, node
    for key, child in node.get("properties", {}).items():
        yield from _schema_nodes(child, f"{path}.{key}" if path else key)


def test_the_values_schema_types_and_describes_every_key_and_refuses_unknown_ones() -> None:
    schema = json.loads((CHART / "values.schema.json").read_text())
    for path, node in _schema_nodes(schema):
        if path:
            assert node.get("description"), f"{path} has no description"
            assert node.get("type"), f"{path} has no type"
        if "properties" in node:
            assert node.get("additionalProperties") is False, f"{path or 'values'} accepts unknown keys"


def _value_keys(text: str) -> Iterator[tuple[str, int, str]]:
    """(dotted path, line number, previous non-blank line) for each mapping key in values.yaml."""
    stack: list[tuple[int, str]] = []
    lines = text.splitlines()
    for number, line in enumerate(lines):
        match = re.match(r"^(\s*)([A-Za-z_][\w.-]*):(\s|$)", line)
        if not match:
            continue
        indent = len(match.group(1))
        while stack and stack[-1][0] >= indent:
            stack.pop()
        stack.append((indent, match.group(2)))
        previous = next((p for p in reversed(lines[:number]) if p.strip()), "")
        yield ".".join(k for _, k in stack), number + 1, previous


def test_values_yaml_has_a_schema_modeline_and_a_comment_above_every_key_the_schema_declares() -> None:
    text = (CHART / "values.yaml").read_text()
    assert text.startswith("# yaml-language-server: $schema=values.schema.json\n")
    declared = {path for path, _ in _schema_nodes(json.loads((CHART / "values.schema.json").read_text())) if path}
    seen = set()
    for path, number, previous in _value_keys(text):
        if path in declared:
            seen.add(path)
            assert previous.lstrip().startswith("#"), f"values.yaml:{number}: no comment above {path}"
    assert seen == declared, f"in the schema but not in values.yaml: {sorted(declared - seen)}"


@needs_helm
def test_notes_give_commands_to_apply_watch_and_query_the_quick_start(tmp_path: Path) -> None:
    # helm renders NOTES.txt only on install (which needs a cluster): render it in a copy of the chart,
    # through `tpl` into a ConfigMap.
    chart = shutil.copytree(CHART, tmp_path / "kiln")
    (chart / "templates" / "NOTES.txt").rename(chart / "notes.txt")
    (chart / "templates" / "notes.yaml").write_text(
        "apiVersion: v1\nkind: ConfigMap\nmetadata: {name: notes}\ndata:\n"
        '  notes: {{ tpl (.Files.Get "notes.txt") . | quote }}\n'
    )
    result = _helm("template", "kiln", str(chart), "-n", NAMESPACE, "--show-only", "templates/notes.yaml")
    assert result.returncode == 0, result.stderr
    notes = yaml.safe_load(result.stdout)["data"]["notes"]
    assert "kubectl -n default apply -f deploy/examples/digits-cnn.yaml" in notes
    assert "kubectl -n default get tj digits-cnn --watch" in notes
    assert "kubectl -n default port-forward svc/digits-cnn-serving 8080:8080" in notes
    assert "localhost:8080/v2/models/digits-cnn/classify" in notes
    assert "http://digits-cnn-serving.default.svc:8080/v2/models/digits-cnn" in notes
    assert f"kubectl -n {NAMESPACE} rollout status deployment/kiln" in notes


# --- the operator Deployment ------------------------------------------------------------------------------


@needs_helm
def test_the_operator_runs_kiln_operator_across_all_namespaces_with_flags_its_cli_accepts() -> None:
    import argparse

    from kiln_operator import cli

    container = operator_container(render())
    assert container["image"] == "kiln-operator:0.1.0"
    args = container["args"]
    assert args[0] == "operator"
    parser = argparse.ArgumentParser()
    cli.add_arguments(parser)
    parsed = parser.parse_args(args[1:])
    assert parsed.all_namespaces and not parsed.namespaces
    assert parsed.metrics_port == constants.OPERATOR_METRICS_PORT
    assert parsed.liveness_port == constants.OPERATOR_HEALTH_PORT
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert ports == {"metrics": parsed.metrics_port, "health": parsed.liveness_port}
    for probe in ("livenessProbe", "readinessProbe"):
        assert container[probe]["httpGet"] == {"path": "/healthz", "port": "health"}


@needs_helm
def test_there_is_exactly_one_operator_and_an_upgrade_stops_the_old_one_first() -> None:
    spec = one(render(), "Deployment", "kiln")["spec"]
    assert spec["replicas"] == 1
    assert spec["strategy"] == {"type": "Recreate"}


@needs_helm
@pytest.mark.parametrize("values", VALUES_FILES, ids=lambda p: p.name)
def test_the_operator_pod_meets_the_restricted_pod_security_standard(values: Path) -> None:
    objs = render(*values_args(values))
    pod = one(objs, "Deployment", "kiln")["spec"]["template"]["spec"]
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["securityContext"]["runAsUser"] == 1000
    assert pod["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
    assert not pod.get("hostNetwork") and not pod.get("hostPID") and not pod.get("hostIPC")
    container = operator_container(objs)
    security = container["securityContext"]
    assert security["allowPrivilegeEscalation"] is False
    assert security["readOnlyRootFilesystem"] is True
    assert security["capabilities"] == {"drop": ["ALL"]}
    assert not security.get("privileged")
    # The read-only root needs a writable /tmp.
    assert {"name": "tmp", "mountPath": "/tmp"} in container["volumeMounts"]
    tmp = next(v for v in pod["volumes"] if v["name"] == "tmp")
    assert "emptyDir" in tmp
    assert container["resources"]["requests"]["cpu"] and container["resources"]["limits"]["memory"]
    assert pod["serviceAccountName"] == "kiln"


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


@needs_helm
def test_a_config_change_rolls_the_operator() -> None:
    def checksum(*args: str) -> str:
        annotations = one(render(*args), "Deployment", "kiln")["spec"]["template"]["metadata"]["annotations"]
        return str(annotations["checksum/config"])

    assert checksum() != checksum("--set", "workloads.trainer.cpu=3")


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


@needs_helm
@pytest.mark.parametrize(
    "values", [CHART / "ci" / "default-values.yaml", CHART / "ci" / "namespaced-values.yaml"], ids=lambda p: p.name
)
def test_the_operator_may_create_and_converge_everything_it_builds_for_a_trainingjob(values: Path) -> None:
    objs = render(*values_args(values))
    rules = rules_in(objs, "ml-team-a")
    for child in operator_children():
        group, resource = group_of(child["apiVersion"]), child["kind"].lower() + "s"
        for verb in ("get", "list", "watch", "create", "patch", "delete"):  # server-side apply is create+patch
            assert allowed(rules, group, resource, verb), f"cannot {verb} {resource}.{group}"
        # An operator can only grant a trainer what it holds itself (no escalate/bind).
        if child["kind"] == "Role":
            for rule in child["rules"]:
                for g in rule["apiGroups"]:
                    for r in rule["resources"]:
                        for verb in rule["verbs"]:
                            assert allowed(rules, g, r, verb, child["metadata"]["name"]), (g, r, verb)
    for resource, verbs in {
        "trainingjobs": ("get", "list", "watch", "patch"),
        "trainingjobs/status": ("get", "patch"),
        "trainingjobs/finalizers": ("update",),
    }.items():
        for verb in verbs:
            assert allowed(rules, constants.GROUP, resource, verb), (resource, verb)
    for verb in ("get", "list", "watch"):
        assert allowed(rules, "", "pods", verb)
    assert allowed(rules, "", "pods/log", "get")
    for group in ("", "events.k8s.io"):
        assert allowed(rules, group, "events", "create") and allowed(rules, group, "events", "patch")
    cluster_rules = rules_in(objs, None)
    assert allowed(cluster_rules, "apiextensions.k8s.io", "customresourcedefinitions", "watch")


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
        {
            "apiGroups": ["apiextensions.k8s.io"],
            "resources": ["customresourcedefinitions"],
            "verbs": ["get", "list", "watch"],
        }
    ]
    for group, resource in [(constants.GROUP, "trainingjobs"), ("batch", "jobs"), ("", "pods")]:
        assert not allowed(rules_in(objs, "kube-system"), group, resource, "get")
    assert allowed(rules_in(objs, "ml-team-b"), "batch", "jobs", "create")


@needs_helm
def test_watching_all_namespaces_lets_kopf_list_namespaces() -> None:
    assert allowed(rules_in(render(), None), "", "namespaces", "watch")


@needs_helm
def test_the_operator_may_manage_autoscalers_only_when_serving_autoscaling_is_on() -> None:
    assert not allowed(rules_in(render(), "default"), "autoscaling", "horizontalpodautoscalers", "create")
    on = render("--set", "workloads.serving.autoscaling.enabled=true")
    assert allowed(rules_in(on, "default"), "autoscaling", "horizontalpodautoscalers", "create")


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
        for verb in ("get", "list", "watch", "create", "patch", "delete"):
            assert allowed(rules, group_of(hpa["apiVersion"]), hpa["kind"].lower() + "s", verb) is enabled, verb


@needs_helm
def test_rbac_can_be_left_to_the_cluster_admin() -> None:
    objs = render("--set", "rbac.create=false")
    assert not {"ClusterRole", "ClusterRoleBinding", "Role", "RoleBinding"} & {o["kind"] for o in objs}


# --- artifacts and serving network policy -----------------------------------------------------------------


@needs_helm
def test_the_artifacts_claim_is_created_where_jobs_run_and_survives_uninstall() -> None:
    pvc = one(render(), "PersistentVolumeClaim", "kiln-artifacts")
    assert pvc["metadata"]["namespace"] == "default"
    assert pvc["metadata"]["annotations"]["helm.sh/resource-policy"] == "keep"
    assert pvc["spec"]["accessModes"] == ["ReadWriteMany"]
    assert pvc["spec"]["resources"]["requests"]["storage"] == "20Gi"
    assert "storageClassName" not in pvc["spec"]  # the cluster's default class

    namespaced = of_kind(render(*values_args(CHART / "ci" / "namespaced-values.yaml")), "PersistentVolumeClaim")
    assert sorted(p["metadata"]["namespace"] for p in namespaced) == ["ml-team-a", "ml-team-b"]
    assert {p["spec"]["storageClassName"] for p in namespaced} == {"nfs-client"}

    kind_pvc = one(render(*values_args(ROOT / "deploy" / "kind" / "values.yaml")), "PersistentVolumeClaim")
    assert kind_pvc["spec"]["accessModes"] == ["ReadWriteOnce"]
    assert "annotations" not in kind_pvc["metadata"]


@needs_helm
def test_the_artifacts_claim_can_be_brought_by_the_user_or_bound_statically() -> None:
    assert not of_kind(render("--set", "artifacts.persistentVolumeClaim.create=false"), "PersistentVolumeClaim")
    static = one(render("--set", "artifacts.persistentVolumeClaim.storageClass=-"), "PersistentVolumeClaim")
    assert static["spec"]["storageClassName"] == ""


def _matches(selector: Obj, labels: dict[str, str]) -> bool:
    if any(labels.get(k) != v for k, v in selector.get("matchLabels", {}).items()):
        return False
    return all(
        (labels.get(e["key"]) in e["values"]) == (e["operator"] == "In") for e in selector.get("matchExpressions", [])
    )


def _pods_by_component() -> dict[str, Obj]:
    """A trainer and a serving pod template as the operator builds them."""
    pods = {}
    for child in operator_children():
        if child["kind"] in ("Job", "Deployment"):
            template = child["spec"]["template"]
            pods[template["metadata"]["labels"][constants.LABEL_COMPONENT]] = template
    return pods


@needs_helm
def test_the_serving_network_policy_admits_only_http_to_the_serving_pods_from_the_listed_peers() -> None:
    assert not of_kind(render(), "NetworkPolicy")
    policies = of_kind(render(*values_args(CHART / "ci" / "namespaced-values.yaml")), "NetworkPolicy")
    assert sorted(p["metadata"]["namespace"] for p in policies) == ["ml-team-a", "ml-team-b"]
    pods = _pods_by_component()
    for policy in policies:
        spec = policy["spec"]
        assert _matches(spec["podSelector"], pods["serving"]["metadata"]["labels"])
        assert not _matches(spec["podSelector"], pods["trainer"]["metadata"]["labels"])
        assert spec["policyTypes"] == ["Ingress"]
        (rule,) = spec["ingress"]
        (serving_container,) = pods["serving"]["spec"]["containers"]
        port_names = {p["name"] for p in serving_container["ports"]}
        assert [p["port"] for p in rule["ports"]] == ["http"] and "http" in port_names
        assert {"podSelector": {}} in rule["from"]


# --- monitoring -------------------------------------------------------------------------------------------


MONITORING_KINDS = {"ServiceMonitor", "PodMonitor", "PrometheusRule"}
MONITORING_ON = (
    "--set",
    "metrics.serviceMonitor.enabled=true",
    "--set",
    "metrics.podMonitor.enabled=true",
    "--set",
    "metrics.prometheusRule.enabled=true",
)


def _kinds(objs: tuple[Obj, ...]) -> set[str]:
    return {o["kind"] for o in objs}


@needs_helm
def test_prometheus_operator_objects_render_only_when_enabled_and_the_api_exists_or_is_forced() -> None:
    assert not _kinds(render("--api-versions", MONITORING_API)) & MONITORING_KINDS
    assert not _kinds(render(*MONITORING_ON)) & MONITORING_KINDS  # enabled, but no such API
    assert _kinds(render(*MONITORING_ON, "--api-versions", MONITORING_API)) >= MONITORING_KINDS
    assert _kinds(render(*values_args(CHART / "ci" / "monitoring-values.yaml"))) >= MONITORING_KINDS  # force


@needs_helm
def test_the_service_monitor_scrapes_the_operator_metrics_port() -> None:
    objs = render(*values_args(CHART / "ci" / "monitoring-values.yaml"))
    monitor = one(objs, "ServiceMonitor")
    assert monitor["metadata"]["labels"]["release"] == "kube-prometheus-stack"
    service = one(objs, "Service", "kiln-metrics")
    assert _matches(monitor["spec"]["selector"], service["metadata"]["labels"])
    (endpoint,) = monitor["spec"]["endpoints"]
    assert endpoint["port"] == "metrics" and endpoint["path"] == "/metrics"
    assert {
        "name": "metrics",
        "port": constants.OPERATOR_METRICS_PORT,
        "targetPort": "metrics",
        "protocol": "TCP",
    } in service["spec"]["ports"]
    pod = one(objs, "Deployment", "kiln")["spec"]["template"]
    assert _matches({"matchLabels": service["spec"]["selector"]}, pod["metadata"]["labels"])
    assert pod["metadata"]["annotations"]["prometheus.io/port"] == str(constants.OPERATOR_METRICS_PORT)


@needs_helm
def test_the_pod_monitor_scrapes_trainer_and_serving_pods_on_the_ports_the_operator_gives_them() -> None:
    monitor = one(render(*values_args(CHART / "ci" / "monitoring-values.yaml")), "PodMonitor")
    assert monitor["spec"]["namespaceSelector"] == {"any": True}
    endpoints = {e["port"] for e in monitor["spec"]["podMetricsEndpoints"]}
    for component, template in _pods_by_component().items():
        assert _matches(monitor["spec"]["selector"], template["metadata"]["labels"]), component
        (container,) = template["spec"]["containers"]
        assert endpoints & {p["name"] for p in container["ports"]}, component
    namespaced = render(
        *values_args(CHART / "ci" / "namespaced-values.yaml"),
        "--set",
        "metrics.podMonitor.enabled=true",
        "--api-versions",
        MONITORING_API,
    )
    assert one(namespaced, "PodMonitor")["spec"]["namespaceSelector"] == {"matchNames": ["ml-team-a", "ml-team-b"]}


def _exported_metric_names() -> set[str]:
    """Every series name the operator, trainer and server export, from their own registries."""
    import prometheus_client

    from kiln_operator import metrics as operator_metrics  # noqa: F401  (registers on the default registry)
    from kiln_serving import metrics as serving_metrics
    from kiln_trainer import metrics as trainer_metrics

    names: set[str] = set()
    registries = [prometheus_client.REGISTRY, trainer_metrics.REGISTRY, serving_metrics.ServingMetrics().registry]
    for registry in registries:
        for family in registry.collect():
            suffixes = {"counter": ["_total"], "histogram": ["_bucket", "_sum", "_count"]}.get(family.type, [""])
            names |= {family.name + s for s in suffixes if family.name.startswith("kiln_")}
    return names


def _queries(objs: tuple[Obj, ...]) -> Iterator[tuple[str, str]]:
    """(where, PromQL) of every alert and dashboard panel, dashboard variables given concrete values."""
    for group in one(objs, "PrometheusRule")["spec"]["groups"]:
        for rule in group["rules"]:
            yield rule["alert"], rule["expr"]
    dashboard = json.loads(one(objs, "ConfigMap", "kiln-dashboard")["data"]["kiln.json"])
    for panel in dashboard["panels"]:
        for target in panel.get("targets", []):
            expr = target["expr"].replace("$__rate_interval", "5m")
            yield panel["title"], re.sub(r"\$\w+", ".*", expr)


@needs_helm
def test_alerts_and_dashboard_query_metrics_kiln_exports() -> None:
    objs = render(*values_args(CHART / "ci" / "monitoring-values.yaml"))
    exported = _exported_metric_names()
    alerts = {r["alert"] for g in one(objs, "PrometheusRule")["spec"]["groups"] for r in g["rules"]}
    assert alerts == {"KilnTrainingJobFailed", "KilnServingErrorRateHigh", "KilnServingLatencyHigh"}
    for where, expr in _queries(objs):
        used = set(re.findall(r"\bkiln_[a-z0-9_]+", expr))
        assert used, f"{where}: queries no kiln metric"
        assert used <= exported, f"{where}: {sorted(used - exported)} are not exported by kiln"


@needs_helm
def test_alerts_and_dashboard_queries_are_valid_promql(tmp_path: Path) -> None:
    promtool = shutil.which("promtool")
    if promtool is None:
        pytest.skip("promtool not found (Debian package prometheus, installed by .ci/run)")
    objs = render(*values_args(CHART / "ci" / "monitoring-values.yaml"))
    rules = [{"record": f"kiln:check_{i}", "expr": expr} for i, (_, expr) in enumerate(_queries(objs))]
    alerts = one(objs, "PrometheusRule")["spec"]
    (tmp_path / "rules.yaml").write_text(
        yaml.safe_dump({"groups": [*alerts["groups"], {"name": "dashboard", "rules": rules}]})
    )
    result = subprocess.run(
        [promtool, "check", "rules", str(tmp_path / "rules.yaml")],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr


@needs_helm
def test_the_prometheus_rule_thresholds_and_labels_come_from_values() -> None:
    objs = render(
        *values_args(CHART / "ci" / "monitoring-values.yaml"),
        "--set-json",
        "metrics.prometheusRule.servingLatencyP99Seconds=0.25",
    )
    rules = {r["alert"]: r for g in one(objs, "PrometheusRule")["spec"]["groups"] for r in g["rules"]}
    assert rules["KilnServingLatencyHigh"]["expr"].rstrip().endswith("> 0.25")
    assert rules["KilnServingErrorRateHigh"]["expr"].rstrip().endswith("> 0.05")
    assert 'kiln_operator_trainingjobs{phase="Failed"}' in rules["KilnTrainingJobFailed"]["expr"]
    assert all(r["labels"]["team"] == "ml" for r in rules.values())


@needs_helm
def test_the_grafana_dashboard_ships_behind_a_flag_with_the_sidecar_label() -> None:
    assert not [c for c in of_kind(render(), "ConfigMap") if c["metadata"]["name"] == "kiln-dashboard"]
    objs = render(
        *values_args(CHART / "ci" / "monitoring-values.yaml"), "--set", "metrics.grafanaDashboard.namespace=monitoring"
    )
    dashboard = one(objs, "ConfigMap", "kiln-dashboard")
    assert dashboard["metadata"]["labels"]["grafana_dashboard"] == "1"
    assert dashboard["metadata"]["namespace"] == "monitoring"
    content = json.loads(dashboard["data"]["kiln.json"])
    titles = {p["title"] for p in content["panels"]}
    assert {"Validation accuracy", "Requests per second", "Latency", "Mean batch size", "Errors"} <= titles
    assert content["uid"] == "kiln-overview"


@needs_helm
def test_plain_prometheus_finds_the_operator_by_its_annotations_unless_turned_off() -> None:
    def annotations(*args: str) -> dict[str, str]:
        return dict(one(render(*args), "Deployment", "kiln")["spec"]["template"]["metadata"]["annotations"])

    assert annotations()["prometheus.io/scrape"] == "true"
    assert "prometheus.io/scrape" not in annotations("--set", "metrics.prometheusAnnotations=false")
    assert not of_kind(render("--set", "metrics.enabled=false"), "Service")
