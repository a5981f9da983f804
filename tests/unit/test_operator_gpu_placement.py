"""Trainer pods' /dev/shm follows what their DataLoaders hold in flight, and GPU servers tolerate GPU pools'
taint and follow the GPU trainer's placement."""

from pathlib import Path
from typing import Any

import yaml

from kiln import api
from kiln_operator import config, objects, serving_objects, trainer_objects

OWNER = objects.Owner(name="digits", namespace="team-a", uid="0b6e3c1d-5d0f-4a8e-9c1e-2f4b7a9d1e00")
CFG = config.OperatorConfig()
EXAMPLES = Path(__file__).resolve().parents[2] / "deploy" / "examples"
GPU_TAINT = {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}


def _spec(**sections: Any) -> api.TrainingJobSpec:
    return api.TrainingJobSpec.model_validate(sections)


def _shm_mib(spec: api.TrainingJobSpec) -> int:
    pod = trainer_objects.build_job(OWNER, spec, CFG)["spec"]["template"]["spec"]
    mounts = {m["mountPath"]: m["name"] for m in pod["containers"][0]["volumeMounts"]}
    volume = next(v for v in pod["volumes"] if v["name"] == mounts["/dev/shm"])
    assert volume["emptyDir"]["medium"] == "Memory"
    limit: str = volume["emptyDir"]["sizeLimit"]
    assert limit.endswith("Mi")
    return int(limit[:-2])


def test_the_ddp_example_gets_shared_memory_for_every_validation_batch_its_workers_prefetch() -> None:
    body = yaml.safe_load((EXAMPLES / "cifar10-ddp.yaml").read_text())
    spec = api.TrainingJobSpec.model_validate(body["spec"])
    # 8 workers x 4 prefetched batches of 256 float32 images at 3x224x224: 4.9 GB, more than 2 GiB.
    in_flight = 8 * 4 * 256 * 3 * 224 * 224 * 4
    assert api.loader_bytes_in_flight(spec) == in_flight
    assert _shm_mib(spec) * 2**20 >= in_flight


def test_cpu_trainer_pods_get_shared_memory_beyond_the_runtimes_64_mib_for_their_loader_workers() -> None:
    small = _shm_mib(_spec(data={"numWorkers": 0}))
    assert small * 2**20 > 64 * 2**20
    many = _shm_mib(_spec(data={"numWorkers": 4, "imageSize": 96}, training={"batchSize": 512}))
    assert many * 2**20 >= 4 * 4 * 512 * 3 * 96 * 96 * 4
    assert many > small


def test_gpu_servers_tolerate_the_gpu_taint_and_follow_the_gpu_trainers_placement() -> None:
    toleration = {"key": "pool", "operator": "Equal", "value": "a100", "effect": "NoSchedule"}
    resources = {"gpusPerWorker": 1, "nodeSelector": {"pool": "a100"}, "tolerations": [toleration]}
    gpu = serving_objects.build_deployment(OWNER, _spec(resources=resources, serving={"gpu": True}), CFG, None)
    pod = gpu["spec"]["template"]["spec"]
    assert pod["nodeSelector"] == {"pool": "a100"}
    assert pod["tolerations"] == [toleration, GPU_TAINT]

    alone = serving_objects.build_deployment(OWNER, _spec(serving={"gpu": True}), CFG, None)
    assert alone["spec"]["template"]["spec"]["tolerations"] == [GPU_TAINT]
    assert "nodeSelector" not in alone["spec"]["template"]["spec"]

    # A CPU trainer's placement says nothing about GPU pools; CPU servers keep the default scheduling.
    cpu_trainer = {"nodeSelector": {"pool": "cpu"}}
    placed = serving_objects.build_deployment(OWNER, _spec(resources=cpu_trainer, serving={"gpu": True}), CFG, None)
    assert "nodeSelector" not in placed["spec"]["template"]["spec"]
    cpu = serving_objects.build_deployment(OWNER, _spec(resources=resources), CFG, None)["spec"]["template"]["spec"]
    assert "tolerations" not in cpu and "nodeSelector" not in cpu
