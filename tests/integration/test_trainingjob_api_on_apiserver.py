"""Scenario 1 (CRD): the generated CRD is what a real API server accepts, validates and defaults with.

The API server, not kiln, refuses bad TrainingJobs here: enum, bounds, the CEL rules and immutability all
come from charts/kiln/crds/trainingjob.yaml, generated from kiln.api.
"""

import copy
from pathlib import Path
from typing import Any

import pytest
import yaml

from kiln import api
from kiln_cluster.rest import ApiError, Kube

CRD_FILE = Path(__file__).resolve().parents[2] / "charts/kiln/crds/trainingjob.yaml"
TJ = "/apis/kiln.dev/v1alpha1/namespaces/{ns}/trainingjobs"


def trainingjob(name: str, spec: dict[str, Any]) -> dict[str, Any]:
    return {"apiVersion": api.API_VERSION, "kind": api.KIND, "metadata": {"name": name}, "spec": spec}


def refusal(kube: Kube, namespace: str, spec: dict[str, Any]) -> str:
    """Create a TrainingJob that must be refused; return the API server's message."""
    with pytest.raises(ApiError) as refused:
        kube.create(TJ.format(ns=namespace), trainingjob("refused", spec))
    assert refused.value.status == 422, refused.value
    return refused.value.message


def test_the_generated_crd_passes_a_server_side_dry_run_then_applies_for_real(kube: Kube) -> None:
    crd = yaml.safe_load(CRD_FILE.read_text())
    checked = kube.apply_object(copy.deepcopy(crd), dry_run=True)
    assert checked["spec"]["names"]["kind"] == "TrainingJob"
    applied = kube.apply_object(crd)
    assert applied["metadata"]["name"] == "trainingjobs.kiln.dev"


def test_a_minimal_trainingjob_gets_every_default_of_the_model_from_the_api_server(
    kube: Kube, trainingjob_crd: dict[str, Any], namespace: str
) -> None:
    stored = kube.create(TJ.format(ns=namespace), trainingjob("defaults", {}))
    assert stored["spec"] == api.TrainingJobSpec().to_dict()
    parsed = api.parse_trainingjob(stored, "stored object")
    assert parsed.spec == api.TrainingJobSpec()
    assert parsed.metadata.name == "defaults"


def test_a_stored_trainingjob_parses_back_into_the_spec_it_was_created_with(
    kube: Kube, trainingjob_crd: dict[str, Any], namespace: str
) -> None:
    spec = {
        "data": {"dataset": "digits", "maxSamples": 300},
        "training": {"epochs": 2, "batchSize": 32},
        "export": {"variants": ["fp32", "int8-dynamic"]},
        "serving": {"variant": "int8-dynamic"},
    }
    stored = kube.create(TJ.format(ns=namespace), trainingjob("roundtrip", spec))
    assert api.parse_trainingjob(stored).spec == api.parse_trainingjob({"spec": spec}).spec


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ({"data": {"dataset": "mnist"}}, 'spec.data.dataset: Unsupported value: "mnist"'),
        (
            {"training": {"epochs": -1}},
            "spec.training.epochs: Invalid value: -1: spec.training.epochs in body "
            "should be greater than or equal to 1",
        ),
        ({"data": {"dataset": "cifar10"}}, "data.path is required for datasets cifar10 and imagefolder"),
        ({"data": {"dataset": "imagefolder"}}, "data.path is required for datasets cifar10 and imagefolder"),
        (
            {"export": {"variants": ["fp32"]}, "serving": {"variant": "int8-static"}},
            "serving.variant must be 'auto' or one of export.variants",
        ),
    ],
    ids=[
        "bad-enum",
        "negative-epochs",
        "cifar10-without-path",
        "imagefolder-without-path",
        "serving-variant-not-built",
    ],
)
def test_an_invalid_trainingjob_is_refused_by_the_api_server_with_the_crd_message(
    kube: Kube, trainingjob_crd: dict[str, Any], namespace: str, spec: dict[str, Any], message: str
) -> None:
    assert message in refusal(kube, namespace, spec)


def test_an_unknown_field_is_refused_under_strict_field_validation_as_kubectl_asks(
    kube: Kube, trainingjob_crd: dict[str, Any], namespace: str
) -> None:
    body = trainingjob("typo", {"training": {"epochs": 1, "learningRate": 0.1}})
    with pytest.raises(ApiError) as refused:
        kube.request("POST", TJ.format(ns=namespace), body, params={"fieldValidation": "Strict"})
    assert 'unknown field "spec.training.learningRate"' in refused.value.message


def test_editing_an_immutable_section_is_refused_but_run_policy_may_change(
    kube: Kube, trainingjob_crd: dict[str, Any], namespace: str
) -> None:
    path = TJ.format(ns=namespace) + "/immutable"
    kube.create(TJ.format(ns=namespace), trainingjob("immutable", {"training": {"epochs": 2}}))
    with pytest.raises(ApiError) as refused:
        kube.patch(path, {"spec": {"training": {"epochs": 3}}})
    assert refused.value.status == 422
    assert "training is immutable after creation; create a new TrainingJob to change it" in refused.value.message
    changed = kube.patch(path, {"spec": {"runPolicy": {"suspend": True}}})
    assert changed["spec"]["runPolicy"]["suspend"] is True


def test_status_is_a_subresource_and_the_printer_columns_show_it(
    kube: Kube, trainingjob_crd: dict[str, Any], namespace: str
) -> None:
    path = TJ.format(ns=namespace) + "/columns"
    kube.create(TJ.format(ns=namespace), trainingjob("columns", {}))
    # A status in the main resource is ignored; the status subresource stores it.
    kube.patch(path, {"status": {"phase": "Failed"}})
    assert "status" not in kube.get(path)
    status = {
        "phase": "Serving",
        "progress": {"epoch": 3, "valAccuracy": 0.97},
        "model": {"variant": "int8-static"},
        "endpoint": "http://columns.ns.svc:8080/v2/models/columns",
    }
    kube.patch(path + "/status", {"status": status})
    table = kube.table(path)
    columns = [c["name"] for c in table["columnDefinitions"]]
    assert columns == ["Name", "Phase", "Ready", "Epoch", "Accuracy", "Model", "Endpoint", "Age"]
    row = dict(zip(columns, table["rows"][0]["cells"], strict=True))
    assert (row["Phase"], row["Epoch"], row["Accuracy"], row["Model"], row["Endpoint"]) == (
        "Serving",
        3,
        0.97,
        "int8-static",
        status["endpoint"],
    )
