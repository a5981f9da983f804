"""`kiln operator` as a user meets it: help, clear failures before kopf starts, and the operator's metrics."""

import os
import socket
import subprocess
import sys
from pathlib import Path

import kopf
import pytest
from prometheus_client import REGISTRY

from kiln_cluster.controlplane import free_port
from kiln_operator import metrics


def kiln_operator(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    full_env = {**os.environ, **(env or {})}
    return subprocess.run([sys.executable, "-m", "kiln.cli", "operator", *args], capture_output=True, text=True,
                          env=full_env, timeout=60)  # fmt: skip


def test_help_lists_the_scope_ports_and_peering_flags() -> None:
    result = kiln_operator("--help")
    assert result.returncode == 0
    for flag in ("--namespace", "--all-namespaces", "--standalone", "--peering", "--liveness-port", "--metrics-port"):
        assert flag in result.stdout


def test_a_malformed_kubeconfig_fails_with_one_clear_message(tmp_path: Path) -> None:
    kubeconfig = tmp_path / "config"
    kubeconfig.write_text("apiVersion: v1\nclusters: [\n")
    result = kiln_operator(env={"KUBECONFIG": str(kubeconfig)})
    assert result.returncode == 1
    assert result.stderr.startswith(f"kiln operator: cannot load Kubernetes credentials from '{kubeconfig}'")
    assert "Traceback" not in result.stderr


def test_a_missing_kubeconfig_fails_with_one_clear_message(tmp_path: Path) -> None:
    result = kiln_operator(env={"KUBECONFIG": str(tmp_path / "absent")})
    assert result.returncode == 1
    assert "cannot load Kubernetes credentials" in result.stderr and "Traceback" not in result.stderr


def test_an_unreachable_api_server_fails_with_its_address(tmp_path: Path) -> None:
    port = free_port()
    kubeconfig = tmp_path / "config"
    kubeconfig.write_text(
        "apiVersion: v1\nkind: Config\ncurrent-context: c\n"
        f"clusters: [{{name: k, cluster: {{server: 'https://127.0.0.1:{port}'}}}}]\n"
        "users: [{name: u, user: {token: t}}]\ncontexts: [{name: c, context: {cluster: k, user: u}}]\n"
    )
    result = kiln_operator(env={"KUBECONFIG": str(kubeconfig)})
    assert result.returncode == 1
    assert f"kiln operator: cannot reach the API server at https://127.0.0.1:{port}" in result.stderr
    assert "Traceback" not in result.stderr


def test_a_metrics_port_in_use_fails_before_kopf_starts() -> None:
    with socket.socket() as busy:
        busy.bind(("0.0.0.0", 0))
        busy.listen()
        port = busy.getsockname()[1]
        result = kiln_operator("--metrics-port", str(port), "--liveness-port", "0")
    assert result.returncode == 1
    assert result.stderr.startswith(f"kiln operator: cannot serve on 0.0.0.0:{port}")


def test_a_bad_operator_setting_fails_before_connecting() -> None:
    result = kiln_operator(env={"KILN_IMAGE_PULL_POLICY": "Sometimes"})
    assert result.returncode == 2
    assert result.stderr.startswith("kiln operator: KILN_IMAGE_PULL_POLICY='Sometimes' must be one of")


def test_handler_metrics_time_every_call_and_count_failures_but_not_planned_retries() -> None:
    @metrics.instrumented("test_handler")
    def handler(outcome: str) -> str:
        if outcome == "retry":
            raise kopf.TemporaryError("not yet", delay=1)
        if outcome == "boom":
            raise RuntimeError("boom")
        return outcome

    def sample(name: str) -> float:
        return REGISTRY.get_sample_value(name, {"handler": "test_handler"}) or 0.0

    calls, errors = sample("kiln_operator_handler_duration_seconds_count"), sample("kiln_operator_handler_errors_total")
    assert handler("ok") == "ok"
    with pytest.raises(kopf.TemporaryError):
        handler("retry")
    with pytest.raises(RuntimeError):
        handler("boom")
    assert sample("kiln_operator_handler_duration_seconds_count") == calls + 3
    assert sample("kiln_operator_handler_errors_total") == errors + 1


def test_the_phase_gauge_counts_each_job_once_in_its_current_phase() -> None:
    def gauge(phase: str) -> float:
        return REGISTRY.get_sample_value("kiln_operator_trainingjobs", {"phase": phase}) or 0.0

    metrics.record_phase("team-a", "one", "Running")
    metrics.record_phase("team-a", "two", "Running")
    metrics.record_phase("team-a", "one", "Serving")
    assert (gauge("Running"), gauge("Serving"), gauge("Failed")) == (1, 1, 0)
    metrics.record_phase("team-a", "two", None)
    metrics.record_phase("team-a", "one", None)
    assert (gauge("Running"), gauge("Serving")) == (0, 0)
    before = REGISTRY.get_sample_value("kiln_operator_phase_transitions_total", {"from": "Running", "to": "Failed"})
    metrics.record_transition("Running", "Failed")
    after = REGISTRY.get_sample_value("kiln_operator_phase_transitions_total", {"from": "Running", "to": "Failed"})
    assert after == (before or 0) + 1


def test_per_job_gauges_follow_conditions_and_acknowledgement_and_vanish_with_the_job() -> None:
    def value(name: str, labels: dict[str, str]) -> float | None:
        return REGISTRY.get_sample_value(name, {"namespace": "team-b", "trainingjob": "digits", **labels})

    failed = {"Succeeded": False, "Ready": False, "Failed": True}
    metrics.record_conditions("team-b", "digits", "Failed", failed, acknowledged=False)
    assert value("kiln_operator_trainingjob_condition", {"type": "Failed"}) == 1
    assert value("kiln_operator_trainingjob_condition", {"type": "Ready"}) == 0
    assert value("kiln_operator_trainingjob_info", {"phase": "Failed", "acknowledged": "false"}) == 1
    metrics.record_conditions("team-b", "digits", "Failed", failed, acknowledged=True)
    assert value("kiln_operator_trainingjob_info", {"phase": "Failed", "acknowledged": "false"}) is None
    assert value("kiln_operator_trainingjob_info", {"phase": "Failed", "acknowledged": "true"}) == 1
    metrics.forget_job("team-b", "digits")
    assert value("kiln_operator_trainingjob_condition", {"type": "Failed"}) is None
    assert value("kiln_operator_trainingjob_info", {"phase": "Failed", "acknowledged": "true"}) is None
