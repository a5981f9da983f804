"""Level-triggered reconciliation of one TrainingJob: read what exists, create what is missing, write status.

Every trigger (the TrainingJob's own handlers, and watch events of its Job, Pods and Deployment) calls
`reconcile`, which re-reads everything, so it does not matter which event fired or whether one was missed:
the next one repairs it. Runs for one TrainingJob are coalesced: while one runs, further triggers only mark
it dirty and return, and the running thread goes once more with a fresh read. So a burst of pod events
costs one or two runs and one thread, and two threads never write an older observation over a newer one.
All state lives in the TrainingJob's status and in the children's deterministic names, so an operator
restart loses nothing and duplicates nothing.
"""

import functools
import logging
import threading
import time
from collections.abc import Callable, Collection, Mapping
from datetime import UTC, datetime
from typing import Any, Final, TypeVar

import kopf
import pydantic

from kiln import api
from kiln.api import trainingjob
from kiln_operator import (
    config,
    kube,
    metrics,
    objects,
    pod_status,
    policy,
    rollout,
    status,
    trainer_objects,
)

log = logging.getLogger(__name__)

Body = Mapping[str, Any]
T = TypeVar("T")
Manifest = dict[str, Any]
# Transient API failures are retried inside one run, so a lost trigger does not leave a stale status.
ATTEMPTS: Final = 3
WARNING_PHASES: Final[tuple[api.Phase, ...]] = ("Failed",)
# An owner sets this annotation to "true" to silence the alerts of a job they have looked at.
ACKNOWLEDGED: Final = f"{api.GROUP}/acknowledged"
# The condition whose message explains a phase in its transition Event.
SUMMARY_CONDITION: Final[dict[api.Phase, api.ConditionType]] = {
    "Pending": "Created",
    "Running": "Running",
    "Exporting": "Succeeded",
    "Serving": "Ready",
    "Succeeded": "Ready",
    "Failed": "Failed",
    "Suspended": "Suspended",
}

_guard = threading.Lock()
_running: set[tuple[str, str]] = set()
_dirty: set[tuple[str, str]] = set()
_repair: set[tuple[str, str]] = set()  # dirty runs that must also re-create missing trainer children
_known: set[tuple[str, str]] = set()  # every TrainingJob seen, for the periodic resync


class InvalidSpec(ValueError):
    """A TrainingJob that can never run; the message names every bad field."""


def forget(namespace: str, name: str) -> None:
    """Drop what is kept in memory about a deleted TrainingJob."""
    with _guard:
        _dirty.discard((namespace, name))
        _repair.discard((namespace, name))
        _known.discard((namespace, name))
    metrics.forget_job(namespace, name)


def remember(namespace: str, name: str) -> None:
    """Include a TrainingJob in the periodic resync."""
    with _guard:
        _known.add((namespace, name))


def resync_forever(queue: Callable[[tuple[str, str], bool], object], stop: threading.Event, interval: float) -> None:
    """Every `interval` seconds, queue a reconcile with repair of every known TrainingJob: heals what watch
    events missed (a child deleted while the operator was down, a watch that went quiet) and ends export
    deadlines."""
    while not stop.wait(interval):
        with _guard:
            keys = sorted(_known)
        for key in keys:
            queue(key, True)


def validate(body: Body, cfg: config.OperatorConfig) -> api.TrainingJobSpec:
    """The typed spec, or InvalidSpec naming every bad field: what the CRD's schema cannot check, and what the
    operator's policy refuses (hostPath, image overrides)."""
    name = body["metadata"]["name"]
    try:
        objects.check_name(name)
        spec = api.TrainingJobSpec.model_validate(body.get("spec") or {})
        refused = policy.violations(spec, cfg)
        if refused:
            raise InvalidSpec("; ".join(refused))
        return spec
    except pydantic.ValidationError as err:
        message = trainingjob.format_validation_error(err, f"{body['metadata'].get('namespace')}/{name}")
        raise InvalidSpec(message.replace("\n", " ").replace("  ", " ")) from None
    except ValueError as err:
        raise InvalidSpec(str(err)) from None


def ensure_trainer(
    client: kube.Kube, cfg: config.OperatorConfig, body: Body, spec: api.TrainingJobSpec, kinds: Collection[str] = ()
) -> list[str]:
    """Create whichever trainer objects are missing (only those of `kinds`, if given); returns the kinds
    created (those that existed are kept)."""
    owner = objects.Owner.from_body(body)
    labels = body["metadata"].get("labels") or {}
    children = trainer_objects.build_trainer_objects(owner, spec, cfg, labels)
    wanted = [child for child in children if not kinds or child["kind"] in kinds]
    return [child["kind"] for child in wanted if client.create_if_absent(child)]


def converge_job(
    client: kube.Kube, cfg: config.OperatorConfig, body: Body, spec: api.TrainingJobSpec, job: Manifest
) -> Manifest:
    """Bring the live Job to the spec in one merge patch: the runPolicy fields a live Job accepts (deadline,
    retries, TTL) and runPolicy.suspend (`suspend_patch`). Everything else of the Job is immutable, and so is
    the part of the spec it comes from (CEL). Returns the Job as it is now."""
    patch: Manifest = suspend_patch(job, spec.run_policy.suspend) or {}
    fields = trainer_objects.job_patch(trainer_objects.run_policy_fields(spec), job)
    if fields:
        patch["spec"] = {**patch.get("spec", {}), **fields}
    if not patch:
        return job
    return client.patch("batch/v1", "Job", job["metadata"]["namespace"], job["metadata"]["name"], patch)


def suspend_patch(job: Body, suspend: bool) -> Manifest | None:
    """The merge patch that holds or resumes the trainer Job for runPolicy.suspend, or None to leave it.

    A queued Job (Kueue owns its spec.suspend) and a finished one are left alone. A Job is resumed only if the
    operator suspended it (SUSPENDED_BY_USER_ANNOTATION), so a Job held by another controller stays held.
    """
    if objects.is_queued(job) or status.assess_training(job, [], {}).state in ("Succeeded", "Failed"):
        return None
    held = bool((job.get("spec") or {}).get("suspend"))
    mine = objects.suspended_by_user(job)
    if (held and mine) if suspend else not mine:
        return None  # already held by the operator, or not the operator's to resume
    body: Manifest = {"metadata": {"annotations": {objects.SUSPENDED_BY_USER_ANNOTATION: "true" if suspend else None}}}
    if suspend or held:
        body["spec"] = {"suspend": suspend}
    return body


def start_training(client: kube.Kube, cfg: config.OperatorConfig, body: Body) -> None:
    """A TrainingJob without a status yet (just created): create what its pods need to start, at once and
    without reading anything first, so the Job exists after one write (the ServiceAccount). The caller then
    queues a reconcile, which creates the rest (trainer_objects.AFTER_START: what the trainer needs only to
    report) and writes the first status, or Failed for an invalid spec.
    """
    try:
        spec = validate(body, cfg)
    except InvalidSpec:
        return
    kinds = [k for k in trainer_objects.TRAINER_KINDS if k not in trainer_objects.AFTER_START]
    # A final failure is logged by kopf; the periodic resync (with repair) tries again.
    _with_retries(
        lambda: ensure_trainer(client, cfg, body, spec, kinds),
        f"creating the trainer of {body['metadata']['namespace']}/{body['metadata']['name']}",
    )


def needs_reconcile(body: Body) -> bool:
    """Whether a TrainingJob's own change calls for a reconcile: a spec edit not yet observed (runPolicy,
    serving), or a model reported by the trainer that serving waits for. Other changes of the TrainingJob
    (progress, metrics, annotations) need nothing from the operator; its children's events drive the rest."""
    current = body.get("status") or {}
    edited = body["metadata"].get("generation") != current.get("observedGeneration")
    return edited or (current.get("phase") == "Exporting" and bool(current.get("model")))


def _announce(body: Body, event_type: str, reason: str, message: str) -> None:
    """A Kubernetes Event on the TrainingJob (kopf posts it in the background)."""
    meta = body["metadata"]
    ref: kopf.RawBody = {
        "apiVersion": api.API_VERSION,
        "kind": api.KIND,
        "metadata": {"name": meta["name"], "namespace": meta["namespace"], "uid": meta.get("uid", "")},
    }
    try:
        kopf.event(kopf.Body(ref), type=event_type, reason=reason, message=message[:1024])
    except LookupError:  # outside a running operator (tests, scripts): log only
        pass
    log.log(logging.WARNING if event_type == "Warning" else logging.INFO, "%s: %s", reason, message)


def _seconds_since(timestamp: str | None) -> float | None:
    if not timestamp:
        return None
    created = datetime.strptime(timestamp, api.RFC3339).replace(tzinfo=UTC)
    return (datetime.now(UTC) - created).total_seconds()


def publish_conditions(body: Body, desired: Mapping[str, Any] | None = None) -> None:
    """The per-job gauges the alerts read: conditions, phase, and the owner's acknowledgement."""
    meta, shown = body["metadata"], desired if desired is not None else body.get("status") or {}
    acknowledged = (meta.get("annotations") or {}).get(ACKNOWLEDGED) == "true"
    truth = {c["type"]: c["status"] == "True" for c in shown.get("conditions") or []}
    metrics.record_conditions(meta["namespace"], meta["name"], str(shown.get("phase")), truth, acknowledged)


def write_status(
    client: kube.Kube, body: Body, desired: Mapping[str, Any], latest_failure: str = ""
) -> api.Phase | None:
    """Patch what changed; count, announce and time phase transitions. Returns the phase (None: deleted).

    The patch carries the resourceVersion `body` was read at: if anyone wrote the TrainingJob since (another
    operator replica around a leader change, the trainer), it fails with 409 and the caller retries from a fresh
    read. So a transition is announced once, by the writer that moved the phase, never from a stale `old` phase.
    """
    meta, current = body["metadata"], body.get("status") or {}
    namespace, name = meta["namespace"], meta["name"]
    patch = status.status_patch(current, desired)
    if patch:
        try:
            client.patch_trainingjob_status(namespace, name, patch, meta.get("resourceVersion"))
        except Exception as err:
            if kube.is_not_found(err):  # deleted while this run was reading
                return None
            raise
    old: str | None = current.get("phase")
    new: api.Phase = desired["phase"]
    metrics.record_phase(namespace, name, new)
    publish_conditions(body, desired)
    if (desired.get("restarts") or 0) > (current.get("restarts") or 0):
        detail = f": {latest_failure}" if latest_failure else ""
        _announce(body, "Warning", "WorkerFailed", f"{desired['restarts']} trainer restart(s) so far{detail}")
    if old != new:
        metrics.record_transition(old, new)
        conditions = {c["type"]: c for c in desired.get("conditions") or []}
        summary = conditions.get(SUMMARY_CONDITION[new], {}).get("message", "")
        _announce(body, "Warning" if new in WARNING_PHASES else "Normal", new, f"{old or 'New'} -> {new}: {summary}")
        if new == "Serving" and old != "Succeeded":  # Serving is left only for Succeeded (serving disabled)
            elapsed = _seconds_since(meta.get("creationTimestamp"))
            if elapsed is not None:
                metrics.TIME_TO_SERVING.observe(elapsed)
    return new


def _reconcile_once(
    client: kube.Kube, cfg: config.OperatorConfig, namespace: str, name: str, repair: bool = False
) -> api.Phase | None:
    body = client.get_trainingjob(namespace, name)
    if body is None or body["metadata"].get("deletionTimestamp"):
        return None
    current, generation = body.get("status") or {}, body["metadata"].get("generation")
    try:
        spec = validate(body, cfg)
    except InvalidSpec as err:
        return write_status(client, body, status.assess_invalid(current, generation, str(err), status.now_rfc3339()))

    # Training: the Job and its pods; re-create the Job (and its helpers) if it vanished before finishing.
    job_name = objects.job_name(name)
    # A Job removed by its TTL is never re-created (that would train again); Failed is terminal.
    ttl = spec.run_policy.ttl_seconds_after_finished is not None
    job = client.get("batch/v1", "Job", namespace, job_name)
    if job is None and status.assess_training(None, [], current, ttl).state == "Missing":
        ensure_trainer(client, cfg, body, spec)
        job = client.get("batch/v1", "Job", namespace, job_name)
    failed = status.is_failed(current)
    if job is not None and not failed:
        job = converge_job(client, cfg, body, spec, job)
    pods = client.list_objects("v1", "Pod", namespace, objects.label_selector(name, objects.TRAINER))
    training = status.assess_training(job, pods, current, ttl)
    # With repair a deleted identity, Role or workers Service comes back. The first reconcile (no phase written
    # yet) creates what start_training left to it.
    if job is not None and not failed and training.state in ("Pending", "Queued", "Running", "Suspended"):
        if repair:
            ensure_trainer(client, cfg, body, spec, [k for k in trainer_objects.TRAINER_KINDS if k != "Job"])
        elif not current.get("phase"):
            ensure_trainer(client, cfg, body, spec, trainer_objects.AFTER_START)

    # Serving: only once the model is reported; applied on every run (server-side apply converges it to the
    # current spec, model and config, and repairs hand edits), removed when disabled.
    deployment, serving_pods = None, []
    if training.state == "Succeeded" and current.get("model") and not failed:
        if spec.serving.enabled:
            rollout.apply_serving(client, cfg, body, spec)
        deployment = client.get("apps/v1", "Deployment", namespace, objects.serving_name(name))
        if not spec.serving.enabled and deployment is not None:
            rollout.remove_serving(client, cfg, namespace, name)
            deployment = None
        if deployment is not None:
            selector = objects.label_selector(name, objects.SERVING)
            serving_pods = client.list_objects("v1", "Pod", namespace, selector)

    observation = status.Observation(
        name=name,
        namespace=namespace,
        generation=generation,
        status=current,
        serving_enabled=spec.serving.enabled,
        serving_replicas=spec.serving.replicas,
        job=job,
        trainer_pods=pods,
        deployment=deployment,
        serving_pods=serving_pods,
        ttl_after_finished=ttl,
        export_deadline_seconds=cfg.export_deadline_seconds,
        children_current=status.rolled_out(deployment),
        artifacts_path=objects.artifacts_dir(objects.Owner.from_body(body)),
    )
    exits = pod_status.terminations(pods)
    latest_failure = exits[-1].describe() if exits else ""
    return write_status(client, body, status.assess(observation, status.now_rfc3339()), latest_failure)


def _with_retries(call: Callable[[], T], what: str) -> T:
    """`call`, tried again after transient API failures (ATTEMPTS in all), so a lost trigger leaves no stale
    state."""
    for attempt in range(1, ATTEMPTS):
        try:
            return call()
        except Exception as err:
            if not kube.is_transient(err):
                raise
            log.info("%s failed (%s), retrying", what, err)
            time.sleep(0.5 * attempt)
    return call()


def reconcile(
    client: kube.Kube, cfg: config.OperatorConfig, namespace: str, name: str, repair: bool = False
) -> api.Phase | None:
    """Bring one TrainingJob's children and status up to date; returns its phase. With `repair` (a child was
    deleted, or the periodic resync) the trainer's helpers are re-created too while training runs.

    Returns None at once when the job is gone, or when another thread is reconciling it (that thread then
    runs again, so this trigger is not lost).
    """
    key = (namespace, name)
    with _guard:
        if key in _running:
            _dirty.add(key)
            if repair:
                _repair.add(key)
            return None
        _running.add(key)
    try:
        while True:
            once = functools.partial(_reconcile_once, client, cfg, namespace, name, repair)
            phase = _with_retries(once, f"reconcile {namespace}/{name}")
            with _guard:  # checked and cleared atomically with the mark set by other threads
                if key not in _dirty:
                    _running.discard(key)
                    return phase
                _dirty.discard(key)
                repair = key in _repair
                _repair.discard(key)
    finally:
        with _guard:
            _running.discard(key)
