"""Two operators writing one TrainingJob's status against the real API server: around a rollout or a leader change
the old operator and the new one can read the same status and decide the same transition; only the write made at
the version read lands and is announced, the other gets 409 and, retried from a fresh read, has nothing to say."""

import logging
from typing import Any

import pytest
import trainingjobs as tj

from kiln_cluster.controlplane import ControlPlane
from kiln_operator import kube, metrics, reconciler, status


def test_two_operators_that_read_the_same_status_write_and_announce_a_transition_once(
    control_plane: ControlPlane,
    trainingjob_crd: dict[str, Any],
    namespace: str,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    control_plane.kube.create_object(tj.digits_job("raced", runPolicy={"suspend": True}), namespace)
    monkeypatch.setenv("KUBECONFIG", str(control_plane.kubeconfig_path))
    operator = kube.Kube(kube.load_configuration())

    def decide(body: dict[str, Any]) -> dict[str, Any]:
        """What either operator writes for this observation: here, a spec refused by policy (Failed)."""
        current = body.get("status") or {}
        return status.assess_invalid(current, body["metadata"]["generation"], "refused", status.now_rfc3339())

    try:
        old, new = operator.get_trainingjob(namespace, "raced"), operator.get_trainingjob(namespace, "raced")
        assert old is not None and new is not None
        caplog.set_level(logging.INFO, logger=reconciler.__name__)
        assert reconciler.write_status(operator, old, decide(old)) == "Failed"
        with pytest.raises(Exception) as lost:
            reconciler.write_status(operator, new, decide(new))
        assert kube.is_conflict(lost.value) and kube.is_transient(lost.value)  # reconcile retries from a fresh read
        fresh = operator.get_trainingjob(namespace, "raced")
        assert fresh is not None and fresh["status"]["phase"] == "Failed"
        assert reconciler.write_status(operator, fresh, decide(fresh)) == "Failed"
        announced = [r.getMessage() for r in caplog.records if r.getMessage().startswith("Failed: ")]
        assert announced == ["Failed: New -> Failed: refused"], announced
    finally:  # this process's operator metrics: the job is gone with the namespace
        metrics.forget_job(namespace, "raced")
