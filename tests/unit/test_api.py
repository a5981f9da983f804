"""The TrainingJob API: defaults, validation errors a user can act on, and the model card round trip."""

import json
from pathlib import Path

import card_support
import pytest

from kiln import api


def test_an_empty_spec_gets_documented_defaults() -> None:
    spec = api.TrainingJobSpec()
    assert spec.model.architecture == "small-cnn"
    assert spec.data.dataset == "digits"
    assert spec.training.epochs == 10
    assert spec.export.variants[0] == "fp32"
    assert spec.serving.variant == "auto"
    assert api.resolved_num_classes(spec) == 10
    assert api.resolved_image_size(spec) == 32


def test_dataset_dependent_defaults_are_resolved_from_the_dataset() -> None:
    spec = api.parse_trainingjob({"data": {"dataset": "imagefolder", "path": "/data/x"}}).spec
    assert api.resolved_num_classes(spec) is None
    assert api.resolved_image_size(spec) == 224
    assert api.resolved_normalize(spec).mean == [0.485, 0.456, 0.406]


def test_a_whole_trainingjob_and_a_bare_spec_parse_to_the_same_spec() -> None:
    spec = {"training": {"epochs": 3}, "model": {"architecture": "resnet18"}}
    whole = {"apiVersion": "kiln.dev/v1alpha1", "kind": "TrainingJob", "metadata": {"name": "x"}, "spec": spec}
    assert api.parse_trainingjob(whole).spec == api.parse_trainingjob(spec).spec
    assert api.parse_trainingjob(whole).metadata.name == "x"


@pytest.mark.parametrize(
    ("spec", "expected"),
    [
        ({"model": {"architecture": "resnet9"}}, "spec.model.architecture: unknown architecture 'resnet9'"),
        ({"training": {"epochs": -1}}, "spec.training.epochs: Input should be greater than or equal to 1"),
        ({"export": {"variants": ["int4"]}}, "spec.export.variants.0: Input should be 'fp32', 'fp16'"),
        ({"data": {"dataset": "cifar10"}}, "data.path: required for dataset 'cifar10'"),
        ({"serving": {"variant": "fp16"}}, "serving.variant: 'fp16' is not built"),
        ({"training": {"epochz": 3}}, "spec.training.epochz: Extra inputs are not permitted"),
        ({"data": {"normalize": {"mean": [0.5], "std": [0.5, 0.5]}}}, "mean and std must have the same number"),
    ],
)
def test_invalid_specs_are_refused_with_the_field_named(spec: dict[str, object], expected: str) -> None:
    with pytest.raises(api.ConfigError) as err:
        api.parse_trainingjob(spec, "job.yaml")
    assert str(err.value).startswith("job.yaml: invalid TrainingJob")
    assert expected in str(err.value)


def test_several_errors_are_reported_together_one_per_line() -> None:
    with pytest.raises(api.ConfigError) as err:
        api.parse_trainingjob({"training": {"epochs": 0, "batchSize": 0}})
    assert len(str(err.value).splitlines()) == 3


def test_a_trainingjob_of_another_kind_is_refused() -> None:
    with pytest.raises(api.ConfigError, match="expected kind TrainingJob"):
        api.parse_trainingjob({"apiVersion": "batch/v1", "kind": "Job", "spec": {}})


def test_load_trainingjob_reports_missing_files_and_bad_yaml(tmp_path: Path) -> None:
    with pytest.raises(api.ConfigError, match="cannot read"):
        api.load_trainingjob(tmp_path / "missing.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("spec: [unclosed")
    with pytest.raises(api.ConfigError, match="not valid YAML"):
        api.load_trainingjob(bad)


def test_fp32_is_always_built_even_when_not_listed() -> None:
    spec = api.parse_trainingjob({"export": {"variants": ["int8-static"]}}).spec
    assert spec.export.variants == ["fp32", "int8-static"]


def test_the_wire_form_is_camel_case_and_round_trips() -> None:
    spec = api.parse_trainingjob({"training": {"batchSize": 16, "earlyStopping": {"patience": 2}}}).spec
    wire = spec.to_dict()
    assert wire["training"]["batchSize"] == 16  # type: ignore[index]
    assert api.TrainingJobSpec.model_validate(wire) == spec


def test_a_model_card_round_trips_through_its_file(tmp_path: Path) -> None:
    card = card_support.model_card(
        metrics=api.Metrics(accuracy=0.97, precision=0.97, recall=0.96, f1=0.965),
        variants=[api.VariantReport(name="fp32", path="models/fp32/model.onnx", sha256="ab" * 32, size_bytes=1234)],
    )
    path = tmp_path / "model-card.json"
    card.write(path)
    assert api.ModelCard.read(path) == card
    on_disk = json.loads(path.read_text())
    assert on_disk["classNames"][0] == "0" and on_disk["variants"][0]["sizeBytes"] == 1234
    assert card.variant("fp32").path == "models/fp32/model.onnx"
    with pytest.raises(KeyError, match="have: fp32"):
        card.variant("fp16")
