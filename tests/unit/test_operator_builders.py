"""The operator's pure builders: what a TrainingJob turns into, checked field by field without a cluster."""

from typing import Any

import pytest
import yaml

from kiln import api
from kiln.api import constants
from kiln_operator import config, objects, serving_objects, trainer_objects

OWNER = objects.Owner(name="digits", namespace="team-a", uid="0b6e3c1d-5d0f-4a8e-9c1e-2f4b7a9d1e00")
CFG = config.OperatorConfig()
MODEL = api.ModelStatus.model_validate({
    "variant": "int8-static", "uri": "/artifacts/team-a/digits/models/int8-static/model.onnx",
    "sha256": "ab" * 32, "sizeBytes": 120_000, "accuracy": 0.97, "latencyMs": 1.8,
})  # fmt: skip


def spec(**sections: Any) -> api.TrainingJobSpec:
    return api.TrainingJobSpec.model_validate(sections)


def trainer_container(job: dict[str, Any]) -> dict[str, Any]:
    containers = job["spec"]["template"]["spec"]["containers"]
    assert [c["name"] for c in containers] == ["trainer"]
    return dict(containers[0])


def env_of(container: dict[str, Any]) -> dict[str, Any]:
    return {e["name"]: e.get("value", e.get("valueFrom")) for e in container["env"]}


def mounts_of(container: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {m["mountPath"]: m for m in container["volumeMounts"]}


def test_every_child_is_labelled_and_adopted_by_its_trainingjob() -> None:
    children = trainer_objects.build_trainer_objects(OWNER, spec(resources={"workers": 2}), CFG)
    children += [serving_objects.build_deployment(OWNER, spec(), CFG, MODEL), serving_objects.build_service(OWNER)]
    assert [c["kind"] for c in children] == [
        "ServiceAccount", "Job", "Service", "Role", "RoleBinding", "Deployment", "Service"
    ]  # fmt: skip
    for child in children:
        meta = child["metadata"]
        assert meta["namespace"] == "team-a"
        assert meta["name"].startswith("digits-")
        assert meta["labels"]["app.kubernetes.io/name"] == "kiln"
        assert meta["labels"]["app.kubernetes.io/instance"] == "digits"
        assert meta["labels"]["app.kubernetes.io/managed-by"] == "kiln-operator"
        assert meta["labels"]["kiln.dev/trainingjob"] == "digits"
        assert meta["labels"]["app.kubernetes.io/component"] in ("trainer", "serving")
        assert meta["ownerReferences"] == [
            {"apiVersion": "kiln.dev/v1alpha1", "kind": "TrainingJob", "name": "digits", "uid": OWNER.uid,
             "controller": True, "blockOwnerDeletion": True}
        ]  # fmt: skip


def test_children_have_deterministic_names_so_a_restarted_operator_finds_them() -> None:
    first = trainer_objects.build_trainer_objects(OWNER, spec(resources={"workers": 4}), CFG)
    second = trainer_objects.build_trainer_objects(OWNER, spec(resources={"workers": 4}), CFG)
    assert [c["metadata"]["name"] for c in first] == [c["metadata"]["name"] for c in second] == [
        "digits-trainer", "digits-trainer", "digits-workers", "digits-trainer", "digits-trainer"
    ]  # fmt: skip
    assert first == second


def test_the_pod_template_carries_the_whole_validated_trainingjob_the_trainer_reads_as_a_file() -> None:
    job_spec = spec(training={"epochs": 3}, export={"variants": ["int8-static"]})
    template = trainer_objects.build_job(OWNER, job_spec, CFG)["spec"]["template"]
    annotation = "kiln.dev/trainingjob-config"
    volumes = {v["name"]: v for v in template["spec"]["volumes"]}
    assert volumes["config"]["downwardAPI"]["items"] == [
        {"path": "trainingjob.yaml", "fieldRef": {"fieldPath": f"metadata.annotations['{annotation}']"}}
    ]
    assert mounts_of(template["spec"]["containers"][0])["/etc/kiln"]["name"] == "config"
    document = yaml.safe_load(template["metadata"]["annotations"][annotation])
    assert document["apiVersion"] == "kiln.dev/v1alpha1" and document["kind"] == "TrainingJob"
    assert document["metadata"] == {"name": "digits", "namespace": "team-a"}
    parsed = api.parse_trainingjob(document)
    assert parsed.spec == job_spec
    assert parsed.spec.export.variants == ["fp32", "int8-static"]  # validated: fp32 added


def test_a_single_worker_job_is_indexed_with_one_completion_and_no_headless_service() -> None:
    children = trainer_objects.build_trainer_objects(OWNER, spec(), CFG)
    assert [c["kind"] for c in children] == ["ServiceAccount", "Job", "Role", "RoleBinding"]
    job = children[1]
    assert job["spec"]["completionMode"] == "Indexed"
    assert job["spec"]["completions"] == job["spec"]["parallelism"] == 1
    assert "subdomain" not in job["spec"]["template"]["spec"]
    container = trainer_container(job)
    assert container["command"] == ["kiln"]
    output = f"/artifacts/team-a/digits/{OWNER.uid}"
    assert container["args"] == ["train", "--config", "/etc/kiln/trainingjob.yaml",
                                 "--output", output, "--metrics-port", "9400"]  # fmt: skip
    env = env_of(container)
    assert env["WORLD_SIZE"] == "1" and env["MASTER_ADDR"] == "127.0.0.1" and env["MASTER_PORT"] == "29500"
    assert env["KILN_TRAININGJOB_NAME"] == "digits" and env["KILN_TRAININGJOB_NAMESPACE"] == "team-a"
    assert env["HOME"] == env["TMPDIR"] == "/tmp"


def test_four_workers_get_a_headless_service_a_subdomain_and_rank_zero_as_master() -> None:
    children = trainer_objects.build_trainer_objects(OWNER, spec(resources={"workers": 4}), CFG)
    job, service = children[1], children[2]
    assert service["spec"]["clusterIP"] == "None"
    assert service["spec"]["publishNotReadyAddresses"] is True
    assert service["spec"]["selector"] == {"kiln.dev/trainingjob": "digits", "app.kubernetes.io/component": "trainer"}
    assert service["spec"]["selector"].items() <= job["spec"]["template"]["metadata"]["labels"].items()
    assert job["spec"]["completions"] == job["spec"]["parallelism"] == 4
    assert job["spec"]["template"]["spec"]["subdomain"] == service["metadata"]["name"] == "digits-workers"
    container = trainer_container(job)
    env = env_of(container)
    assert env["WORLD_SIZE"] == "4"
    assert env["MASTER_ADDR"] == "digits-trainer-0.digits-workers.team-a.svc"
    assert env["RANK"] == {
        "fieldRef": {"fieldPath": "metadata.annotations['batch.kubernetes.io/job-completion-index']"}
    }
    assert {"name": "ddp", "containerPort": 29500} in container["ports"]


def test_a_lost_worker_costs_the_gang_one_retry_because_peers_that_lost_it_are_not_counted() -> None:
    job = trainer_objects.build_job(OWNER, spec(resources={"workers": 4}, runPolicy={"backoffLimit": 2}), CFG)
    assert job["spec"]["backoffLimit"] == 2
    lost = {"containerName": "trainer", "operator": "In", "values": [constants.EXIT_PEER_LOST]}
    assert {"action": "Ignore", "onExitCodes": lost} in job["spec"]["podFailurePolicy"]["rules"]
    assert job["spec"]["podReplacementPolicy"] == "Failed"


def test_exit_code_78_fails_the_job_at_once_and_disruptions_do_not_count() -> None:
    job = trainer_objects.build_job(OWNER, spec(), CFG)
    assert job["spec"]["template"]["spec"]["restartPolicy"] == "Never"
    assert job["spec"]["podFailurePolicy"]["rules"] == [
        {"action": "FailJob", "onExitCodes": {"containerName": "trainer", "operator": "In", "values": [78]}},
        {"action": "Ignore", "onExitCodes": {"containerName": "trainer", "operator": "In", "values": [75]}},
        {"action": "Ignore", "onPodConditions": [{"type": "DisruptionTarget", "status": "True"}]},
    ]
    assert trainer_container(job)["terminationMessagePolicy"] == "FallbackToLogsOnError"


def test_run_policy_deadline_ttl_and_suspend_reach_the_job() -> None:
    default = trainer_objects.build_job(OWNER, spec(), CFG)["spec"]
    assert default["suspend"] is False and default["backoffLimit"] == 3
    assert "activeDeadlineSeconds" not in default and "ttlSecondsAfterFinished" not in default
    policy = {"activeDeadlineSeconds": 3600, "ttlSecondsAfterFinished": 600, "suspend": True}
    job = trainer_objects.build_job(OWNER, spec(runPolicy=policy), CFG)["spec"]
    assert (job["activeDeadlineSeconds"], job["ttlSecondsAfterFinished"], job["suspend"]) == (3600, 600, True)


def test_gpu_workers_request_gpus_use_the_gpu_image_and_get_shared_memory() -> None:
    job = trainer_objects.build_job(OWNER, spec(resources={"workers": 2, "gpusPerWorker": 4, "memory": "32Gi"}), CFG)
    container = trainer_container(job)
    assert container["image"] == "kiln-trainer-gpu:0.1.0"
    assert container["resources"] == {"requests": {"memory": "32Gi"},
                                      "limits": {"memory": "32Gi", "nvidia.com/gpu": "4"}}  # fmt: skip
    assert mounts_of(container)["/dev/shm"]["name"] == "dshm"
    volumes = {v["name"]: v for v in job["spec"]["template"]["spec"]["volumes"]}
    assert volumes["dshm"]["emptyDir"]["medium"] == "Memory"


def test_cpu_workers_use_the_cpu_image_and_resources_default_from_the_operator_config() -> None:
    cfg = config.OperatorConfig(trainer_cpu="2", trainer_memory="4Gi", image_pull_policy="Never")
    container = trainer_container(trainer_objects.build_job(OWNER, spec(resources={"cpu": "500m"}), cfg))
    assert container["image"] == "kiln-trainer:0.1.0" and container["imagePullPolicy"] == "Never"
    assert container["resources"] == {"requests": {"cpu": "500m", "memory": "4Gi"},
                                      "limits": {"cpu": "500m", "memory": "4Gi"}}  # fmt: skip
    image = trainer_container(trainer_objects.build_job(OWNER, spec(resources={"image": "me/t:1"}), CFG))["image"]
    assert image == "me/t:1"


def test_trainer_pods_run_restricted_with_a_writable_tmp() -> None:
    job = trainer_objects.build_job(OWNER, spec(), CFG)
    pod = job["spec"]["template"]["spec"]
    assert pod["securityContext"]["runAsNonRoot"] is True and pod["securityContext"]["runAsUser"] == 1000
    assert pod["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
    security = trainer_container(job)["securityContext"]
    assert security["allowPrivilegeEscalation"] is False and security["readOnlyRootFilesystem"] is True
    assert security["capabilities"] == {"drop": ["ALL"]}
    assert mounts_of(trainer_container(job))["/tmp"]["name"] == "tmp"
    assert pod["serviceAccountName"] == "digits-trainer" and pod["automountServiceAccountToken"] is True


def test_metrics_port_is_declared_and_annotated_for_prometheus() -> None:
    job = trainer_objects.build_job(OWNER, spec(), CFG)
    assert {"name": "metrics", "containerPort": 9400} in trainer_container(job)["ports"]
    assert job["spec"]["template"]["metadata"]["annotations"].items() >= {
        "prometheus.io/scrape": "true", "prometheus.io/port": "9400", "prometheus.io/path": "/metrics"
    }.items()  # fmt: skip


def test_data_is_mounted_read_only_and_artifacts_default_to_the_operator_pvc() -> None:
    data = {
        "dataset": "cifar10",
        "path": "cifar-10-batches-py",
        "volume": {"persistentVolumeClaim": {"claimName": "c"}},
    }
    job = trainer_objects.build_job(OWNER, spec(data=data), config.OperatorConfig(artifacts_pvc="shared"))
    mounts = mounts_of(trainer_container(job))
    assert mounts["/data"]["readOnly"] is True and mounts["/etc/kiln"]["readOnly"] is True
    assert not mounts["/artifacts"].get("readOnly")
    volumes = {v["name"]: v for v in job["spec"]["template"]["spec"]["volumes"]}
    assert volumes["data"] == {"name": "data", "persistentVolumeClaim": {"claimName": "c"}}
    assert volumes["artifacts"] == {"name": "artifacts", "persistentVolumeClaim": {"claimName": "shared"}}
    own = spec(artifacts={"volume": {"hostPath": {"path": "/srv/kiln"}}})
    volumes = {v["name"]: v for v in trainer_objects.build_job(OWNER, own, CFG)["spec"]["template"]["spec"]["volumes"]}
    assert volumes["artifacts"] == {"name": "artifacts", "hostPath": {"path": "/srv/kiln"}}
    assert "data" not in volumes


def test_the_weights_volume_is_mounted_read_only_where_the_trainer_looks_for_named_weights() -> None:
    model = {
        "architecture": "resnet50",
        "weights": "IMAGENET1K_V2",
        "weightsVolume": {"persistentVolumeClaim": {"claimName": "w"}},
    }
    job = trainer_objects.build_job(OWNER, spec(model=model), CFG)
    assert mounts_of(trainer_container(job))[constants.WEIGHTS_MOUNT]["readOnly"] is True
    volumes = {v["name"]: v for v in job["spec"]["template"]["spec"]["volumes"]}
    assert volumes["weights"] == {"name": "weights", "persistentVolumeClaim": {"claimName": "w"}}


def test_scheduling_constraints_pass_through_to_trainer_pods() -> None:
    toleration = {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}
    resources = {"nodeSelector": {"pool": "gpu"}, "tolerations": [toleration], "priorityClassName": "training"}
    pod = trainer_objects.build_job(OWNER, spec(resources=resources), CFG)["spec"]["template"]["spec"]
    assert pod["nodeSelector"] == {"pool": "gpu"}
    assert pod["tolerations"] == [toleration]
    assert pod["priorityClassName"] == "training"


def test_the_trainer_may_only_read_its_own_trainingjob_and_patch_its_status() -> None:
    role, binding = trainer_objects.build_role(OWNER), trainer_objects.build_role_binding(OWNER)
    assert role["rules"] == [
        {"apiGroups": ["kiln.dev"], "resources": ["trainingjobs"], "resourceNames": ["digits"], "verbs": ["get"]},
        {"apiGroups": ["kiln.dev"], "resources": ["trainingjobs/status"], "resourceNames": ["digits"],
         "verbs": ["get", "patch"]},
    ]  # fmt: skip
    assert binding["roleRef"] == {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": "digits-trainer"}
    assert binding["subjects"] == [{"kind": "ServiceAccount", "name": "digits-trainer", "namespace": "team-a"}]
    assert trainer_objects.build_service_account(OWNER)["automountServiceAccountToken"] is True


def test_the_serving_deployment_runs_kiln_serve_on_the_cards_selected_variant_read_only() -> None:
    job_spec = spec(serving={"replicas": 2, "maxBatchSize": 16, "maxQueueDelayMicroseconds": 500})
    deployment = serving_objects.build_deployment(OWNER, job_spec, CFG, MODEL)
    assert deployment["spec"]["replicas"] == 2
    pod = deployment["spec"]["template"]
    [container] = pod["spec"]["containers"]
    assert container["command"] == ["kiln"]
    assert container["args"] == [
        "serve", "--model-dir", f"/artifacts/team-a/digits/{OWNER.uid}",
        "--model-name", "digits",
        "--host", "0.0.0.0", "--port", "8080", "--max-batch-size", "16", "--max-queue-delay-microseconds", "500",
    ]  # fmt: skip
    assert mounts_of(container)["/artifacts"]["readOnly"] is True
    assert container["image"] == "kiln-serving:0.1.0"
    assert container["resources"] == {}
    assert pod["metadata"]["annotations"]["prometheus.io/port"] == "8080"
    assert pod["metadata"]["annotations"]["kiln.dev/model-sha256"] == "ab" * 32
    assert deployment["spec"]["selector"]["matchLabels"].items() <= pod["metadata"]["labels"].items()
    assert deployment["spec"]["strategy"]["rollingUpdate"] == {"maxSurge": 1, "maxUnavailable": 0}
    assert pod["spec"]["securityContext"]["runAsNonRoot"] is True
    assert container["securityContext"]["readOnlyRootFilesystem"] is True
    assert pod["spec"]["automountServiceAccountToken"] is False


@pytest.mark.parametrize(("requested", "flags"), [("auto", []), ("fp32", ["--variant", "fp32"])])
def test_the_server_is_given_a_variant_only_when_the_user_chose_one_and_else_serves_the_cards(
    requested: str, flags: list[str]
) -> None:
    # The trainer selected int8-static; for auto the server reads that from the card, not from the status.
    job_spec = spec(export={"variants": ["fp32", "int8-static"]}, serving={"variant": requested})
    [container] = serving_objects.build_deployment(OWNER, job_spec, CFG, MODEL)["spec"]["template"]["spec"][
        "containers"
    ]
    args = container["args"]
    at = args.index("--variant") if "--variant" in args else len(args)
    assert args[at : at + 2] == flags


def test_gpu_serving_uses_the_gpu_image_one_gpu_the_cuda_provider_and_no_surge() -> None:
    deployment = serving_objects.build_deployment(OWNER, spec(serving={"gpu": True, "memory": "8Gi"}), CFG, MODEL)
    [container] = deployment["spec"]["template"]["spec"]["containers"]
    assert container["image"] == "kiln-serving-gpu:0.1.0"
    assert container["resources"]["limits"] == {"memory": "8Gi", "nvidia.com/gpu": "1"}
    assert container["args"][-2:] == ["--providers", "cuda,cpu"]
    assert deployment["spec"]["strategy"]["rollingUpdate"] == {"maxSurge": 0, "maxUnavailable": 1}


def test_serving_probes_use_the_open_inference_protocol_health_endpoints() -> None:
    [container] = serving_objects.build_deployment(OWNER, spec(), CFG, MODEL)["spec"]["template"]["spec"]["containers"]
    assert container["readinessProbe"]["httpGet"] == {"path": "/v2/health/ready", "port": "http"}
    assert container["livenessProbe"]["httpGet"] == {"path": "/v2/health/live", "port": "http"}
    assert container["startupProbe"]["httpGet"]["path"] == "/v2/health/live"
    assert {"name": "http", "containerPort": 8080} in container["ports"]
    assert {"name": "grpc", "containerPort": 8081} in container["ports"]  # the server's default --grpc-port


def test_the_serving_service_is_the_endpoint_in_status() -> None:
    service = serving_objects.build_service(OWNER)
    assert service["metadata"]["name"] == "digits-serving"
    assert service["spec"]["ports"] == [
        {"name": "http", "port": 8080, "targetPort": "http"},
        {"name": "grpc", "port": 8081, "targetPort": "grpc", "appProtocol": "grpc"},
    ]
    assert objects.endpoint("digits", "team-a") == "http://digits-serving.team-a.svc:8080/v2/models/digits"


def test_names_too_long_for_trainer_pod_hostnames_are_refused() -> None:
    objects.check_name("a" * objects.MAX_NAME_LENGTH)
    with pytest.raises(ValueError, match="metadata.name: 51 characters is too long"):
        objects.check_name("a" * 51)
    hostname = f"{objects.job_name('a' * objects.MAX_NAME_LENGTH)}-1023"
    assert len(hostname) <= 63


def test_operator_config_comes_from_the_environment_with_defaults() -> None:
    assert config.OperatorConfig.from_env({}) == config.OperatorConfig()
    cfg = config.OperatorConfig.from_env({
        "KILN_TRAINER_IMAGE": "reg/t:2", "KILN_IMAGE_PULL_POLICY": "Always", "KILN_ARTIFACTS_PVC": "arts",
        "KILN_SERVING_CPU": "1", "KILN_SERVING_MEMORY": "", "KILN_WATCH_NAMESPACES": " team-a, team-b ,",
    })  # fmt: skip
    assert (cfg.trainer_image, cfg.image_pull_policy, cfg.artifacts_pvc) == ("reg/t:2", "Always", "arts")
    assert (cfg.serving_cpu, cfg.serving_memory) == ("1", None)
    assert cfg.watch_namespaces == ("team-a", "team-b")
    assert constants.OPERATOR_METRICS_PORT == 9401


@pytest.mark.parametrize(
    ("env", "message"),
    [({"KILN_IMAGE_PULL_POLICY": "Sometimes"}, "KILN_IMAGE_PULL_POLICY='Sometimes' must be one of"),
     ({"KILN_TRAINER_MEMORY": "4 GB"}, "KILN_TRAINER_MEMORY='4 GB' is not a Kubernetes quantity")],
)  # fmt: skip
def test_a_bad_operator_setting_is_named(env: dict[str, str], message: str) -> None:
    with pytest.raises(config.ConfigError, match=message):
        config.OperatorConfig.from_env(env)
