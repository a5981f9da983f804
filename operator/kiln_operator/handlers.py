"""kopf handlers: thin, typed, named for when they fire. The work happens in `reconciler`.

TrainingJobs are followed by one event handler (`track_training_job`), so kopf keeps no state on them and
writes nothing to them; the finalizer of retentionPolicy Delete is the operator's own (`retention`).

Tracking is event-driven, not timed: `@kopf.on.event` handlers on the trainer Job, on pods and on the serving
Deployment (watched with a server-side label selector on kiln.dev/trainingjob) queue a reconcile of their
owner (`workqueue`), so status follows the cluster within the watch latency. Timers would add a finalizer
to every TrainingJob (deletion would then hang while the operator is down) and poll idle jobs; events do
neither.
"""

import logging
import threading
from typing import Any, Final

import kopf

from kiln.api import constants
from kiln_operator import config, kube, metrics, objects, reconciler, retention, workqueue

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
    client, cfg = memo["kube"], memo["config"]

    @metrics.instrumented("reconcile")
    def work(key: tuple[str, str], repair: bool) -> None:
        reconciler.reconcile(client, cfg, *key, repair=repair)

    queue = workqueue.WorkQueue(work)
    queue.start()
    memo["queue"] = queue
    stop = threading.Event()
    memo["resync_stop"] = stop
    args = (queue.add, stop, float(memo.get("resync_seconds", RESYNC_SECONDS)))
    threading.Thread(target=reconciler.resync_forever, args=args, name="kiln-resync", daemon=True).start()


@kopf.on.cleanup()
def stop_resync(memo: kopf.Memo, **_: Any) -> None:
    """End the periodic resync and the reconcile workers with the operator."""
    stop, queue = memo.get("resync_stop"), memo.get("queue")
    if isinstance(stop, threading.Event):
        stop.set()
    if isinstance(queue, workqueue.WorkQueue):
        queue.stop()


def _queue(memo: kopf.Memo) -> workqueue.WorkQueue:
    queue = memo.get("queue")
    if not isinstance(queue, workqueue.WorkQueue):
        raise kopf.TemporaryError("the operator is still starting", delay=1)
    return queue


@kopf.on.probe(id="trainingjobs")
def report_tracked_jobs(**_: Any) -> int:
    """Shown by the liveness endpoint: how many TrainingJobs this operator tracks."""
    return metrics.tracked_jobs()


@kopf.on.event(*TRAININGJOBS)
@metrics.instrumented("track_training_job")
def track_training_job(
    event: kopf.RawEvent, body: kopf.Body, name: str, namespace: str | None, memo: kopf.Memo, **_: Any
) -> None:
    """Every TrainingJob event, level-triggered: a new job (no status yet) gets its trainer objects; a job
    seen when the operator starts (kopf's initial listing: no event type) is reconciled; an edit not yet
    observed, or a reported model, is reconciled. Keeps the per-phase and per-job gauges current too (an
    acknowledgement silences the job's alerts at once).

    No kopf.on.create/update/resume/delete: those make kopf copy every TrainingJob on every event and write
    its progress and diff-base annotations to each (API writes before and after the Job), while
    observedGeneration already says which edit the operator has applied.
    """
    client, cfg, namespace = _context(memo, namespace)
    if event.get("type") == "DELETED":
        reconciler.forget(namespace, name)
        return
    if retention.follow(client, cfg, body):
        return
    reconciler.remember(namespace, name)
    current = body.get("status") or {}
    metrics.record_phase(namespace, name, current.get("phase"))
    if not current.get("phase"):
        reconciler.start_training(client, cfg, body)
        _queue(memo).add((namespace, name))  # the trainer's Role and the first status follow
        return
    reconciler.publish_conditions(body)
    if event.get("type") is None or reconciler.needs_reconcile(body):
        _queue(memo).add((namespace, name))


def _reconcile_owner(labels: kopf.Labels, namespace: str | None, memo: kopf.Memo, repair: bool = False) -> None:
    """Queue a reconcile of the child's TrainingJob (workqueue: coalesced, after creations)."""
    owner = labels.get(constants.LABEL_TRAININGJOB)
    if owner and namespace:
        _queue(memo).add((namespace, owner), repair)


# The child handlers only queue a key, so they are async: kopf calls them on its event loop, without the
# hop to its thread pool that a sync handler costs on every event.


@kopf.on.event("batch", "v1", "jobs", labels=CHILD_LABELS)
@metrics.instrumented("track_trainer_job")
async def track_trainer_job(labels: kopf.Labels, namespace: str | None, memo: kopf.Memo, **_: Any) -> None:
    """A trainer Job changed (pods started, succeeded, failed, suspended, finished or removed)."""
    _reconcile_owner(labels, namespace, memo)


@kopf.on.event("v1", "pods", labels=CHILD_LABELS)
@metrics.instrumented("track_child_pod")
async def track_child_pod(labels: kopf.Labels, namespace: str | None, memo: kopf.Memo, **_: Any) -> None:
    """A trainer or server pod changed: running, restarted, failed, waiting on an image or a node."""
    _reconcile_owner(labels, namespace, memo)


@kopf.on.event("apps", "v1", "deployments", labels=CHILD_LABELS)
@metrics.instrumented("track_serving_deployment")
async def track_serving_deployment(labels: kopf.Labels, namespace: str | None, memo: kopf.Memo, **_: Any) -> None:
    """The serving Deployment changed: replicas became available, or a rollout stalled."""
    _reconcile_owner(labels, namespace, memo)


@kopf.on.event("v1", "services", labels=CHILD_LABELS)
@kopf.on.event("v1", "serviceaccounts", labels=CHILD_LABELS)
@kopf.on.event("rbac.authorization.k8s.io", "v1", "roles", labels=CHILD_LABELS)
@kopf.on.event("rbac.authorization.k8s.io", "v1", "rolebindings", labels=CHILD_LABELS)
@metrics.instrumented("repair_deleted_child")
async def repair_deleted_child(event: kopf.RawEvent, labels: kopf.Labels, namespace: str | None,
                               memo: kopf.Memo, **_: Any) -> None:  # fmt: skip
    """A child the operator otherwise only creates was deleted (by hand, or by another controller): re-create
    it, and re-read the status (a deleted serving Service is re-applied and the endpoint reported again)."""
    if event.get("type") == "DELETED":
        _reconcile_owner(labels, namespace, memo, repair=True)
