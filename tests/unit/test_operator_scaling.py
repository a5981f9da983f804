"""Serving autoscaling and image pull secrets: the operator settings that shape serving and trainer pods.

Pure builders and the config reader only; what the API server does with an HPA is its own business.
"""

import dataclasses
from typing import Any

import pytest

from kiln import api
from kiln_operator import config, objects, serving_objects, trainer_objects

OWNER = objects.Owner(name="digits", namespace="team-a", uid="0b6e3c1d-5d0f-4a8e-9c1e-2f4b7a9d1e00")
HPA = config.OperatorConfig(
    serving_cpu="1",
    serving_hpa_enabled=True,
    serving_hpa_min_replicas=2,
    serving_hpa_max_replicas=8,
    serving_hpa_target_cpu_utilization=60,
)
MODEL = api.ModelStatus(variant="fp32", sha256="ab" * 32)


def spec(**sections: Any) -> api.TrainingJobSpec:
    return api.TrainingJobSpec.model_validate(sections)


# --- configuration ----------------------------------------------------------------------------------------


def test_autoscaling_and_pull_secrets_are_off_by_default_and_read_from_the_environment() -> None:
    default = config.OperatorConfig.from_env({})
    assert default.serving_hpa_enabled is False and default.image_pull_secrets == ()
    cfg = config.OperatorConfig.from_env({
        "KILN_SERVING_HPA_ENABLED": "True", "KILN_SERVING_HPA_MIN_REPLICAS": "2",
        "KILN_SERVING_HPA_MAX_REPLICAS": "8", "KILN_SERVING_HPA_TARGET_CPU_UTILIZATION": "60",
        "KILN_IMAGE_PULL_SECRETS": " regcred, mirror.example ,regcred,", "KILN_SERVING_CPU": "1",
    })  # fmt: skip
    assert cfg == dataclasses.replace(HPA, image_pull_secrets=("regcred", "mirror.example"))
    assert config.OperatorConfig.from_env({"KILN_SERVING_HPA_ENABLED": "false"}).serving_hpa_enabled is False


@pytest.mark.parametrize(
    ("env", "message"),
    [({"KILN_SERVING_HPA_ENABLED": "yes"}, "KILN_SERVING_HPA_ENABLED='yes' must be true or false"),
     ({"KILN_SERVING_HPA_MIN_REPLICAS": "0"}, "KILN_SERVING_HPA_MIN_REPLICAS='0' must be a whole number from 1"),
     ({"KILN_SERVING_HPA_MAX_REPLICAS": "four"}, "KILN_SERVING_HPA_MAX_REPLICAS='four' must be a whole number"),
     ({"KILN_SERVING_HPA_TARGET_CPU_UTILIZATION": "150"}, "UTILIZATION='150' must be a whole number from 1 to 100"),
     ({"KILN_SERVING_HPA_MIN_REPLICAS": "5", "KILN_SERVING_HPA_MAX_REPLICAS": "3"},
      "KILN_SERVING_HPA_MAX_REPLICAS=3 is below KILN_SERVING_HPA_MIN_REPLICAS=5"),
     ({"KILN_IMAGE_PULL_SECRETS": "regcred,Reg_Cred"}, "KILN_IMAGE_PULL_SECRETS: 'Reg_Cred' is not a Secret name")],
)  # fmt: skip
def test_a_bad_autoscaling_or_pull_secret_setting_is_named(env: dict[str, str], message: str) -> None:
    with pytest.raises(config.ConfigError, match=message):
        config.OperatorConfig.from_env(env)


# --- image pull secrets -----------------------------------------------------------------------------------


def pods(cfg: config.OperatorConfig) -> tuple[dict[str, Any], dict[str, Any]]:
    """The trainer and serving pod specs built with this operator config."""
    trainer = trainer_objects.build_job(OWNER, spec(), cfg)["spec"]["template"]["spec"]
    serving = serving_objects.build_deployment(OWNER, spec(), cfg, MODEL)["spec"]["template"]["spec"]
    return trainer, serving


def test_trainer_and_serving_pods_pull_with_the_configured_secrets() -> None:
    trainer, serving = pods(config.OperatorConfig(image_pull_secrets=("regcred", "mirror")))
    assert trainer["imagePullSecrets"] == serving["imagePullSecrets"] == [{"name": "regcred"}, {"name": "mirror"}]


def test_pods_have_no_pull_secrets_when_none_are_configured() -> None:
    trainer, serving = pods(config.OperatorConfig())
    assert "imagePullSecrets" not in trainer and "imagePullSecrets" not in serving


# --- the HorizontalPodAutoscaler --------------------------------------------------------------------------


def test_the_autoscaler_targets_the_serving_deployment_on_cpu_utilisation_and_is_adopted() -> None:
    hpa = serving_objects.build_autoscaler(OWNER, spec(), HPA)
    deployment = serving_objects.build_deployment(OWNER, spec(), HPA, MODEL)
    assert (hpa["apiVersion"], hpa["kind"]) == ("autoscaling/v2", "HorizontalPodAutoscaler")
    assert hpa["metadata"] == {**deployment["metadata"], "name": "digits-serving"}
    assert hpa["spec"] == {
        "scaleTargetRef": {"apiVersion": "apps/v1", "kind": "Deployment", "name": deployment["metadata"]["name"]},
        "minReplicas": 2,
        "maxReplicas": 8,
        "metrics": [{"type": "Resource", "resource": {"name": "cpu",
                                                      "target": {"type": "Utilization", "averageUtilization": 60}}}],
    }  # fmt: skip


@pytest.mark.parametrize(("replicas", "minimum", "maximum"), [(1, 2, 8), (3, 3, 8), (12, 12, 12)])
def test_serving_replicas_are_a_floor_for_the_autoscaler_and_the_maximum_never_falls_below_it(
    replicas: int, minimum: int, maximum: int
) -> None:
    hpa = serving_objects.build_autoscaler(OWNER, spec(serving={"replicas": replicas}), HPA)
    assert (hpa["spec"]["minReplicas"], hpa["spec"]["maxReplicas"]) == (minimum, maximum)


def test_an_autoscaled_deployment_leaves_replicas_to_the_autoscaler() -> None:
    deployment = serving_objects.build_deployment(OWNER, spec(serving={"replicas": 3}), HPA, MODEL)
    assert "replicas" not in deployment["spec"]
    created = serving_objects.with_replicas(deployment, 3)
    assert created["spec"]["replicas"] == 3 and "replicas" not in deployment["spec"]
    assert {k: v for k, v in created["spec"].items() if k != "replicas"} == deployment["spec"]


@pytest.mark.parametrize(
    ("cfg", "serving"),
    [(config.OperatorConfig(serving_cpu="1"), {"replicas": 3}),
     (HPA, {"replicas": 0}),
     (config.OperatorConfig(serving_hpa_enabled=True), {"replicas": 3})],
    ids=["autoscaling-off", "scaled-to-zero", "no-cpu-request"],
)  # fmt: skip
def test_without_autoscaling_a_zero_scale_or_a_cpu_request_the_deployment_keeps_fixed_replicas(
    cfg: config.OperatorConfig, serving: dict[str, Any]
) -> None:
    job_spec = spec(serving=serving)
    assert not serving_objects.autoscaled(job_spec, cfg)
    assert serving_objects.build_deployment(OWNER, job_spec, cfg, MODEL)["spec"]["replicas"] == serving["replicas"]


def test_a_cpu_request_in_the_trainingjob_is_enough_to_autoscale() -> None:
    cfg = config.OperatorConfig(serving_hpa_enabled=True)
    assert serving_objects.autoscaled(spec(serving={"cpu": "500m"}), cfg)


def _managed(manager: str, operation: str, spec_fields: dict[str, Any]) -> dict[str, Any]:
    return {"manager": manager, "operation": operation, "fieldsV1": {"f:spec": spec_fields}}


def test_replicas_the_operators_apply_set_owns_are_handed_over_before_it_lets_go_of_them() -> None:
    live = {"metadata": {"name": "digits-serving", "namespace": "team-a", "managedFields": [
        _managed("kube-controller-manager", "Update", {"f:replicas": {}}),
        _managed("kiln-operator", "Apply", {"f:replicas": {}, "f:template": {}}),
    ]}, "spec": {"replicas": 5}}  # fmt: skip
    assert serving_objects.applies_replicas(live)
    assert serving_objects.build_replicas_handoff(live) == {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": {"name": "digits-serving", "namespace": "team-a"},
        "spec": {"replicas": 5},
    }
    assert serving_objects.HANDOFF_MANAGER != objects.MANAGER


@pytest.mark.parametrize(
    "entries",
    [[],
     [_managed("kiln-operator", "Update", {"f:replicas": {}})],
     [_managed("kiln-operator", "Apply", {"f:template": {}}),
      _managed("kube-controller-manager", "Update", {"f:replicas": {}})]],
    ids=["no-managed-fields", "created-by-post", "taken-by-the-autoscaler"],
)  # fmt: skip
def test_replicas_set_on_creation_or_taken_by_the_autoscaler_need_no_handover(entries: list[dict[str, Any]]) -> None:
    assert not serving_objects.applies_replicas({"metadata": {"managedFields": entries}})


def test_an_autoscaler_with_other_bounds_or_target_than_the_config_is_out_of_step() -> None:
    desired = serving_objects.build_autoscaler(OWNER, spec(), HPA)
    live = {**desired, "spec": {**desired["spec"], "behavior": {"scaleDown": {"stabilizationWindowSeconds": 300}}}}
    assert serving_objects.autoscaler_matches(live, desired)
    for key, value in [("minReplicas", 1), ("maxReplicas", 4)]:
        assert not serving_objects.autoscaler_matches({"spec": {**desired["spec"], key: value}}, desired)
    retargeted = dataclasses.replace(HPA, serving_hpa_target_cpu_utilization=80)
    assert not serving_objects.autoscaler_matches(serving_objects.build_autoscaler(OWNER, spec(), retargeted), desired)
