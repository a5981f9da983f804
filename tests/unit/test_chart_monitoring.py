"""Monitoring objects the chart renders: Prometheus Operator monitors and rules, the Grafana dashboard and
plain Prometheus annotations, checked against the metrics kiln really exports."""

import json
import re
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml
from chart_support import (
    CHART,
    Obj,
    matches,
    needs_helm,
    of_kind,
    one,
    pods_by_component,
    render,
    values_args,
)

from kiln.api import constants

# --- monitoring -------------------------------------------------------------------------------------------


MONITORING_API = "monitoring.coreos.com/v1"
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
    assert matches(monitor["spec"]["selector"], service["metadata"]["labels"])
    (endpoint,) = monitor["spec"]["endpoints"]
    assert endpoint["port"] == "metrics" and endpoint["path"] == "/metrics"
    assert {
        "name": "metrics",
        "port": constants.OPERATOR_METRICS_PORT,
        "targetPort": "metrics",
        "protocol": "TCP",
    } in service["spec"]["ports"]
    pod = one(objs, "Deployment", "kiln")["spec"]["template"]
    assert matches({"matchLabels": service["spec"]["selector"]}, pod["metadata"]["labels"])
    assert pod["metadata"]["annotations"]["prometheus.io/port"] == str(constants.OPERATOR_METRICS_PORT)


@needs_helm
def test_the_pod_monitor_scrapes_trainer_and_serving_pods_on_the_ports_the_operator_gives_them() -> None:
    monitor = one(render(*values_args(CHART / "ci" / "monitoring-values.yaml")), "PodMonitor")
    assert monitor["spec"]["namespaceSelector"] == {"any": True}
    endpoints = {e["port"] for e in monitor["spec"]["podMetricsEndpoints"]}
    for component, template in pods_by_component().items():
        assert matches(monitor["spec"]["selector"], template["metadata"]["labels"]), component
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
    assert alerts == {
        "KilnTrainingJobFailed",
        "KilnServingNotReady",
        "KilnServingErrorRateHigh",
        "KilnServingLatencyHigh",
    }
    for where, expr in _queries(objs):
        used = set(re.findall(r"\bkiln_[a-z0-9_]+", expr))
        assert used, f"{where}: queries no kiln metric"
        assert used <= exported, f"{where}: {sorted(used - exported)} are not exported by kiln"


@needs_helm
def test_alerts_and_dashboard_queries_are_valid_promql(tmp_path: Path) -> None:
    promtool = shutil.which("promtool")
    if promtool is None:
        pytest.skip("promtool not found (Debian package prometheus, installed by hack/install-node-tools.sh)")
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
    assert 'kiln_operator_trainingjob_condition{type="Failed"} == 1' in rules["KilnTrainingJobFailed"]["expr"]
    assert 'acknowledged="true"' in rules["KilnTrainingJobFailed"]["expr"]
    assert 'phase="Serving"' in rules["KilnServingNotReady"]["expr"]
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
