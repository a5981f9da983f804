"""What a TrainingJob's status should say, computed from what is observed: pure functions, no API calls.

The operator owns phase, conditions, restarts, startTime, completionTime, endpoint and observedGeneration;
the trainer owns progress, lastCheckpoint, metrics, warnings and model. `status_patch` returns a merge
patch of the operator's fields only, and only of those that changed, so the trainer's writes are never
clobbered and an unchanged observation writes nothing.

Phases: Pending (no trainer pod running yet, or the Job is being re-created) -> Running -> Exporting (the
Job is complete; waiting for status.model, then for the serving Deployment to become available) ->
Serving (at least one replica available) or Succeeded (serving disabled, or serving.replicas is 0:
nothing to route to, so no endpoint). Failed when the Job failed (a specific reason) or the serving
rollout exceeded its progress deadline; Suspended while runPolicy.suspend holds the Job. completionTime is
set once, on the first of Serving, Succeeded or Failed. restarts counts retries: replacement pods of an
index plus in-place container restarts (pods the Job kills when it ends are not retries).
"""

import dataclasses
from collections.abc import Iterable, Mapping, Sequence
from datetime import UTC, datetime
from typing import Any, Final, Generic, Literal, TypeVar

from kiln import api
from kiln.api import constants
from kiln_operator import objects

Manifest = dict[str, Any]
Body = Mapping[str, Any]

# What the observation says about training (from the Job) and about serving (from the Deployment).
TrainingState = Literal["Missing", "Pending", "Running", "Suspended", "Succeeded", "Failed"]
ServingState = Literal["Disabled", "NotExported", "ScaledToZero", "RollingOut", "Available", "Failed"]
State = TypeVar("State", TrainingState, ServingState)
FINAL_PHASES: Final[tuple[api.Phase, ...]] = ("Serving", "Succeeded", "Failed")
# Reasons of a Failed condition that are not about training, so a removed Job does not turn them into one.
NON_TRAINING_FAILURES: Final = ("ServingRolloutFailed", "InvalidSpec")
TAIL_LINES: Final = 5
TAIL_CHARS: Final = 1024
# Waiting reasons that are normal steps of a pod's start, not worth reporting.
ROUTINE_WAITING: Final = ("ContainerCreating", "PodInitializing")
COMPLETION_INDEX: Final = "batch.kubernetes.io/job-completion-index"


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


def now_rfc3339() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _true_conditions(obj: Body | None) -> dict[str, Body]:
    conditions = ((obj or {}).get("status") or {}).get("conditions") or []
    return {c["type"]: c for c in conditions if c.get("status") == "True"}


def _by_type(conditions: Iterable[Body] | None) -> dict[str, Body]:
    return {c["type"]: c for c in conditions or ()}


def _tail(text: str | None) -> str:
    """The last few lines of a termination message: where a traceback says what went wrong."""
    lines = [line for line in (text or "").strip().splitlines() if line.strip()]
    return "\n".join(lines[-TAIL_LINES:])[-TAIL_CHARS:]


@dataclasses.dataclass(frozen=True)
class Termination:
    """A container that exited non-zero."""

    pod: str
    container: str
    exit_code: int
    reason: str
    message: str
    finished_at: str

    def describe(self) -> str:
        text = f"pod {self.pod} container {self.container} exited with code {self.exit_code} ({self.reason})"
        return f"{text}: {_tail(self.message)}" if self.message.strip() else text


def terminations(pods: Iterable[Body]) -> list[Termination]:
    """Non-zero exits of every container, current or previous, oldest first."""
    found = []
    for pod in pods:
        meta = pod.get("metadata") or {}
        pod_ref = f"{meta.get('namespace', '')}/{meta.get('name', '')}"
        for cs in (pod.get("status") or {}).get("containerStatuses") or []:
            for state in (cs.get("state") or {}, cs.get("lastState") or {}):
                term = state.get("terminated")
                if term and term.get("exitCode", 0) != 0:
                    found.append(
                        Termination(
                            pod_ref,
                            cs.get("name", ""),
                            int(term["exitCode"]),
                            term.get("reason") or "Error",
                            term.get("message") or "",
                            term.get("finishedAt") or "",
                        )
                    )
    return sorted(found, key=lambda t: t.finished_at)


def waiting_message(pods: Iterable[Body], limit: int = 3) -> str:
    """Why pods are not running yet: unschedulable, image pull errors, crash loops."""
    notes = []
    for pod in pods:
        name, status = (pod.get("metadata") or {}).get("name", ""), pod.get("status") or {}
        for cond in status.get("conditions") or []:
            if cond.get("type") == "PodScheduled" and cond.get("status") == "False":
                notes.append(f"pod {name}: {cond.get('reason', 'Unschedulable')}: {cond.get('message', '')}".rstrip())
        for cs in status.get("containerStatuses") or []:
            waiting = (cs.get("state") or {}).get("waiting")
            if waiting and waiting.get("reason") not in ROUTINE_WAITING:
                note = f"pod {name}: container {cs.get('name')} {waiting.get('reason')}: {waiting.get('message', '')}"
                notes.append(note.rstrip(": "))
    return "; ".join(notes[:limit])


def training_failure(job_failed: Body, pods: Sequence[Body]) -> Training:
    """A specific reason and a message naming the pod, container, exit code and the end of its message."""
    job_reason = job_failed.get("reason") or ""
    job_message = job_failed.get("message") or "the trainer Job failed"
    exits = terminations(pods)
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


def _training_without_job(status: Body) -> Training:
    """A removed Job (ttlSecondsAfterFinished, or deleted by hand) must not undo what was already known."""
    conditions = _by_type(status.get("conditions"))
    failed, trained = conditions.get("Failed") or {}, conditions.get("Trained") or {}
    if failed.get("status") == "True" and failed.get("reason") not in NON_TRAINING_FAILURES:
        return Training("Failed", failed.get("reason") or "TrainerFailed", failed.get("message") or "")
    if status.get("model") or trained.get("status") == "True":
        return Training("Succeeded", "JobComplete", trained.get("message") or "the trainer Job finished")
    return Training("Missing", "TrainerJobMissing", "the trainer Job does not exist yet")


def _is_running(pod: Body) -> bool:
    alive = (pod.get("status") or {}).get("phase") == "Running"
    return alive and not (pod.get("metadata") or {}).get("deletionTimestamp")


def assess_training(job: Body | None, pods: Sequence[Body], status: Body) -> Training:
    """Training's state from the Job's conditions (never by their order) and its pods."""
    if job is None:
        return _training_without_job(status)
    conditions = _true_conditions(job)
    workers = (job.get("spec") or {}).get("completions") or 1
    job_status = job.get("status") or {}
    failed = conditions.get("Failed") or conditions.get("FailureTarget")
    if failed:
        return training_failure(failed, pods)
    if "Complete" in conditions or "SuccessCriteriaMet" in conditions:
        return Training("Succeeded", "JobComplete", f"all {workers} worker(s) succeeded")
    if (job.get("spec") or {}).get("suspend"):
        return Training(
            "Suspended",
            "SuspendedByUser",
            "runPolicy.suspend is true: trainer pods are stopped; training resumes from the last checkpoint",
        )
    running = [p for p in pods if _is_running(p)]
    if running or job_status.get("ready") or job_status.get("succeeded"):
        count = max(len(running), job_status.get("ready") or 0)
        return Training("Running", "TrainerRunning", f"{count} of {workers} worker(s) running")
    return Training("Pending", "TrainerPending", waiting_message(pods) or "waiting for trainer pods to start")


def assess_serving(obs: Observation, endpoint: str) -> Serving:
    """Serving's state from the Deployment: available, rolling out, or failed past its progress deadline."""
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
    details = waiting_message(obs.serving_pods)
    if stalled:
        message = progressing.get("message") or "progress deadline exceeded"
        return Serving("Failed", "ServingRolloutFailed", f"{message}; {details}" if details else message)
    return Serving("RollingOut", "RollingOut", details or f"{ready}/{replicas} replica(s) ready")


def decide_phase(training: Training, has_model: bool, serving: Serving) -> api.Phase:
    """The one-word summary; the conditions carry the detail."""
    if training.state == "Failed":
        return "Failed"
    if training.state == "Suspended":
        return "Suspended"
    if training.state in ("Missing", "Pending"):
        return "Pending"
    if training.state == "Running":
        return "Running"
    if not has_model:
        return "Exporting"
    if serving.state == "Failed":
        return "Failed"
    if serving.state in ("Disabled", "ScaledToZero"):
        return "Succeeded"
    return "Serving" if serving.state == "Available" else "Exporting"


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


def count_restarts(pods: Iterable[Body], previous: int | None) -> int:
    """Retries so far: replacement pods (an index with n pods was retried n - 1 times) plus in-place container
    restarts. Pods the Job kills when it ends (failed or past its deadline) are not retries. Never decreases,
    so it survives the removal of old pods.
    """
    per_index: dict[str, int] = {}
    in_place = 0
    for pod in pods:
        meta = pod.get("metadata") or {}
        index = (meta.get("labels") or {}).get(COMPLETION_INDEX) or (meta.get("annotations") or {}).get(
            COMPLETION_INDEX, meta.get("name", "")
        )
        per_index[index] = per_index.get(index, 0) + 1
        in_place += sum(cs.get("restartCount") or 0 for cs in (pod.get("status") or {}).get("containerStatuses") or [])
    return max(previous or 0, in_place + sum(n - 1 for n in per_index.values()))


def _model_message(model: Body | None) -> str:
    if not model:
        return ""
    text = f"{model.get('variant', '?')} at {model.get('uri', '?')}"
    if model.get("accuracy") is not None:
        text += f" (accuracy {float(model['accuracy']):.4f})"
    return text


def assess(obs: Observation, now: str) -> Manifest:
    """The operator-owned status fields the observation calls for."""
    current, gen = obs.status, obs.generation
    url = objects.endpoint(obs.name, obs.namespace)
    training = assess_training(obs.job, obs.trainer_pods, current)
    model = current.get("model") or None
    serving = assess_serving(obs, url)
    phase = decide_phase(training, model is not None, serving)
    previous = _by_type(current.get("conditions"))
    trained, failed = training.state == "Succeeded", training.state == "Failed"
    suspended = training.state == "Suspended"
    created = obs.job is not None or trained or failed
    job_ref = f"Job {objects.job_name(obs.name)}"
    failure = training if failed else serving if serving.state == "Failed" else None

    def cond(type_: api.ConditionType, true: bool, reason: str, message: str) -> Manifest:
        return condition(previous, type_, true, reason, message, now, gen)

    if model:
        exported = cond("Exported", True, "ModelReported", _model_message(model))
    elif trained:
        exported = cond("Exported", False, "WaitingForModel", "waiting for the trainer to report status.model")
    else:
        exported = cond("Exported", False, "NotTrained", "training has not finished")
    conditions = [
        cond(
            "Created",
            created,
            "TrainerJobCreated" if created else "TrainerJobMissing",
            f"{job_ref} created" if created else f"{job_ref} does not exist yet",
        ),
        cond("Running", training.state == "Running", training.reason, training.message),
        cond(
            "Trained",
            trained,
            training.reason if trained or failed else "TrainingInProgress",
            training.message if trained or failed else "training has not finished",
        ),
        exported,
        cond("Serving", serving.state == "Available", serving.reason, serving.message),
        cond(
            "Failed",
            failure is not None,
            failure.reason if failure else "NoFailure",
            failure.message if failure else "",
        ),
        cond(
            "Suspended",
            suspended,
            "SuspendedByUser" if suspended else "NotSuspended",
            training.message if suspended else "",
        ),
    ]
    completion = current.get("completionTime") or (now if phase in FINAL_PHASES else None)
    return {
        "phase": phase,
        "conditions": conditions,
        "startTime": current.get("startTime") or now,
        "completionTime": completion,
        "restarts": count_restarts(obs.trainer_pods, current.get("restarts")),
        "endpoint": url if serving.state == "Available" else None,
        "observedGeneration": gen,
    }


def assess_invalid(status: Body, generation: int | None, message: str, now: str) -> Manifest:
    """A spec that can never work: Failed with reason InvalidSpec, nothing created."""
    previous = _by_type(status.get("conditions"))
    conditions = [
        condition(previous, t, t == "Failed", "InvalidSpec", message if t == "Failed" else "", now, generation)
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
