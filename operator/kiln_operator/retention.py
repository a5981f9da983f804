"""artifacts.retentionPolicy Delete: the operator's finalizer, and the cleanup Job started when it is deleted.

Handled here rather than by kopf's on.delete, which would make kopf build a diff-base copy of every
TrainingJob on every event to detect changes. Only a TrainingJob with retentionPolicy Delete gets the
finalizer (one API write, added when it is first seen), so deleting any other never waits for the operator.
On deletion the cleanup Job (cleanup_objects) is created, not waited for, and the finalizer is removed.
Both patches carry the resourceVersion they were computed from: a concurrent change answers 409, and the
next event of the TrainingJob tries again.
"""

import logging
from collections.abc import Mapping
from typing import Any, Final

from kiln.api import constants
from kiln_operator import cleanup_objects, config, kube, objects, reconciler

log = logging.getLogger(__name__)

FINALIZER: Final = f"{constants.GROUP}/finalizer"


def deletes_artifacts(body: Mapping[str, Any]) -> bool:
    return bool(((body.get("spec") or {}).get("artifacts") or {}).get("retentionPolicy") == "Delete")


def _set_finalizers(client: kube.Kube, body: Mapping[str, Any], finalizers: list[str]) -> None:
    meta = body["metadata"]
    patch = {"metadata": {"finalizers": finalizers or None, "resourceVersion": meta["resourceVersion"]}}
    try:
        client.patch(constants.API_VERSION, constants.KIND, meta["namespace"], meta["name"], patch)
    except Exception as err:
        if not (kube.is_conflict(err) or kube.is_not_found(err)):  # changed meanwhile: its next event retries
            raise


def follow(client: kube.Kube, cfg: config.OperatorConfig, body: Mapping[str, Any]) -> bool:
    """Add the finalizer to a live TrainingJob that asks for it; finish the deletion of one that has it.
    Returns True while the TrainingJob is being deleted (nothing else is to be done for it)."""
    meta = body["metadata"]
    finalizers: list[str] = list(meta.get("finalizers") or [])
    if not meta.get("deletionTimestamp"):
        if deletes_artifacts(body) and FINALIZER not in finalizers:
            _set_finalizers(client, body, [*finalizers, FINALIZER])
        return False
    if FINALIZER in finalizers:
        try:
            spec = reconciler.validate(body, cfg)
        except reconciler.InvalidSpec:
            spec = None  # it never ran, so it never wrote anything
        if spec is not None and deletes_artifacts(body):
            client.create_if_absent(cleanup_objects.build_cleanup_job(objects.Owner.from_body(body), spec, cfg))
            log.info("started the artifacts cleanup of %s/%s", meta["namespace"], meta["name"])
        _set_finalizers(client, body, [f for f in finalizers if f != FINALIZER])
    return True
