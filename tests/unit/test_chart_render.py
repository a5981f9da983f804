"""The Helm chart as a whole, the operator Deployment it renders, the artifacts claim and the serving
network policy: lint, schema, every values file, pod security and the toggles."""

import json
import re
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml
from chart_support import (
    CHART,
    NAMESPACE,
    ROOT,
    VALUES_FILES,
    Obj,
    helm,
    matches,
    needs_helm,
    of_kind,
    one,
    operator_container,
    pods_by_component,
    render,
    values_args,
)

from kiln.api import constants, crd

CLUSTER_SCOPED = {"ClusterRole", "ClusterRoleBinding", "CustomResourceDefinition"}


# --- the chart as a whole ---------------------------------------------------------------------------------


def test_the_chart_ships_exactly_the_crd_kiln_generates() -> None:
    assert (CHART / "crds" / "trainingjob.yaml").read_text() == crd.trainingjob_crd_yaml()


@needs_helm
@pytest.mark.parametrize("values", [None, *VALUES_FILES], ids=lambda p: p.name if p else "defaults")
def test_the_chart_lints_strictly(values: Path | None) -> None:
    result = helm("lint", "--strict", str(CHART), *(values_args(values) if values else ()))
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
    old = helm("template", "kiln", str(CHART), "--kube-version", "1.28.0")
    assert old.returncode != 0
    assert "kubeVersion" in old.stderr
    assert helm("template", "kiln", str(CHART), "--kube-version", "1.29.0").returncode == 0


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
    result = helm("template", "kiln", str(CHART), "--set", setting)
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
    result = helm("template", "kiln", str(chart), "-n", NAMESPACE, "--show-only", "templates/notes.yaml")
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

    from kiln_operator import operator_command

    container = operator_container(render())
    assert container["image"] == "kiln-operator:0.1.0"
    args = container["args"]
    assert args[0] == "operator"
    parser = argparse.ArgumentParser()
    operator_command.add_arguments(parser)
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
def test_a_config_change_rolls_the_operator() -> None:
    def checksum(*args: str) -> str:
        annotations = one(render(*args), "Deployment", "kiln")["spec"]["template"]["metadata"]["annotations"]
        return str(annotations["checksum/config"])

    assert checksum() != checksum("--set", "workloads.trainer.cpu=3")


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


@needs_helm
def test_the_serving_network_policy_admits_only_http_and_grpc_to_the_serving_pods_from_the_listed_peers() -> None:
    assert not of_kind(render(), "NetworkPolicy")
    policies = of_kind(render(*values_args(CHART / "ci" / "namespaced-values.yaml")), "NetworkPolicy")
    assert sorted(p["metadata"]["namespace"] for p in policies) == ["ml-team-a", "ml-team-b"]
    pods = pods_by_component()
    for policy in policies:
        spec = policy["spec"]
        assert matches(spec["podSelector"], pods["serving"]["metadata"]["labels"])
        assert not matches(spec["podSelector"], pods["trainer"]["metadata"]["labels"])
        assert spec["policyTypes"] == ["Ingress"]
        (rule,) = spec["ingress"]
        (serving_container,) = pods["serving"]["spec"]["containers"]
        port_names = {p["name"] for p in serving_container["ports"]}
        assert [p["port"] for p in rule["ports"]] == ["http", "grpc"] and {"http", "grpc"} <= port_names
        assert {"podSelector": {}} in rule["from"]
