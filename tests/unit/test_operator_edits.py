"""Spec edits: what the operator can act on reaches the children, the rest is refused by the API server."""

from typing import Any

from kiln import api
from kiln.api import crd
from kiln_operator import config, objects, trainer_objects

OWNER = objects.Owner(name="digits", namespace="team-a", uid="0b6e3c1d-5d0f-4a8e-9c1e-2f4b7a9d1e00")


def job_for(**run_policy: Any) -> dict[str, Any]:
    spec = api.TrainingJobSpec.model_validate({"resources": {"workers": 2}, "runPolicy": run_policy})
    return trainer_objects.build_job(OWNER, spec, config.OperatorConfig())


def fields_for(**run_policy: Any) -> dict[str, Any]:
    return trainer_objects.run_policy_fields(api.TrainingJobSpec.model_validate({"runPolicy": run_policy}))


def test_run_policy_edits_become_a_patch_of_the_jobs_mutable_fields_only() -> None:
    live = job_for(backoffLimit=3)
    edited = fields_for(backoffLimit=5, activeDeadlineSeconds=600, ttlSecondsAfterFinished=60)
    assert trainer_objects.job_patch(edited, live) == {
        "backoffLimit": 5,  # runPolicy.backoffLimit counts retries of the whole gang (one per lost worker)
        "activeDeadlineSeconds": 600,
        "ttlSecondsAfterFinished": 60,
    }
    assert trainer_objects.job_patch(
        fields_for(backoffLimit=3), job_for(backoffLimit=5, activeDeadlineSeconds=600, ttlSecondsAfterFinished=60)
    ) == {
        "backoffLimit": 3,
        "activeDeadlineSeconds": None,
        "ttlSecondsAfterFinished": None,
    }
    assert trainer_objects.job_patch(fields_for(backoffLimit=3), live) == {}


def test_every_section_but_run_policy_and_serving_is_immutable_with_a_message_saying_what_to_do() -> None:
    spec = crd.trainingjob_crd()["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]["spec"]
    sections = set(spec["properties"])
    immutable = {s for s in sections if any(r["rule"] == "self == oldSelf" for r in
                                            spec["properties"][s].get("x-kubernetes-validations", []))}  # fmt: skip
    assert sections - immutable == {"runPolicy", "serving"}
    for section in immutable:
        (rule,) = [r for r in spec["properties"][section]["x-kubernetes-validations"] if r["rule"] == "self == oldSelf"]
        assert rule["message"].startswith(f"{section} is immutable after creation; create a new TrainingJob")
