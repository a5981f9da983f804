"""Artifact identity and lifecycle: each TrainingJob writes into a folder keyed by its uid, reported in status;
retentionPolicy Delete removes exactly that folder with a cleanup Job when the TrainingJob is deleted."""

import subprocess
import sys
from pathlib import Path

from kiln import api
from kiln.api import constants
from kiln_operator import cleanup_objects, config, objects, serving_objects, status, trainer_objects

OLD = objects.Owner(name="digits", namespace="team-a", uid="0b6e3c1d-5d0f-4a8e-9c1e-2f4b7a9d1e00")
NEW = objects.Owner(name="digits", namespace="team-a", uid="7f3a9c2e-1b4d-4e8f-a6c5-d2e1f0b9a877")
CFG = config.OperatorConfig()


def test_a_same_name_trainingjob_gets_a_folder_of_its_own_for_trainer_and_server_alike() -> None:
    spec = api.TrainingJobSpec()
    assert objects.artifacts_dir(OLD) != objects.artifacts_dir(NEW)
    assert objects.artifacts_dir(NEW) == f"{constants.ARTIFACTS_MOUNT}/team-a/digits/{NEW.uid}"
    args = trainer_objects.build_job(NEW, spec, CFG)["spec"]["template"]["spec"]["containers"][0]["args"]
    assert args[args.index("--output") + 1] == objects.artifacts_dir(NEW)
    server = serving_objects.build_deployment(NEW, spec, CFG, api.ModelStatus(variant="fp32"))
    server_args = server["spec"]["template"]["spec"]["containers"][0]["args"]
    assert server_args[server_args.index("--model-dir") + 1] == objects.artifacts_dir(NEW)


def test_the_folder_is_reported_in_status() -> None:
    obs = status.Observation(
        name="digits", namespace="team-a", generation=1, status={}, serving_enabled=True, serving_replicas=1,
        artifacts_path=objects.artifacts_dir(NEW),
    )  # fmt: skip
    assert status.assess(obs, "2026-11-28T10:00:00Z")["artifactsPath"] == objects.artifacts_dir(NEW)


def test_retention_defaults_to_retain_and_accepts_only_retain_or_delete() -> None:
    assert api.TrainingJobSpec().artifacts.retention_policy == "Retain"
    assert api.TrainingJobSpec.model_validate({"artifacts": {"retentionPolicy": "Delete"}}).artifacts.retention_policy
    try:
        api.TrainingJobSpec.model_validate({"artifacts": {"retentionPolicy": "Archive"}})
    except ValueError as err:
        assert "retentionPolicy" in str(err)
    else:
        raise AssertionError("Archive was accepted")


def test_the_cleanup_job_mounts_the_jobs_volume_and_is_not_owned_by_the_deleted_trainingjob() -> None:
    spec = api.TrainingJobSpec.model_validate(
        {"artifacts": {"volume": {"persistentVolumeClaim": {"claimName": "team"}}, "retentionPolicy": "Delete"}}
    )
    job = cleanup_objects.build_cleanup_job(NEW, spec, CFG)
    assert "ownerReferences" not in job["metadata"]  # garbage collection would remove it before it ran
    assert job["metadata"]["name"] == "digits-cleanup-7f3a9c2e" and job["spec"]["ttlSecondsAfterFinished"] > 0
    pod = job["spec"]["template"]["spec"]
    assert {"name": "artifacts", "persistentVolumeClaim": {"claimName": "team"}} in pod["volumes"]
    assert pod["containers"][0]["command"][-1] == objects.artifacts_dir(NEW)
    assert pod["securityContext"]["runAsNonRoot"] is True


def test_the_cleanup_command_removes_exactly_that_jobs_folder(tmp_path: Path) -> None:
    old, new = tmp_path / "team-a" / "digits" / OLD.uid, tmp_path / "team-a" / "digits" / NEW.uid
    for folder in (old, new):
        (folder / "checkpoints").mkdir(parents=True)
        (folder / "checkpoints" / "epoch-0001.pt").write_bytes(b"x")
    subprocess.run([sys.executable, "-c", cleanup_objects.SCRIPT, str(new)], check=True)
    assert not new.exists() and (old / "checkpoints" / "epoch-0001.pt").exists()
    subprocess.run([sys.executable, "-c", cleanup_objects.SCRIPT, str(old)], check=True)
    assert not (tmp_path / "team-a").exists()  # empty name and namespace folders go too
