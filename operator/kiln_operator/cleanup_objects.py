"""The Job that removes a deleted TrainingJob's artifacts folder (artifacts.retentionPolicy: Delete).

The operator never mounts users' volumes itself, so a short Job in the TrainingJob's namespace, with the
trainer image, the same artifacts volume and the same restricted security context, deletes exactly
objects.artifacts_dir(owner) (namespace/name/uid: nothing another TrainingJob could own). It is not owned by
the TrainingJob, whose deletion would otherwise garbage-collect it before it ran, and removes itself a
while after it finished.
"""

from typing import Final

from kiln import api
from kiln.api import constants
from kiln_operator import config, objects
from kiln_operator.objects import Manifest, Owner

CLEANUP: Final = "cleanup"
TTL_SECONDS: Final = 300
# Removes the folder and, when they are left empty, the name and namespace folders above it.
SCRIPT: Final = (
    "import os, shutil, sys; path = sys.argv[1]; shutil.rmtree(path, ignore_errors=True)\n"
    "for parent in (os.path.dirname(path), os.path.dirname(os.path.dirname(path))):\n"
    "    try: os.rmdir(parent)\n"
    "    except OSError: break\n"
)


def cleanup_job_name(owner: Owner) -> str:
    """Unique per TrainingJob (uid), so a re-created one's cleanup never collides with an old one's."""
    return f"{owner.name}-cleanup-{owner.uid[:8]}"


def build_cleanup_job(owner: Owner, spec: api.TrainingJobSpec, cfg: config.OperatorConfig) -> Manifest:
    tmp_volume, tmp_mount = objects.tmp_volume()
    labels = {k: v for k, v in objects.labels(owner.name, CLEANUP).items() if k != constants.LABEL_TRAININGJOB}
    container: Manifest = {
        "name": CLEANUP,
        "image": cfg.trainer_image,
        "imagePullPolicy": cfg.image_pull_policy,
        "command": ["python", "-c", SCRIPT, objects.artifacts_dir(owner)],
        "env": objects.home_env(),
        "volumeMounts": [{"name": "artifacts", "mountPath": constants.ARTIFACTS_MOUNT}, tmp_mount],
        "securityContext": objects.container_security_context(),
    }
    volumes = [objects.artifacts_volume(spec.artifacts.volume, cfg.artifacts_pvc), tmp_volume]
    pod_spec = {"restartPolicy": "Never", **objects.offline_pod_spec(container, volumes, cfg.image_pull_secrets)}
    return {
        "apiVersion": "batch/v1",
        "kind": "Job",
        "metadata": {"name": cleanup_job_name(owner), "namespace": owner.namespace, "labels": labels},
        "spec": {
            "backoffLimit": 3,
            "ttlSecondsAfterFinished": TTL_SECONDS,
            "template": {"metadata": {"labels": labels}, "spec": pod_spec},
        },
    }
