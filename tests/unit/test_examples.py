"""The example TrainingJobs in deploy/examples: valid against kiln.api, buildable by the operator, and each
what its README row promises (CPU quick start, single-GPU fine-tuning, 4-GPU DDP)."""

import re
from pathlib import Path

import pytest
import yaml

from kiln import api

ROOT = Path(__file__).resolve().parents[2]
EXAMPLES_DIR = ROOT / "deploy" / "examples"
EXAMPLES = sorted(EXAMPLES_DIR.glob("*.yaml"))


def load(name: str) -> api.TrainingJob:
    return api.load_trainingjob(EXAMPLES_DIR / f"{name}.yaml")


def test_the_examples_are_the_three_the_readme_lists() -> None:
    assert [p.stem for p in EXAMPLES] == ["cifar10-ddp", "cifar10-resnet50", "digits-cnn"]
    readme = (EXAMPLES_DIR / "README.md").read_text()
    for path in EXAMPLES:
        assert f"]({path.name})" in readme


@pytest.mark.parametrize("path", EXAMPLES, ids=lambda p: p.stem)
def test_the_example_is_a_valid_trainingjob_named_after_its_file(path: Path) -> None:
    job = api.load_trainingjob(path)
    assert job.metadata.name == path.stem
    assert job.metadata.namespace is None  # applied with kubectl -n
    # Nothing the user wrote is dropped or defaulted away: the file round-trips through the API model.
    written = yaml.safe_load(path.read_text())["spec"]
    validated = job.spec.to_dict()

    def contained(part: object, whole: object) -> bool:
        if isinstance(part, dict):
            return isinstance(whole, dict) and all(contained(v, whole.get(k)) for k, v in part.items())
        return part == whole

    assert contained(written, validated)


@pytest.mark.parametrize("path", EXAMPLES, ids=lambda p: p.stem)
def test_the_operator_builds_a_trainer_and_a_server_for_the_example(path: Path) -> None:
    from kiln_operator import config, objects, serving_objects, trainer_objects

    job = api.load_trainingjob(path)
    owner = objects.Owner(name=job.metadata.name, namespace="default", uid="0000")
    cfg = config.OperatorConfig()
    children = trainer_objects.build_trainer_objects(owner, job.spec, cfg)
    (trainer_job,) = [c for c in children if c["kind"] == "Job"]
    (trainer,) = trainer_job["spec"]["template"]["spec"]["containers"]
    gpus = job.spec.resources.gpus_per_worker
    assert trainer["image"] == (cfg.trainer_gpu_image if gpus else cfg.trainer_image)
    assert trainer["resources"]["limits"].get("nvidia.com/gpu", 0) in (gpus, str(gpus))
    server = serving_objects.build_deployment(owner, job.spec, cfg, None)
    (container,) = server["spec"]["template"]["spec"]["containers"]
    assert container["image"] == (cfg.serving_gpu_image if job.spec.serving.gpu else cfg.serving_image)


def test_the_quick_start_trains_digits_on_cpu_without_any_volume() -> None:
    spec = load("digits-cnn").spec
    assert (spec.model.architecture, spec.data.dataset) == ("small-cnn", "digits")
    assert spec.data.volume is None and spec.artifacts.volume is None
    assert spec.data.num_workers == 0
    assert spec.resources.gpus_per_worker == 0 and spec.resources.workers == 1
    assert 8 <= spec.training.epochs <= 10 and spec.training.batch_size == 64
    assert spec.training.optimizer.name == "adamw"
    assert spec.training.target_accuracy == 0.97
    assert set(spec.export.variants) == {"fp32", "int8-dynamic", "int8-static"}
    assert spec.serving.enabled and not spec.serving.gpu


def test_the_cifar10_examples_read_the_data_set_from_the_cifar10_claim_on_gpus() -> None:
    single, ddp = load("cifar10-resnet50").spec, load("cifar10-ddp").spec
    for spec in (single, ddp):
        assert (spec.model.architecture, spec.data.dataset) == ("resnet50", "cifar10")
        assert spec.data.path == "cifar-10-batches-py"
        assert spec.data.volume == {"persistentVolumeClaim": {"claimName": "cifar10", "readOnly": True}}
        assert spec.model.weights is not None and spec.model.weights.startswith("/data/")
        assert spec.data.augment.horizontal_flip and spec.data.augment.random_crop
        assert {"fp16", "int8-static"} <= set(spec.export.variants)
        assert spec.serving.gpu and spec.resources.gpus_per_worker == 1
    assert single.resources.workers == 1
    assert ddp.resources.workers == 4


def test_the_yaml_snippets_in_the_examples_readme_parse_and_the_copy_job_runs_restricted() -> None:
    readme = (EXAMPLES_DIR / "README.md").read_text()
    blocks = [yaml.safe_load(b) for b in re.findall(r"```yaml\n(.*?)```", readme, re.DOTALL)]
    kinds = {b["kind"]: b for b in blocks}
    assert set(kinds) == {"PersistentVolumeClaim", "Job"}
    assert kinds["PersistentVolumeClaim"]["metadata"]["name"] == "cifar10"
    pod = kinds["Job"]["spec"]["template"]["spec"]
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert {"persistentVolumeClaim": {"claimName": "cifar10"}, "name": "data"} in pod["volumes"]
    (container,) = pod["containers"]
    assert not container["image"].endswith(":latest") and ":" in container["image"]
    assert "cifar-10-batches-py" in " ".join(container["command"])
