"""Placement, pod metadata and queueing reach the trainer Job and the serving Deployment as written."""

from typing import Any

import pydantic
import pytest

from kiln import api
from kiln.api import constants
from kiln_operator import config, objects, serving_objects, status, trainer_objects

OWNER = objects.Owner(name="digits", namespace="team-a", uid="0b6e3c1d-5d0f-4a8e-9c1e-2f4b7a9d1e00")
CFG = config.OperatorConfig()
NOW = "2026-01-01T00:00:00Z"
AFFINITY = {
    "nodeAffinity": {
        "requiredDuringSchedulingIgnoredDuringExecution": {
            "nodeSelectorTerms": [{"matchExpressions": [{"key": "gpu", "operator": "In", "values": ["a100"]}]}]
        }
    }
}
SPREAD = {"maxSkew": 1, "topologyKey": "topology.kubernetes.io/zone", "whenUnsatisfiable": "ScheduleAnyway"}
TOLERATION = {"key": "dedicated", "operator": "Equal", "value": "ml", "effect": "NoSchedule"}
PLACEMENT = {
    "nodeSelector": {"pool": "ml"},
    "tolerations": [TOLERATION],
    "affinity": AFFINITY,
    "topologySpreadConstraints": [SPREAD],
    "priorityClassName": "high",
    "podLabels": {"team": "vision", "app.kubernetes.io/component": "mine"},
    "podAnnotations": {"example.com/owner": "ada", "prometheus.io/port": "1"},
}


def spec(**sections: Any) -> api.TrainingJobSpec:
    return api.TrainingJobSpec.model_validate(sections)


def trainer_template(job: dict[str, Any]) -> dict[str, Any]:
    return dict(job["spec"]["template"])


def serving_template(**serving: Any) -> dict[str, Any]:
    deployment = serving_objects.build_deployment(OWNER, spec(serving=serving), CFG, None)
    return dict(deployment["spec"]["template"])


def placed_template(component: str) -> dict[str, Any]:
    """The pod template of `component` built from a spec that sets every placement field."""
    if component == "trainer":
        return trainer_template(trainer_objects.build_job(OWNER, spec(resources=PLACEMENT), CFG))
    return serving_template(**PLACEMENT)


@pytest.mark.parametrize("component", ["trainer", "serving"])
def test_placement_reaches_the_pods_of_trainer_and_server_alike(component: str) -> None:
    template = placed_template(component)
    pod = template["spec"]
    assert pod["nodeSelector"] == {"pool": "ml"}
    assert pod["tolerations"] == [TOLERATION]
    assert pod["affinity"] == AFFINITY
    assert pod["priorityClassName"] == "high"
    # A spread constraint without a selector spreads this component's own pods of this job.
    [constraint] = pod["topologySpreadConstraints"]
    assert constraint == {**SPREAD, "labelSelector": {"matchLabels": objects.selector("digits", component)}}


@pytest.mark.parametrize("component", ["trainer", "serving"])
def test_extra_pod_labels_and_annotations_never_override_the_operators_own(component: str) -> None:
    template = placed_template(component)
    labels, annotations = template["metadata"]["labels"], template["metadata"]["annotations"]
    assert labels["team"] == "vision"
    assert labels["app.kubernetes.io/component"] == component  # the selector label stays the operator's
    assert annotations["example.com/owner"] == "ada"
    assert annotations["prometheus.io/port"] != "1"


def test_a_spread_constraint_with_its_own_selector_is_kept_as_written() -> None:
    own = {**SPREAD, "labelSelector": {"matchLabels": {"team": "vision"}}}
    pod = trainer_template(trainer_objects.build_job(OWNER, spec(resources={"topologySpreadConstraints": [own]}), CFG))
    assert pod["spec"]["topologySpreadConstraints"] == [own]


def test_trainer_env_is_appended_after_the_operators_and_may_read_secrets() -> None:
    secret = {"secretKeyRef": {"name": "wandb", "key": "token"}}
    env = [{"name": "NCCL_DEBUG", "value": "INFO"}, {"name": "WANDB_API_KEY", "valueFrom": secret}]
    job = trainer_objects.build_job(OWNER, spec(resources={"env": env}), CFG)
    container = job["spec"]["template"]["spec"]["containers"][0]
    assert container["env"][-2:] == env
    assert [e["name"] for e in container["env"]].count("RANK") == 1


@pytest.mark.parametrize(
    ("resources", "message"),
    [
        ({"env": [{"name": "RANK", "value": "3"}]}, "RANK is set by the operator"),
        ({"env": [{"name": "A", "value": "1"}, {"name": "A", "value": "2"}]}, "A listed more than once"),
        ({"env": [{"name": "A", "value": "1", "valueFrom": {"fieldRef": {}}}]}, "both value and valueFrom"),
        ({"env": [{"name": "1=A"}]}, "not a valid variable name"),
        ({"podLabels": {"team": "has space"}}, "not a valid label value"),
        ({"podLabels": {"Bad_Prefix!/x": "y"}}, "invalid prefix"),
        ({"podAnnotations": {"-x": "y"}}, "podAnnotations: key '-x'"),
        ({"affinity": {"nodeAffinty": {}}}, "unknown key(s) nodeAffinty"),
        ({"topologySpreadConstraints": [{"maxSkew": 1}]}, "missing topologyKey, whenUnsatisfiable"),
    ],
)
def test_bad_placement_is_refused_with_the_fields_name(resources: dict[str, Any], message: str) -> None:
    with pytest.raises(pydantic.ValidationError, match=message.replace("(", r"\(").replace(")", r"\)")):
        spec(resources=resources)


def test_serving_with_more_than_one_replica_gets_a_disruption_budget_for_its_pods() -> None:
    assert not serving_objects.needs_disruption_budget(spec(serving={"replicas": 1}), CFG)
    assert serving_objects.needs_disruption_budget(spec(serving={"replicas": 3}), CFG)
    budget = serving_objects.build_disruption_budget(OWNER)
    assert budget["apiVersion"] == "policy/v1" and budget["kind"] == "PodDisruptionBudget"
    assert budget["metadata"]["name"] == objects.serving_name("digits")
    assert budget["spec"] == {"maxUnavailable": 1, "selector": {"matchLabels": objects.selector("digits", "serving")}}


def test_an_autoscaled_server_whose_minimum_is_above_one_gets_a_budget() -> None:
    autoscaling = config.OperatorConfig(serving_hpa_enabled=True, serving_hpa_min_replicas=2, serving_cpu="1")
    assert serving_objects.needs_disruption_budget(spec(serving={"replicas": 1}), autoscaling)
    assert not serving_objects.needs_disruption_budget(spec(serving={"replicas": 0}), autoscaling)


def queued_job(trainingjob_labels: dict[str, str], **run_policy: Any) -> dict[str, Any]:
    return trainer_objects.build_job(OWNER, spec(runPolicy=run_policy), CFG, trainingjob_labels)


def test_a_trainingjob_in_a_kueue_queue_gets_a_suspended_job_with_its_queue_labels() -> None:
    labels = {constants.KUEUE_QUEUE_LABEL: "team-a", constants.KUEUE_PRIORITY_LABEL: "low", "other": "x"}
    job = queued_job(labels)
    assert job["spec"]["suspend"] is True
    assert job["metadata"]["labels"][constants.KUEUE_QUEUE_LABEL] == "team-a"
    assert job["metadata"]["labels"][constants.KUEUE_PRIORITY_LABEL] == "low"
    assert "other" not in job["metadata"]["labels"]
    assert objects.is_queued(job) and not objects.suspended_by_user(job)


def test_without_a_queue_the_job_starts_at_once_and_run_policy_suspend_is_marked_as_the_users() -> None:
    running = queued_job({})
    assert running["spec"]["suspend"] is False and not objects.is_queued(running)
    held = queued_job({}, suspend=True)
    assert held["spec"]["suspend"] is True and objects.suspended_by_user(held)


def observe(job: dict[str, Any]) -> status.Observation:
    return status.Observation(
        name="digits", namespace="team-a", generation=1, status={}, serving_enabled=False, serving_replicas=1, job=job
    )


def suspended_condition(desired: dict[str, Any]) -> dict[str, Any]:
    found: dict[str, Any] = next(c for c in desired["conditions"] if c["type"] == "Suspended")
    return found


def test_a_job_waiting_in_a_queue_is_pending_and_queued_not_suspended_by_the_user() -> None:
    desired = status.assess(observe(queued_job({constants.KUEUE_QUEUE_LABEL: "team-a"})), NOW)
    assert desired["phase"] == "Pending"
    condition = suspended_condition(desired)
    assert (condition["status"], condition["reason"]) == ("True", "Queued")
    assert "LocalQueue team-a" in condition["message"]


def test_a_job_another_controller_suspended_is_pending_admission_and_a_held_one_is_the_users() -> None:
    other = queued_job({})
    other["spec"]["suspend"] = True
    desired = status.assess(observe(other), NOW)
    assert (desired["phase"], suspended_condition(desired)["reason"]) == ("Pending", "AdmissionPending")
    held = status.assess(observe(queued_job({}, suspend=True)), NOW)
    assert (held["phase"], suspended_condition(held)["reason"]) == ("Suspended", "SuspendedByUser")


def test_several_processes_per_worker_make_the_world_pods_times_processes_and_leave_ranks_to_the_launcher() -> None:
    job = trainer_objects.build_job(OWNER, spec(resources={"workers": 2, "gpusPerWorker": 4}), CFG)
    env = {
        e["name"]: e.get("value", e.get("valueFrom")) for e in job["spec"]["template"]["spec"]["containers"][0]["env"]
    }
    assert (env["WORLD_SIZE"], env["LOCAL_WORLD_SIZE"]) == ("8", "4")
    assert "RANK" not in env and "LOCAL_RANK" not in env  # the launcher sets them per process
    assert "job-completion-index" in str(env["GROUP_RANK"])
    single = trainer_objects.build_job(OWNER, spec(resources={"workers": 2, "processesPerWorker": 1}), CFG)
    env = {
        e["name"]: e.get("value", e.get("valueFrom"))
        for e in single["spec"]["template"]["spec"]["containers"][0]["env"]
    }
    assert (env["WORLD_SIZE"], env["LOCAL_WORLD_SIZE"], env["LOCAL_RANK"]) == ("2", "1", "0")
