"""Status logic over Job, Pod and Deployment objects shaped as the API server reports them."""

from typing import Any

from kiln import api
from kiln_operator import objects, reconciler, status

T0, T1, T2, NOW = "2026-11-28T10:00:00Z", "2026-11-28T10:05:00Z", "2026-11-28T10:09:00Z", "2026-11-28T10:10:00Z"
MODEL = {"variant": "int8-static", "uri": "/artifacts/team-a/digits/models/int8-static/model.onnx",
         "sha256": "ab" * 32, "sizeBytes": 120_000, "accuracy": 0.9712, "latencyMs": 1.8}  # fmt: skip
TRACEBACK = "\n".join(
    ["Traceback (most recent call last):", '  File "/app/kiln_trainer/data.py", line 88, in load', "    ...",
     "  line a", "  line b", "  line c", "kiln_trainer.errors.DataError: data.path: /data/cifar: no such folder"]
)  # fmt: skip
COMPLETE = [
    {"type": "SuccessCriteriaMet", "status": "True", "reason": "CompletionsReached",
     "message": "Reached expected number of succeeded pods", "lastProbeTime": T2, "lastTransitionTime": T2},
    {"type": "Complete", "status": "True", "reason": "CompletionsReached",
     "message": "Reached expected number of succeeded pods", "lastProbeTime": T2, "lastTransitionTime": T2},
]  # fmt: skip


def failed(reason: str, message: str) -> list[dict[str, Any]]:
    return [{"type": t, "status": "True", "reason": reason, "message": message, "lastProbeTime": T2,
             "lastTransitionTime": T2} for t in ("FailureTarget", "Failed")]  # fmt: skip


def job(workers: int = 1, conditions: list[dict[str, Any]] | None = None, suspend: bool = False,
        **counts: int) -> dict[str, Any]:  # fmt: skip
    return {
        "apiVersion": "batch/v1",
        "kind": "Job",
        "metadata": {"name": "digits-trainer", "namespace": "team-a", "generation": 1,
                     "labels": {"kiln.dev/trainingjob": "digits", "app.kubernetes.io/component": "trainer"}},
        "spec": {"completions": workers, "parallelism": workers, "completionMode": "Indexed",
                 "backoffLimit": 3 * workers, "suspend": suspend},
        "status": {"startTime": T0, **counts, **({"conditions": conditions} if conditions else {})},
    }  # fmt: skip


def running() -> dict[str, Any]:
    return {"running": {"startedAt": T1}}


def terminated(code: int, reason: str, message: str = "", finished: str = T2) -> dict[str, Any]:
    return {"terminated": {"exitCode": code, "reason": reason, "message": message, "startedAt": T1,
                           "finishedAt": finished, "containerID": "containerd://4f1c"}}  # fmt: skip


def waiting(reason: str, message: str) -> dict[str, Any]:
    return {"waiting": {"reason": reason, "message": message}}


def pod(name: str, phase: str, state: dict[str, Any] | None = None, *, container: str = "trainer",
        restarts: int = 0, last_state: dict[str, Any] | None = None,
        conditions: list[dict[str, Any]] | None = None) -> dict[str, Any]:  # fmt: skip
    statuses = []
    if state is not None:
        alive = "running" in state
        statuses = [{"name": container, "ready": alive, "restartCount": restarts, "state": state,
                     "lastState": last_state or {}, "image": "kiln-trainer:0.1.0", "started": alive}]  # fmt: skip
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {
            "name": name,
            "namespace": "team-a",
            "labels": {
                "kiln.dev/trainingjob": "digits",
                "job-name": "digits-trainer",
                "batch.kubernetes.io/job-completion-index": name.split("-")[2],
            },
        },  # fmt: skip
        "status": {"phase": phase, "conditions": conditions or [], "containerStatuses": statuses},
    }


def deployment(available: int, ready: int | None = None, stalled: bool = False) -> dict[str, Any]:
    progressing = (
        {"type": "Progressing", "status": "False", "reason": "ProgressDeadlineExceeded",
         "message": 'ReplicaSet "digits-serving-6d5f8" has timed out progressing.'}
        if stalled else
        {"type": "Progressing", "status": "True", "reason": "NewReplicaSetAvailable",
         "message": 'ReplicaSet "digits-serving-6d5f8" has successfully progressed.'}
    )  # fmt: skip
    return {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": {"name": "digits-serving", "namespace": "team-a", "generation": 1},
        "spec": {"replicas": 2},
        "status": {"observedGeneration": 1, "replicas": 2, "readyReplicas": ready if ready is not None else available,
                   "availableReplicas": available, "conditions": [progressing]},
    }  # fmt: skip


def observe(current: dict[str, Any] | None = None, **parts: Any) -> status.Observation:
    return status.Observation(
        name="digits", namespace="team-a", generation=parts.pop("generation", 1), status=current or {},
        serving_enabled=parts.pop("serving_enabled", True), serving_replicas=parts.pop("replicas", 2), **parts,
    )  # fmt: skip


def conditions_of(desired: dict[str, Any]) -> dict[str, dict[str, Any]]:
    found = {c["type"]: c for c in desired["conditions"]}
    assert list(found) == list(api.condition_types())
    return found


def test_a_single_worker_is_pending_until_its_pod_runs_then_running() -> None:
    pending = status.assess(observe(job=job(active=1), trainer_pods=[pod("digits-trainer-0-x7k2p", "Pending")]), NOW)
    assert pending["phase"] == "Pending" and pending["startTime"] == NOW
    assert conditions_of(pending)["Created"]["status"] == "True"
    assert conditions_of(pending)["Running"]["status"] == "False"
    pods = [pod("digits-trainer-0-x7k2p", "Running", running())]
    now_running = status.assess(observe(pending, job=job(active=1, ready=1), trainer_pods=pods), NOW)
    assert now_running["phase"] == "Running" and now_running["startTime"] == NOW
    assert conditions_of(now_running)["Running"] | {"lastTransitionTime": None} == {
        "type": "Running", "status": "True", "reason": "TrainerRunning", "message": "1 of 1 worker(s) running",
        "lastTransitionTime": None, "observedGeneration": 1,
    }  # fmt: skip
    assert now_running["completionTime"] is None and now_running["endpoint"] is None


def test_a_pod_waiting_for_a_gpu_node_explains_why_the_job_is_pending() -> None:
    unschedulable = {"type": "PodScheduled", "status": "False", "reason": "Unschedulable",
                     "message": "0/3 nodes are available: 3 Insufficient nvidia.com/gpu."}  # fmt: skip
    pods = [pod("digits-trainer-0-x7k2p", "Pending", conditions=[unschedulable])]
    desired = status.assess(observe(job=job(active=1), trainer_pods=pods), NOW)
    assert desired["phase"] == "Pending"
    assert conditions_of(desired)["Running"]["message"] == (
        "pod digits-trainer-0-x7k2p: Unschedulable: 0/3 nodes are available: 3 Insufficient nvidia.com/gpu."
    )


def test_an_image_pull_error_is_reported_but_container_creation_is_not() -> None:
    pods = [pod("digits-trainer-0-a", "Pending", waiting("ImagePullBackOff", 'Back-off pulling image "kiln-t:9"')),
            pod("digits-trainer-1-b", "Pending", waiting("ContainerCreating", ""))]  # fmt: skip
    message = conditions_of(status.assess(observe(job=job(2, active=2), trainer_pods=pods), NOW))["Running"]["message"]
    assert message == 'pod digits-trainer-0-a: container trainer ImagePullBackOff: Back-off pulling image "kiln-t:9"'


def test_four_workers_keep_running_while_some_ranks_have_finished() -> None:
    pods = [pod(f"digits-trainer-{i}-x", "Succeeded", terminated(0, "Completed")) for i in (1, 2, 3)]
    pods.append(pod("digits-trainer-0-x", "Running", running()))
    desired = status.assess(observe(job=job(4, active=1, ready=1, succeeded=3), trainer_pods=pods), NOW)
    assert desired["phase"] == "Running"
    assert conditions_of(desired)["Running"]["message"] == "1 of 4 worker(s) running"
    assert conditions_of(desired)["Trained"]["status"] == "False"


def test_a_worker_that_exited_before_the_job_counted_it_keeps_the_job_running_not_pending() -> None:
    # Seen on the real node: the pod is Succeeded while the Job has neither `succeeded` nor Complete yet.
    pods = [pod("digits-trainer-0-x", "Succeeded", terminated(0, "Completed"))]
    before = status.assess(
        observe(job=job(active=1, ready=1), trainer_pods=[pod("digits-trainer-0-x", "Running", running())]), NOW
    )
    desired = status.assess(observe(before, job=job(active=1), trainer_pods=pods), NOW)
    assert desired["phase"] == "Running"
    assert conditions_of(desired)["Running"]["message"] == "1 of 1 worker(s) finished"


def test_a_job_that_ran_stays_running_while_no_worker_is_seen_and_never_goes_back_to_pending() -> None:
    # What a new leader's first look (or any later one) can find once a worker ran: a pod being deleted, a failed
    # worker's replacement not started yet, Job.status.ready back at 0 with the pod not listed.
    ran = status.assess(observe(job=job(active=1, ready=1), trainer_pods=[pod("digits-trainer-0-x", "Running",
                                                                              running())]), T1)  # fmt: skip
    leaving = pod("digits-trainer-0-x", "Running", running())
    leaving["metadata"]["deletionTimestamp"] = T2
    replaced = [pod("digits-trainer-0-x", "Failed", terminated(137, "Error")),
                pod("digits-trainer-0-y", "Pending", waiting("ContainerCreating", ""))]  # fmt: skip
    for seen_job, seen_pods in ((job(active=1), [leaving]), (job(active=1, failed=1), replaced), (job(active=1), [])):
        desired = status.assess(observe(ran, job=seen_job, trainer_pods=seen_pods), NOW)
        assert desired["phase"] == "Running", seen_pods
        running_condition = conditions_of(desired)["Running"]
        assert (running_condition["status"], running_condition["reason"]) == ("True", "TrainerRestarting")
        assert running_condition["lastTransitionTime"] == T1  # the condition never flapped
    assert conditions_of(desired)["Running"]["message"] == "0 of 1 worker(s) running; the Job starts them again"
    # Before any worker ran, the same observation is Pending; suspending still suspends.
    assert status.assess(observe(job=job(active=1), trainer_pods=[]), NOW)["phase"] == "Pending"
    held = job(suspend=True)
    held["metadata"]["annotations"] = {objects.SUSPENDED_BY_USER_ANNOTATION: "true"}
    assert status.assess(observe(ran, job=held), NOW)["phase"] == "Suspended"


def test_four_workers_succeed_only_when_the_job_is_complete_then_wait_for_the_model() -> None:
    pods = [pod(f"digits-trainer-{i}-x", "Succeeded", terminated(0, "Completed")) for i in range(4)]
    desired = status.assess(observe(job=job(4, COMPLETE, succeeded=4), trainer_pods=pods), NOW)
    assert desired["phase"] == "Exporting"
    found = conditions_of(desired)
    assert found["Trained"]["status"] == "True" and found["Trained"]["message"] == "all 4 worker(s) succeeded"
    assert found["Succeeded"]["status"] == "False" and found["Succeeded"]["reason"] == "WaitingForModel"
    assert desired["completionTime"] is None


def test_a_failed_and_replaced_worker_counts_as_a_restart_and_restarts_never_decrease() -> None:
    reset = terminated(1, "Error", "RuntimeError: Connection reset by peer")
    pods = [
        pod("digits-trainer-0-a", "Failed", reset),
        pod("digits-trainer-0-b", "Failed", reset),
        pod("digits-trainer-0-c", "Running", running()),
        pod("digits-trainer-1-d", "Running", running()),
    ]
    desired = status.assess(observe(job=job(2, active=2, ready=2, failed=2), trainer_pods=pods), NOW)
    assert desired["phase"] == "Running" and desired["restarts"] == 2
    later = status.assess(observe({"restarts": 5}, job=job(1, active=1, ready=1, failed=1), trainer_pods=pods), NOW)
    assert later["restarts"] == 5


def test_exit_code_78_fails_with_reason_invalid_config_and_the_end_of_the_termination_message() -> None:
    message = "Container trainer for pod team-a/digits-trainer-0-x7k2p failed with exit code 78 matching FailJob rule"
    pods = [pod("digits-trainer-0-x7k2p", "Failed", terminated(78, "Error", TRACEBACK))]
    desired = status.assess(observe(job=job(1, failed("PodFailurePolicy", message), failed=1), trainer_pods=pods), NOW)
    assert desired["phase"] == "Failed" and desired["completionTime"] == NOW
    failure = conditions_of(desired)["Failed"]
    assert failure["status"] == "True" and failure["reason"] == "InvalidConfig"
    assert "pod team-a/digits-trainer-0-x7k2p container trainer exited with code 78 (Error)" in failure["message"]
    assert failure["message"].endswith("  line a\n  line b\n  line c\n" + TRACEBACK.splitlines()[-1])
    assert "Traceback" not in failure["message"]  # only the last lines
    assert conditions_of(desired)["Trained"]["reason"] == "InvalidConfig"


def test_exit_code_78_is_recognised_from_the_job_message_when_the_pod_is_gone() -> None:
    message = "Container trainer for pod team-a/digits-trainer-0-x7k2p failed with exit code 78 matching FailJob rule"
    desired = status.assess(observe(job=job(1, failed("PodFailurePolicy", message), failed=1)), NOW)
    assert conditions_of(desired)["Failed"]["reason"] == "InvalidConfig"
    assert conditions_of(desired)["Failed"]["message"] == message


def test_an_oom_killed_worker_among_four_fails_with_reason_oom_killed_naming_the_pod() -> None:
    peer_lost = terminated(1, "Error", "gloo: Connection closed by peer")
    pods = [pod("digits-trainer-2-q9", "Failed", terminated(137, "OOMKilled", finished=T1)),
            pod("digits-trainer-0-a1", "Failed", peer_lost)]  # fmt: skip
    conditions = failed("BackoffLimitExceeded", "Job has reached the specified backoff limit")
    desired = status.assess(observe(job=job(4, conditions, failed=12), trainer_pods=pods), NOW)
    failure = conditions_of(desired)["Failed"]
    assert desired["phase"] == "Failed" and failure["reason"] == "OOMKilled"
    assert failure["message"] == (
        "Job has reached the specified backoff limit; "
        "pod team-a/digits-trainer-2-q9 container trainer exited with code 137 (OOMKilled)"
    )
    assert desired["restarts"] == 0  # each index failed once and was not replaced: no retries


def test_pods_killed_when_a_job_ends_are_not_counted_as_restarts() -> None:
    pods = [pod("digits-trainer-0-a", "Failed", terminated(143, "Error")), pod("digits-trainer-1-b", "Failed")]
    conditions = failed("DeadlineExceeded", "Job was active longer than specified deadline")
    assert status.assess(observe(job=job(2, conditions, failed=2), trainer_pods=pods), NOW)["restarts"] == 0


def test_a_plain_crash_fails_with_the_jobs_reason_and_the_latest_exit() -> None:
    pods = [pod("digits-trainer-0-a", "Failed", terminated(1, "Error", "ValueError: boom", finished=T1)),
            pod("digits-trainer-0-b", "Failed", terminated(2, "Error", "ValueError: again", finished=T2))]  # fmt: skip
    desired = status.assess(observe(job=job(1, failed("BackoffLimitExceeded", "Job has reached the specified "
                                                                               "backoff limit"), failed=4),
                                    trainer_pods=pods), NOW)  # fmt: skip
    failure = conditions_of(desired)["Failed"]
    assert failure["reason"] == "BackoffLimitExceeded"
    assert failure["message"].endswith("pod team-a/digits-trainer-0-b container trainer exited with code 2 "
                                       "(Error): ValueError: again")  # fmt: skip


def test_a_deadline_exceeded_job_fails_with_reason_deadline_exceeded() -> None:
    pods = [pod("digits-trainer-0-a", "Failed", terminated(143, "Error"))]
    conditions = failed("DeadlineExceeded", "Job was active longer than specified deadline")
    failure = conditions_of(status.assess(observe(job=job(1, conditions), trainer_pods=pods), NOW))["Failed"]
    assert failure["reason"] == "DeadlineExceeded"
    assert failure["message"].startswith("Job was active longer than specified deadline; pod team-a/digits-trainer-0")


def test_a_suspended_job_is_suspended_and_resuming_goes_back_to_pending() -> None:
    suspended_condition = {"type": "Suspended", "status": "True", "reason": "JobSuspended", "message": "Job suspended"}
    held = job(2, [suspended_condition], suspend=True)
    held["metadata"]["annotations"] = {objects.SUSPENDED_BY_USER_ANNOTATION: "true"}  # suspended by the operator
    desired = status.assess(observe(job=held), NOW)
    assert desired["phase"] == "Suspended"
    found = conditions_of(desired)
    assert found["Suspended"]["status"] == "True" and found["Suspended"]["reason"] == "SuspendedByUser"
    assert found["Running"]["status"] == "False"
    resumed = status.assess(observe(desired, job=job(2, [suspended_condition], suspend=False)), T2)
    assert resumed["phase"] == "Pending"
    assert conditions_of(resumed)["Suspended"]["status"] == "False"
    assert conditions_of(resumed)["Suspended"]["lastTransitionTime"] == T2


def test_a_reported_model_with_serving_disabled_succeeds_without_an_endpoint() -> None:
    current = {"model": MODEL, "progress": {"epoch": 10}, "startTime": T0}
    desired = status.assess(observe(current, job=job(1, COMPLETE, succeeded=1), serving_enabled=False), NOW)
    assert desired["phase"] == "Succeeded" and desired["completionTime"] == NOW and desired["endpoint"] is None
    found = conditions_of(desired)
    assert found["Succeeded"]["status"] == "True"
    assert found["Succeeded"]["message"] == f"int8-static at {MODEL['uri']} (accuracy 0.9712)"
    assert found["Ready"]["status"] == "False" and found["Ready"]["reason"] == "ServingDisabled"


def test_serving_rolls_out_then_serves_at_the_in_cluster_endpoint_and_completion_is_the_models_arrival() -> None:
    current: dict[str, Any] = {"model": MODEL}
    rolling = status.assess(observe(current, job=job(1, COMPLETE, succeeded=1), deployment=deployment(0)), NOW)
    assert rolling["phase"] == "Exporting" and rolling["endpoint"] is None and rolling["completionTime"] == NOW
    assert conditions_of(rolling)["Succeeded"]["status"] == "True"
    assert conditions_of(rolling)["Ready"]["reason"] == "RollingOut"
    serving = status.assess(observe(rolling | current, job=job(1, COMPLETE, succeeded=1), deployment=deployment(1)), T2)
    assert serving["phase"] == "Serving" and serving["completionTime"] == NOW
    assert serving["endpoint"] == "http://digits-serving.team-a.svc:8080/v2/models/digits"
    ready = conditions_of(serving)["Ready"]
    assert ready["status"] == "True" and ready["message"].startswith("1/2 replica(s) available at http://")


def test_a_serving_outage_is_ready_false_with_a_reason_while_the_phase_stays_serving() -> None:
    obs = observe({"model": MODEL}, job=job(1, COMPLETE, succeeded=1), deployment=deployment(1))
    serving = status.assess(obs, T1) | {"model": MODEL}
    crash = waiting("CrashLoopBackOff", "back-off 40s restarting failed container=server")
    serving_pods = [pod("digits-serving-6d5f8-abcde", "Running", crash, container="server", restarts=4)]
    down = status.assess(observe(serving, job=job(1, COMPLETE, succeeded=1), deployment=deployment(0),
                                 serving_pods=serving_pods), NOW)  # fmt: skip
    assert down["phase"] == "Serving" and down["endpoint"] is None and down["completionTime"] == T1
    ready = conditions_of(down)["Ready"]
    assert (ready["status"], ready["reason"], ready["lastTransitionTime"]) == ("False", "RollingOut", NOW)
    assert "CrashLoopBackOff" in ready["message"]
    assert conditions_of(down)["Failed"]["status"] == "False"
    back = status.assess(observe(down | {"model": MODEL}, job=None, deployment=deployment(2)), T2)
    assert back["phase"] == "Serving" and conditions_of(back)["Ready"]["status"] == "True"


def test_a_serving_rollout_past_its_deadline_is_not_ready_naming_the_crashing_pod_and_fails_nothing() -> None:
    crash = waiting("CrashLoopBackOff", "back-off 40s restarting failed container=server")
    serving_pods = [pod("digits-serving-6d5f8-abcde", "Running", crash, container="server", restarts=4)]
    obs = observe({"model": MODEL}, job=job(1, COMPLETE, succeeded=1), deployment=deployment(0, stalled=True),
                  serving_pods=serving_pods)  # fmt: skip
    desired = status.assess(obs, NOW)
    ready = conditions_of(desired)["Ready"]
    assert desired["phase"] == "Exporting" and conditions_of(desired)["Failed"]["status"] == "False"
    assert ready["status"] == "False" and ready["reason"] == "ServingRolloutFailed"
    assert "has timed out progressing" in ready["message"]
    assert "digits-serving-6d5f8-abcde: container server CrashLoopBackOff" in ready["message"]
    assert desired["restarts"] == 0  # serving restarts are not training restarts


def test_failed_is_terminal_whatever_is_observed_afterwards() -> None:
    message = "Container trainer for pod team-a/x failed with exit code 78 matching FailJob rule at index 0"
    failed_status = status.assess(observe(job=job(1, failed("PodFailurePolicy", message))), T1)
    later = status.assess(observe(failed_status | {"model": MODEL}, job=job(1, COMPLETE, succeeded=1),
                                  deployment=deployment(2)), NOW)  # fmt: skip
    assert later["phase"] == "Failed" and later["completionTime"] == T1 and later["endpoint"] is None
    found = conditions_of(later)
    assert (found["Failed"]["status"], found["Failed"]["reason"]) == ("True", "InvalidConfig")
    assert found["Failed"]["lastTransitionTime"] == T1
    assert found["Succeeded"]["status"] == "False"
    assert status.status_patch(failed_status, later) == {}
    invalid = status.assess_invalid(failed_status, 2, "spec.resources.image: not allowed", NOW)
    assert conditions_of(invalid)["Failed"]["reason"] == "InvalidConfig"


def test_a_model_never_reported_fails_at_the_export_deadline_with_a_reason() -> None:
    trained = status.assess(observe(job=job(1, COMPLETE, succeeded=1), export_deadline_seconds=600), T1)
    assert trained["phase"] == "Exporting"
    waiting_still = status.assess(observe(trained, job=job(1, COMPLETE, succeeded=1), export_deadline_seconds=600), T2)
    assert waiting_still["phase"] == "Exporting"  # 4 minutes after training: within the deadline
    late = status.assess(observe(trained, job=job(1, COMPLETE, succeeded=1), export_deadline_seconds=240), T2)
    failure = conditions_of(late)["Failed"]
    assert late["phase"] == "Failed" and late["completionTime"] == T2
    assert failure["reason"] == "ExportDeadlineExceeded" and "status.model" in failure["message"]
    assert conditions_of(late)["Trained"]["status"] == "True"


def test_observed_generation_moves_only_when_the_children_reflect_the_spec() -> None:
    pods = [pod("digits-trainer-0-x", "Running", running())]
    first = status.assess(observe(job=job(1, active=1, ready=1), trainer_pods=pods, generation=1), T1)
    edited = observe(first, job=job(1, active=1, ready=1), trainer_pods=pods, generation=2, children_current=False)
    pending_edit = status.assess(edited, NOW)
    assert pending_edit["observedGeneration"] == 1
    assert all(c["observedGeneration"] == 1 for c in pending_edit["conditions"])
    applied = status.assess(observe(first, job=job(1, active=1, ready=1), trainer_pods=pods, generation=2), NOW)
    assert applied["observedGeneration"] == 2


def test_serving_scaled_to_zero_succeeds_without_an_endpoint() -> None:
    obs = observe({"model": MODEL}, job=job(1, COMPLETE, succeeded=1), deployment=deployment(0), replicas=0)
    desired = status.assess(obs, NOW)
    assert desired["phase"] == "Succeeded" and desired["endpoint"] is None
    assert conditions_of(desired)["Ready"]["reason"] == "ScaledToZero"


def test_a_job_removed_after_its_ttl_does_not_undo_training_or_failure() -> None:
    trained = status.assess(observe({"model": MODEL}, job=job(1, COMPLETE, succeeded=1), serving_enabled=False), T1)
    after_ttl = status.assess(observe(trained | {"model": MODEL}, job=None, serving_enabled=False), NOW)
    assert after_ttl["phase"] == "Succeeded"
    assert status.status_patch(trained | {"model": MODEL}, after_ttl) == {}
    message = "Container trainer for pod team-a/x failed with exit code 78 matching FailJob rule at index 0"
    failed_status = status.assess(observe(job=job(1, failed("PodFailurePolicy", message))), T1)
    assert status.assess(observe(failed_status, job=None), NOW)["phase"] == "Failed"
    missing = status.assess(observe({}, job=None), NOW)
    assert missing["phase"] == "Pending" and conditions_of(missing)["Created"]["reason"] == "TrainerJobMissing"


def test_a_job_its_ttl_removed_before_its_outcome_was_seen_fails_rather_than_training_again() -> None:
    running_status = status.assess(observe(job=job(1, active=1, ready=1), trainer_pods=[]), T1)
    gone = status.assess(observe(running_status, job=None, ttl_after_finished=True), NOW)
    failure = conditions_of(gone)["Failed"]
    assert gone["phase"] == "Failed" and failure["reason"] == "TrainerJobRemoved"
    assert status.assess_training(None, [], running_status, True).state == "Failed"  # never re-created
    assert status.assess_training(None, [], running_status, False).state == "Missing"  # deleted by hand: re-create


def test_last_transition_time_moves_only_when_a_condition_changes_status() -> None:
    pods = [pod("digits-trainer-0-x", "Running", running())]
    first = status.assess(observe(job=job(1, active=1, ready=1), trainer_pods=pods, generation=3), T1)
    again = status.assess(observe(first, job=job(1, active=1, ready=1), trainer_pods=pods, generation=3), NOW)
    assert again == first  # same observation, nothing to write
    assert status.status_patch(first, again) == {}
    done = status.assess(observe(first, job=job(1, COMPLETE, succeeded=1), generation=3), NOW)
    before, after = conditions_of(first), conditions_of(done)
    assert after["Running"]["lastTransitionTime"] == NOW and after["Trained"]["lastTransitionTime"] == NOW
    assert after["Failed"]["lastTransitionTime"] == before["Failed"]["lastTransitionTime"] == T1
    assert all(c["observedGeneration"] == 3 for c in after.values())


def test_the_status_patch_touches_only_operator_fields_that_changed() -> None:
    current = {"phase": "Running", "restarts": 0, "startTime": T0, "endpoint": "http://stale",
               "progress": {"epoch": 4, "totalEpochs": 10}, "metrics": {"accuracy": 0.9}, "warnings": ["overfit"],
               "lastCheckpoint": "/artifacts/team-a/digits/checkpoints/epoch-4.pt"}  # fmt: skip
    desired = {"phase": "Running", "restarts": 1, "startTime": T0, "endpoint": None, "completionTime": None}
    assert status.status_patch(current, desired) == {"restarts": 1, "endpoint": None}


def test_an_invalid_spec_fails_with_reason_invalid_spec() -> None:
    desired = status.assess_invalid({}, 1, "team-a/digits: invalid TrainingJob spec.model.architecture: unknown", NOW)
    assert desired["phase"] == "Failed" and desired["completionTime"] == NOW
    found = conditions_of(desired)
    assert found["Failed"]["status"] == "True" and found["Failed"]["reason"] == "InvalidSpec"
    assert "spec.model.architecture" in found["Failed"]["message"]
    assert found["Created"]["status"] == "False"


def test_every_phase_names_the_condition_its_transition_event_quotes() -> None:
    assert set(reconciler.SUMMARY_CONDITION) == set(api.phases())
    assert set(reconciler.SUMMARY_CONDITION.values()) <= set(api.condition_types())
