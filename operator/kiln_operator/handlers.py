"""kopf handlers: thin, typed, named for when they fire. The work happens in `reconciler`.

Tracking is event-driven, not timed: `@kopf.on.event` handlers on the trainer Job, on pods and on the serving
Deployment (watched with a server-side label selector on kiln.dev/trainingjob) re-reconcile their owner,
so status follows the cluster within the watch latency. Timers would add a finalizer to every TrainingJob
(deletion would then hang while the operator is down) and poll idle jobs; events do neither.
"""

import logging
import threading
from typing import Any, Final

import kopf

from kiln.api import constants
from kiln_operator import cleanup_objects, config, kube, metrics, objects, reconciler

TRAININGJOBS: Final = (constants.GROUP, constants.VERSION, constants.PLURAL)
CHILD_SELECTOR: Final = f"{constants.LABEL_TRAININGJOB},{objects.LABEL_MANAGED_BY}={objects.MANAGER}"
CHILD_LABELS: Final = {constants.LABEL_TRAININGJOB: kopf.PRESENT}
MAX_WORKERS: Final = 16
# Every child kind is watched: a Job, pod or Deployment change re-reads the status; any child deleted by hand
# re-creates it (reconcile with repair), and a periodic resync heals what events missed.
CHILD_RESOURCES: Final = (
    ("batch", "v1", "jobs"),
    ("v1", "pods"),
    ("apps", "v1", "deployments"),
    ("v1", "services"),
    ("v1", "configmaps"),
    ("v1", "serviceaccounts"),
    ("rbac.authorization.k8s.io", "v1", "roles"),
    ("rbac.authorization.k8s.io", "v1", "rolebindings"),
)
RESYNC_SECONDS: Final = 60


def _context(memo: kopf.Memo, namespace: str | None) -> tuple[kube.Kube, config.OperatorConfig, str]:
    """The API adapter and configuration from the memo, and the namespace (kopf types it optional)."""
    client, cfg = memo.get("kube"), memo.get("config")
    if not isinstance(client, kube.Kube) or not isinstance(cfg, config.OperatorConfig):
        raise kopf.TemporaryError("the operator is still starting", delay=1)
    if not namespace:
        raise kopf.PermanentError("kiln handles namespaced objects only")
    return client, cfg, namespace


@kopf.on.startup()
def configure(settings: kopf.OperatorSettings, memo: kopf.Memo, **_: Any) -> None:
    """All kopf settings in one place, the API adapter, and the metrics server."""
    # Own names for kopf's bookkeeping, so it reads as kiln's in `kubectl get -o yaml`.
    settings.persistence.finalizer = f"{constants.GROUP}/finalizer"
    settings.persistence.progress_storage = kopf.AnnotationsProgressStorage(prefix=constants.GROUP)
    settings.persistence.diffbase_storage = kopf.AnnotationsDiffBaseStorage(
        prefix=constants.GROUP, key="last-handled-configuration"
    )
    # Events come from explicit phase-transition and failure announcements, not from every log line.
    settings.posting.level = logging.WARNING
    # Ask the API server to end each watch after 5 minutes, and give up on a silent one shortly after,
    # so watches are re-established (not frozen) across API server restarts and load balancers.
    settings.watching.server_timeout = 300
    settings.watching.client_timeout = 330
    settings.watching.connect_timeout = 10
    settings.networking.connect_timeout = 10
    settings.networking.request_timeout = 60
    settings.execution.max_workers = MAX_WORKERS
    # Watch only kiln's children, filtered by the API server rather than in this process.
    for resource in CHILD_RESOURCES:
        settings.watching.label_selectors[resource] = CHILD_SELECTOR
    if "config" not in memo:  # started through `kopf run -m kiln_operator.handlers` rather than `kiln operator`
        memo["config"] = config.OperatorConfig.from_env()
    if "kube" not in memo:
        memo["kube"] = kube.Kube(kube.load_configuration(), pool_size=MAX_WORKERS * 2)
    port = memo.get("metrics_port", constants.OPERATOR_METRICS_PORT)
    if port:
        metrics.serve(int(port), str(memo.get("bind_host", "0.0.0.0")))
    stop = threading.Event()
    memo["resync_stop"] = stop
    args = (memo["kube"], memo["config"], stop, float(memo.get("resync_seconds", RESYNC_SECONDS)))
    threading.Thread(target=reconciler.resync_forever, args=args, name="kiln-resync", daemon=True).start()


@kopf.on.cleanup()
def stop_resync(memo: kopf.Memo, **_: Any) -> None:
    """End the periodic resync with the operator."""
    stop = memo.get("resync_stop")
    if isinstance(stop, threading.Event):
        stop.set()


@kopf.on.probe(id="trainingjobs")
def report_tracked_jobs(**_: Any) -> int:
    """Shown by the liveness endpoint: how many TrainingJobs this operator tracks."""
    return metrics.tracked_jobs()


@kopf.on.resume(*TRAININGJOBS)
@kopf.on.create(*TRAININGJOBS)
@metrics.instrumented("create_training_job")
def create_training_job(
    reason: str, body: kopf.Body, name: str, namespace: str | None, memo: kopf.Memo, **_: Any
) -> None:
    """On creation, and for every existing job when the operator starts: create what is missing, report.

    On creation the trainer objects are created here, so a failure is retried by kopf; the new Job's watch
    event then writes the first status. On resume the reconciler re-creates them only if the Job is missing
    and training has not finished, so a job whose Job was lost gets it back and a finished one is left alone.
    """
    client, cfg, namespace = _context(memo, namespace)
    try:
        spec = reconciler.validate(body, cfg)
    except reconciler.InvalidSpec as err:
        reconciler.reconcile(client, cfg, namespace, name)  # writes phase Failed, reason InvalidSpec
        raise kopf.PermanentError(str(err)) from None
    if reason == kopf.Reason.CREATE and "Job" in reconciler.ensure_trainer(client, cfg, body, spec):
        return
    reconciler.reconcile(client, cfg, namespace, name)


@kopf.on.update(*TRAININGJOBS, field="spec")
@metrics.instrumented("apply_spec_edit")
def apply_spec_edit(body: kopf.Body, name: str, namespace: str | None, memo: kopf.Memo, **_: Any) -> None:
    """An edit of what may change in place (runPolicy, serving; the rest is immutable by CEL): the reconciler
    applies it to the children (the Job's deadline, retries and TTL; the serving Deployment and HPA by
    server-side apply, or their removal) and moves observedGeneration once they reflect it."""
    client, cfg, namespace = _context(memo, namespace)
    try:
        reconciler.validate(body, cfg)
    except reconciler.InvalidSpec as err:
        reconciler.reconcile(client, cfg, namespace, name)  # writes Failed, reason InvalidSpec
        raise kopf.PermanentError(str(err)) from None
    reconciler.reconcile(client, cfg, namespace, name)


@kopf.on.field(*TRAININGJOBS, field="spec.runPolicy.suspend")
@metrics.instrumented("suspend_trainer_job")
def suspend_trainer_job(new: Any, name: str, namespace: str | None, memo: kopf.Memo, **_: Any) -> None:
    """runPolicy.suspend true/false suspends or resumes the trainer Job (pods stop; progress is checkpointed).
    Only a Job the operator suspended is resumed; a queued Job's suspension is Kueue's (reconciler.suspend_job).

    Also runs on creation: an edit that lands while the creation is handled arrives as part of it.
    """
    client, cfg, namespace = _context(memo, namespace)
    if reconciler.suspend_job(client, namespace, name, bool(new)):
        reconciler.reconcile(client, cfg, namespace, name)


def _retention_is_delete(spec: kopf.Spec, **_: Any) -> bool:
    return bool((spec.get("artifacts") or {}).get("retentionPolicy") == "Delete")


@kopf.on.delete(*TRAININGJOBS, when=_retention_is_delete)
@metrics.instrumented("delete_artifacts")
def delete_artifacts(body: kopf.Body, namespace: str | None, memo: kopf.Memo, **_: Any) -> None:
    """artifacts.retentionPolicy Delete: start the Job that removes this TrainingJob's folder, then let it go.

    Only such TrainingJobs carry kopf's finalizer (the `when` filter), so deleting the others never waits for
    the operator. The cleanup Job is not waited for: it runs on after the TrainingJob is gone.
    """
    client, cfg, namespace = _context(memo, namespace)
    try:
        spec = reconciler.validate(body, cfg)
    except reconciler.InvalidSpec:
        return  # never ran, so it never wrote anything
    client.create_if_absent(cleanup_objects.build_cleanup_job(objects.Owner.from_body(body), spec, cfg))


@kopf.on.event(*TRAININGJOBS)
@metrics.instrumented("track_training_job")
def track_training_job(
    event: kopf.RawEvent, body: kopf.Body, name: str, namespace: str | None, memo: kopf.Memo, **_: Any
) -> None:
    """Keeps the per-phase and per-job gauges current (an acknowledgement silences the job's alerts at once);
    follows up when the trainer reports the compiled model."""
    client, cfg, namespace = _context(memo, namespace)
    if event.get("type") == "DELETED":
        reconciler.forget(namespace, name)
        return
    reconciler.remember(namespace, name)
    current = body.get("status") or {}
    metrics.record_phase(namespace, name, current.get("phase"))
    if current.get("phase"):
        reconciler.publish_conditions(body)
    if current.get("phase") == "Exporting" and current.get("model"):
        reconciler.reconcile(client, cfg, namespace, name)


def _reconcile_owner(labels: kopf.Labels, namespace: str | None, memo: kopf.Memo, repair: bool = False) -> None:
    owner = labels.get(constants.LABEL_TRAININGJOB)
    if owner:
        client, cfg, namespace = _context(memo, namespace)
        reconciler.reconcile(client, cfg, namespace, owner, repair=repair)


@kopf.on.event("batch", "v1", "jobs", labels=CHILD_LABELS)
@metrics.instrumented("track_trainer_job")
def track_trainer_job(labels: kopf.Labels, namespace: str | None, memo: kopf.Memo, **_: Any) -> None:
    """A trainer Job changed (pods started, succeeded, failed, suspended, finished or removed)."""
    _reconcile_owner(labels, namespace, memo)


@kopf.on.event("v1", "pods", labels=CHILD_LABELS)
@metrics.instrumented("track_child_pod")
def track_child_pod(labels: kopf.Labels, namespace: str | None, memo: kopf.Memo, **_: Any) -> None:
    """A trainer or server pod changed: running, restarted, failed, waiting on an image or a node."""
    _reconcile_owner(labels, namespace, memo)


@kopf.on.event("apps", "v1", "deployments", labels=CHILD_LABELS)
@metrics.instrumented("track_serving_deployment")
def track_serving_deployment(labels: kopf.Labels, namespace: str | None, memo: kopf.Memo, **_: Any) -> None:
    """The serving Deployment changed: replicas became available, or a rollout stalled."""
    _reconcile_owner(labels, namespace, memo)


@kopf.on.event("v1", "services", labels=CHILD_LABELS)
@kopf.on.event("v1", "configmaps", labels=CHILD_LABELS)
@kopf.on.event("v1", "serviceaccounts", labels=CHILD_LABELS)
@kopf.on.event("rbac.authorization.k8s.io", "v1", "roles", labels=CHILD_LABELS)
@kopf.on.event("rbac.authorization.k8s.io", "v1", "rolebindings", labels=CHILD_LABELS)
@metrics.instrumented("repair_deleted_child")
def repair_deleted_child(event: kopf.RawEvent, labels: kopf.Labels, namespace: str | None, memo: kopf.Memo,
                         **_: Any) -> None:  # fmt: skip
    """A child the operator otherwise only creates was deleted (by hand, or by another controller): re-create
    it, and re-read the status (a deleted serving Service is re-applied and the endpoint reported again)."""
    if event.get("type") == "DELETED":
        _reconcile_owner(labels, namespace, memo, repair=True)
