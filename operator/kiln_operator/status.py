"""What a TrainingJob's status should say, computed from what is observed: pure functions, no API calls.

The operator owns phase, conditions, restarts, startTime, completionTime, endpoint and observedGeneration;
the trainer owns progress, lastCheckpoint, metrics, warnings and model. `status_patch` returns a merge
patch of the operator's fields only, and only of those that changed, so the trainer's writes are never
clobbered and an unchanged observation writes nothing.

Phases: Pending (no trainer pod has run yet, or the Job is missing) -> Running (kept while no worker is seen
running for a while: a retried or re-created worker, a pod's status lagging behind it) -> Exporting (the
Job is complete; waiting for status.model, then for the first serving replica) -> Serving (the model is
served; an outage later is Ready=False with a reason, the phase stays) or Succeeded (serving disabled, or
serving.replicas is 0). Failed when the Job failed (a specific reason), the model was not reported within
the export deadline, or the spec can never work; Failed is terminal. Suspended while runPolicy.suspend holds
the Job; Pending, with a Suspended condition of reason Queued, while Kueue has not admitted it
(AdmissionPending: another controller holds it). restarts counts retries: replacement pods of an index plus
in-place container restarts (pods the Job kills when it ends are not retries).

Conditions, one per type (api.ConditionType), follow the API conventions: Succeeded (trained and compiled:
status.model is reported), Ready (serving available), Failed, plus the steps Created, Running, Suspended and
Trained. completionTime is set once, when Succeeded or Failed first becomes true.
"""

import dataclasses
from collections.abc import Iterable, Mapping, Sequence
from datetime import UTC, datetime
from typing import Any, Final, Generic, Literal, TypeVar

from kiln import api
from kiln.api import constants
from kiln_operator import objects, pod_status

Manifest = dict[str, Any]
Body = Mapping[str, Any]

# What the observation says about training (from the Job) and about serving (from the Deployment).
TrainingState = Literal["Missing", "Pending", "Queued", "Running", "Suspended", "Succeeded", "Failed"]
ServingState = Literal["Disabled", "NotExported", "ScaledToZero", "RollingOut", "Available", "Stalled"]
State = TypeVar("State", TrainingState, ServingState)
RFC3339: Final = "%Y-%m-%dT%H:%M:%SZ"


@dataclasses.dataclass(frozen=True)
class Verdict(Generic[State]):
    """One aspect (training or serving) of a job: a state plus a CamelCase reason and a message."""

    state: State
    reason: str
    message: str


Training = Verdict[TrainingState]
Serving = Verdict[ServingState]


@dataclasses.dataclass(frozen=True)
class Observation:
    """Everything the status is computed from, as read from the API server."""

    name: str
    namespace: str
    generation: int | None
    status: Body
    serving_enabled: bool
    serving_replicas: int
    job: Body | None = None
    trainer_pods: Sequence[Body] = ()
    deployment: Body | None = None
    serving_pods: Sequence[Body] = ()
    # runPolicy.ttlSecondsAfterFinished is set: a vanished Job that was created had finished.
    ttl_after_finished: bool = False
    # How long after training a missing status.model fails the job (None: wait forever).
    export_deadline_seconds: int | None = None
    # The children were applied from this generation's spec in this reconcile (observedGeneration may move).
    children_current: bool = True
    # This job's folder on the artifacts volume (objects.artifacts_dir).
    artifacts_path: str | None = None


def now_rfc3339() -> str:
    return datetime.now(UTC).strftime(RFC3339)


def _true_conditions(obj: Body | None) -> dict[str, Body]:
    conditions = ((obj or {}).get("status") or {}).get("conditions") or []
    return {c["type"]: c for c in conditions if c.get("status") == "True"}


def _by_type(conditions: Iterable[Body] | None) -> dict[str, Body]:
    return {c["type"]: c for c in conditions or ()}


def training_failure(job_failed: Body, pods: Sequence[Body]) -> Training:
    """A specific reason and a message naming the pod, container, exit code and the end of its message."""
    job_reason = job_failed.get("reason") or ""
    job_message = job_failed.get("message") or "the trainer Job failed"
    exits = pod_status.terminations(pods)
    config_error = next((t for t in exits if t.exit_code == constants.EXIT_CONFIG_ERROR), None)
    oom = next((t for t in exits if t.reason == "OOMKilled"), None)
    latest = exits[-1] if exits else None
    if config_error or (job_reason == "PodFailurePolicy" and f"exit code {constants.EXIT_CONFIG_ERROR}" in job_message):
        reason, culprit = "InvalidConfig", config_error
    elif job_reason == "DeadlineExceeded":
        reason, culprit = job_reason, latest
    elif oom:
        reason, culprit = "OOMKilled", oom
    else:
        reason, culprit = job_reason or "TrainerFailed", latest
    message = f"{job_message.rstrip('.')}; {culprit.describe()}" if culprit else job_message
    return Training("Failed", reason, message)


def _training_without_job(status: Body, ttl_after_finished: bool) -> Training:
    """A removed Job (ttlSecondsAfterFinished, or deleted by hand) must not undo what was already known, and
    a Job removed by its TTL (only finished Jobs are) must never be re-created: that would train again."""
    conditions = _by_type(status.get("conditions"))
    failed, trained = conditions.get("Failed") or {}, conditions.get("Trained") or {}
    if failed.get("status") == "True":
        return Training("Failed", failed.get("reason") or "TrainerFailed", failed.get("message") or "")
    if status.get("model") or trained.get("status") == "True":
        return Training("Succeeded", "JobComplete", trained.get("message") or "the trainer Job finished")
    if ttl_after_finished and (conditions.get("Created") or {}).get("status") == "True":
        return Training(
            "Failed",
            "TrainerJobRemoved",
            "the trainer Job was removed by runPolicy.ttlSecondsAfterFinished before its outcome was seen and no "
            "model was reported; create a new TrainingJob to train again",
        )
    return Training("Missing", "TrainerJobMissing", "the trainer Job does not exist yet")


def _is_running(pod: Body) -> bool:
    alive = (pod.get("status") or {}).get("phase") == "Running"
    return alive and not (pod.get("metadata") or {}).get("deletionTimestamp")


def _suspended(job: Body) -> Training:
    """Who holds a suspended Job: the user (runPolicy.suspend), Kueue's queue, or another controller."""
    if objects.suspended_by_user(job):
        return Training(
            "Suspended",
            "SuspendedByUser",
            "runPolicy.suspend is true: trainer pods are stopped; training resumes from the last checkpoint",
        )
    if objects.is_queued(job):
        queue = job["metadata"]["labels"][constants.KUEUE_QUEUE_LABEL]
        return Training("Queued", "Queued", f"waiting in LocalQueue {queue} for Kueue to admit the trainer Job")
    return Training(
        "Queued", "AdmissionPending", "the trainer Job is suspended by another controller; it starts when resumed"
    )


def assess_training(job: Body | None, pods: Sequence[Body], status: Body, ttl_after_finished: bool = False) -> Training:
    """Training's state from the Job's conditions (never by their order) and its pods; the stored `status` says
    whether a worker already ran."""
    if job is None:
        return _training_without_job(status, ttl_after_finished)
    conditions = _true_conditions(job)
    workers = (job.get("spec") or {}).get("completions") or 1
    job_status = job.get("status") or {}
    failed = conditions.get("Failed") or conditions.get("FailureTarget")
    if failed:
        return training_failure(failed, pods)
    if "Complete" in conditions or "SuccessCriteriaMet" in conditions:
        return Training("Succeeded", "JobComplete", f"all {workers} worker(s) succeeded")
    if (job.get("spec") or {}).get("suspend"):
        return _suspended(job)
    running = [p for p in pods if _is_running(p)]
    # A pod that exited 0 before the Job controller counted it (status.succeeded, Complete lag behind the pod)
    # still means training ran: Running, never back to Pending.
    finished = [p for p in pods if (p.get("status") or {}).get("phase") == "Succeeded"]
    if running or finished or job_status.get("ready") or job_status.get("succeeded"):
        count = max(len(running), job_status.get("ready") or 0)
        if count == 0:
            done = max(len(finished), job_status.get("succeeded") or 0)
            return Training("Running", "TrainerFinishing", f"{done} of {workers} worker(s) finished")
        return Training("Running", "TrainerRunning", f"{count} of {workers} worker(s) running")
    # The stored phase is the authority on whether training started: Running is written only from a read in
    # which a worker ran, and every reconcile (a new leader's first included) reads it live. Pods and Job
    # counts can show no worker for a while after that (a replacement pod, a pod being deleted, Job.status
    # lagging its pods), and that is a retry, not a job that never started: Running, never back to Pending.
    if status.get("phase") == "Running":
        waiting = pod_status.waiting_message(pods)
        return Training(
            "Running", "TrainerRestarting", waiting or f"0 of {workers} worker(s) running; the Job starts them again"
        )
    return Training(
        "Pending", "TrainerPending", pod_status.waiting_message(pods) or "waiting for trainer pods to start"
    )


def assess_serving(obs: Observation, endpoint: str) -> Serving:
    """Serving's state from the Deployment: available, rolling out, or stalled past its progress deadline.
    A stalled rollout is not a failure of the job (a serving.* edit can fix it): it is Ready=False."""
    if not obs.serving_enabled:
        return Serving("Disabled", "ServingDisabled", "serving.enabled is false")
    if not obs.status.get("model"):
        return Serving("NotExported", "NotExported", "waiting for a compiled model")
    if obs.serving_replicas == 0:
        return Serving("ScaledToZero", "ScaledToZero", "serving.replicas is 0; the Deployment is kept to scale up")
    if obs.deployment is None:
        return Serving("RollingOut", "DeploymentMissing", "creating the serving Deployment")
    dep_status = obs.deployment.get("status") or {}
    available, ready = dep_status.get("availableReplicas") or 0, dep_status.get("readyReplicas") or 0
    replicas = (obs.deployment.get("spec") or {}).get("replicas", obs.serving_replicas)
    progressing = _by_type(dep_status.get("conditions")).get("Progressing") or {}
    stalled = progressing.get("status") == "False" and progressing.get("reason") == "ProgressDeadlineExceeded"
    if available >= 1:
        note = f"; the newest rollout is stuck: {progressing.get('message', '')}" if stalled else ""
        return Serving(
            "Available", "DeploymentAvailable", f"{available}/{replicas} replica(s) available at {endpoint}{note}"
        )
    details = pod_status.waiting_message(obs.serving_pods)
    if stalled:
        message = progressing.get("message") or "progress deadline exceeded"
        return Serving("Stalled", "ServingRolloutFailed", f"{message}; {details}" if details else message)
    return Serving("RollingOut", "RollingOut", details or f"{ready}/{replicas} replica(s) ready")


def decide_phase(training: Training, has_model: bool, serving: Serving, before: api.Phase | None) -> api.Phase:
    """The one-word summary; the conditions carry the detail. Once serving (or succeeded), a serving outage
    or a rollout keeps the phase (Ready=False says why), so the phase never flaps with availability."""
    if training.state == "Failed":
        return "Failed"
    if training.state == "Suspended":
        return "Suspended"
    if training.state in ("Missing", "Pending", "Queued"):
        return "Pending"
    if training.state == "Running":
        return "Running"
    if not has_model:
        return "Exporting"
    if serving.state in ("Disabled", "ScaledToZero"):
        return "Succeeded"
    if serving.state == "Available":
        return "Serving"
    return "Serving" if before in ("Serving", "Succeeded") else "Exporting"


def condition(
    previous: Mapping[str, Body],
    type_: api.ConditionType,
    true: bool,
    reason: str,
    message: str,
    now: str,
    generation: int | None,
) -> Manifest:
    """A condition whose lastTransitionTime moves only when its status changes."""
    status: api.ConditionStatus = "True" if true else "False"
    before = previous.get(type_) or {}
    changed = before.get("status") != status or not before.get("lastTransitionTime")
    typed = api.Condition(
        type=type_,
        status=status,
        reason=reason,
        message=message,
        last_transition_time=now if changed else before["lastTransitionTime"],
        observed_generation=generation,
    )
    return typed.to_dict()


def is_failed(current: Body) -> bool:
    """Whether the job is Failed: terminal, so nothing is created or rolled out for it any more."""
    return (_by_type(current.get("conditions")).get("Failed") or {}).get("status") == "True"


def rolled_out(deployment: Body | None) -> bool:
    """Whether the serving Deployment's controller has seen its latest spec (no Deployment: nothing to see)."""
    if deployment is None:
        return True
    observed = (deployment.get("status") or {}).get("observedGeneration") or 0
    return bool(observed >= ((deployment.get("metadata") or {}).get("generation") or 0))


def _model_message(model: Body | None) -> str:
    if not model:
        return ""
    text = f"{model.get('variant', '?')} at {model.get('uri', '?')}"
    if model.get("accuracy") is not None:
        text += f" (accuracy {float(model['accuracy']):.4f})"
    return text


def _seconds_between(earlier: str | None, later: str) -> float | None:
    if not earlier:
        return None
    return (datetime.strptime(later, RFC3339) - datetime.strptime(earlier, RFC3339)).total_seconds()


def _export_overdue(previous: Mapping[str, Body], deadline: int | None, now: str) -> Training | None:
    """Failed once training ended longer than the export deadline ago and still no model was reported."""
    trained = previous.get("Trained") or {}
    waited = _seconds_between(trained.get("lastTransitionTime"), now) if trained.get("status") == "True" else None
    if deadline is None or waited is None or waited < deadline:
        return None
    return Training(
        "Failed",
        "ExportDeadlineExceeded",
        f"training finished {int(waited)}s ago but the trainer never reported status.model (deadline {deadline}s, "
        "the operator's exportDeadlineSeconds); see the trainer pod's log, then create a new TrainingJob",
    )


def assess(obs: Observation, now: str) -> Manifest:
    """The operator-owned status fields the observation calls for.

    Failed is terminal: once true it is kept with its reason whatever is observed later. completionTime is
    written once, when Succeeded or Failed first becomes true. observedGeneration (top level and in each
    condition) moves to the spec's generation only when `obs.children_current` says the children reflect it.
    """
    current = obs.status
    previous = _by_type(current.get("conditions"))
    url = objects.endpoint(obs.name, obs.namespace)
    model = current.get("model") or None
    before_failed = previous.get("Failed") or {}
    if before_failed.get("status") == "True":
        training = Training("Failed", before_failed.get("reason") or "Failed", before_failed.get("message") or "")
    else:
        training = assess_training(obs.job, obs.trainer_pods, current, obs.ttl_after_finished)
        if training.state == "Succeeded" and not model:
            training = _export_overdue(previous, obs.export_deadline_seconds, now) or training
    if training.state == "Failed":
        serving = Serving("NotExported", "JobFailed", "the job failed; nothing is served")
    else:
        serving = assess_serving(obs, url)
    phase = decide_phase(training, model is not None, serving, current.get("phase"))
    gen = obs.generation if obs.children_current else current.get("observedGeneration")
    failed, suspended = training.state == "Failed", training.state == "Suspended"
    before_trained = previous.get("Trained") or {}
    trained = training.state == "Succeeded" or (failed and before_trained.get("status") == "True")
    trained_message = training.message if training.state == "Succeeded" else before_trained.get("message", "")
    succeeded = model is not None and not failed
    created = obs.job is not None or trained or failed
    job_ref = f"Job {objects.job_name(obs.name)}"

    def cond(type_: api.ConditionType, true: bool, reason: str, message: str) -> Manifest:
        return condition(previous, type_, true, reason, message, now, gen)

    if succeeded:
        outcome = cond("Succeeded", True, "ModelReported", _model_message(model))
    elif trained and not failed:
        outcome = cond("Succeeded", False, "WaitingForModel", "waiting for the trainer to report status.model")
    else:
        outcome = cond("Succeeded", False, training.reason if failed else "NotTrained", "training has not finished")
    conditions = [
        cond(
            "Created",
            created,
            "TrainerJobCreated" if created else "TrainerJobMissing",
            f"{job_ref} created" if created else f"{job_ref} does not exist yet",
        ),
        cond("Running", training.state == "Running", training.reason, training.message),
        cond(
            "Suspended",
            suspended or training.state == "Queued",
            training.reason if suspended or training.state == "Queued" else "NotSuspended",
            training.message if suspended or training.state == "Queued" else "",
        ),
        cond(
            "Trained",
            trained,
            "JobComplete" if trained else training.reason if failed else "TrainingInProgress",
            trained_message if trained else training.message if failed else "training has not finished",
        ),
        outcome,
        cond("Ready", serving.state == "Available", serving.reason, serving.message),
        cond("Failed", failed, training.reason if failed else "NoFailure", training.message if failed else ""),
    ]
    return {
        "phase": phase,
        "conditions": conditions,
        "startTime": current.get("startTime") or now,
        "completionTime": current.get("completionTime") or (now if succeeded or failed else None),
        "restarts": pod_status.count_restarts(obs.trainer_pods, current.get("restarts")),
        "endpoint": url if serving.state == "Available" else None,
        "observedGeneration": gen,
        "artifactsPath": obs.artifacts_path or current.get("artifactsPath"),
    }


def assess_invalid(status: Body, generation: int | None, message: str, now: str) -> Manifest:
    """A spec that can never work: Failed (terminal) with reason InvalidSpec naming the field, nothing created."""
    previous = _by_type(status.get("conditions"))
    before = previous.get("Failed") or {}
    if before.get("status") == "True":  # terminal: keep the first failure
        message = before.get("message") or message
    reason = before.get("reason") or "InvalidSpec" if before.get("status") == "True" else "InvalidSpec"
    conditions = [
        condition(previous, t, t == "Failed", reason, message if t == "Failed" else "", now, generation)
        for t in api.condition_types()
    ]
    return {
        "phase": "Failed",
        "conditions": conditions,
        "startTime": status.get("startTime") or now,
        "completionTime": status.get("completionTime") or now,
        "observedGeneration": generation,
    }


def status_patch(current: Body, desired: Mapping[str, Any]) -> Manifest:
    """A JSON merge patch from current to desired over the desired keys only (None removes a key)."""
    patch: Manifest = {}
    for key, value in desired.items():
        if value is None:
            if current.get(key) is not None:
                patch[key] = None
        elif current.get(key) != value:
            patch[key] = value
    return patch
