"""The CRD is generated from kiln.api, structurally valid, and the committed copy is current."""

from pathlib import Path
from typing import Any

import yaml

from kiln import api
from kiln.api import crd

ROOT = Path(__file__).resolve().parents[2]


def _walk(node: Any, path: str = "") -> list[tuple[str, dict[str, Any]]]:
    out = []
    if isinstance(node, dict):
        out.append((path, node))
        for key, value in node.get("properties", {}).items():
            out += _walk(value, f"{path}.{key}")
        if isinstance(node.get("items"), dict):
            out += _walk(node["items"], f"{path}[]")
        if isinstance(node.get("additionalProperties"), dict):
            out += _walk(node["additionalProperties"], f"{path}{{}}")
    return out


def _schema() -> dict[str, Any]:
    schema: dict[str, Any] = crd.trainingjob_crd()["spec"]["versions"][0]["schema"]["openAPIV3Schema"]
    return schema


def test_the_committed_crd_equals_the_generated_one() -> None:
    committed = (ROOT / "charts/kiln/crds/trainingjob.yaml").read_text()
    assert committed == crd.trainingjob_crd_yaml(), "run `make crd` to regenerate charts/kiln/crds/"


def test_the_crd_schema_is_structural() -> None:
    forbidden = {"$ref", "anyOf", "allOf", "oneOf", "title", "$defs", "const"}
    for path, node in _walk(_schema()):
        assert not forbidden & node.keys(), f"{path}: {forbidden & node.keys()}"
        assert "type" in node, f"{path}: every node needs a type"
        if node.get("x-kubernetes-preserve-unknown-fields"):
            continue
        if node["type"] == "object" and path not in (".metadata",):
            assert "properties" in node or "additionalProperties" in node, f"{path}: object without fields"
        assert not ("properties" in node and "additionalProperties" in node), path
        for strict in ("exclusiveMinimum", "exclusiveMaximum"):
            assert node.get(strict, True) is True, f"{path}: {strict} must be boolean in OpenAPI v3.0"


def test_the_crd_names_and_subresources_match_the_api() -> None:
    whole = yaml.safe_load(crd.trainingjob_crd_yaml())
    assert whole["apiVersion"] == "apiextensions.k8s.io/v1"
    assert whole["metadata"]["name"] == "trainingjobs.kiln.dev"
    assert whole["spec"]["names"]["shortNames"] == ["tj"]
    version = whole["spec"]["versions"][0]
    assert version["name"] == api.VERSION and version["subresources"] == {"status": {}}
    columns = [c["name"] for c in version["additionalPrinterColumns"]]
    assert columns == ["Phase", "Ready", "Epoch", "Accuracy", "Model", "Endpoint", "Age"]


def test_the_crd_carries_defaults_enums_bounds_and_descriptions_from_the_model() -> None:
    spec = _schema()["properties"]["spec"]["properties"]
    assert spec["training"]["properties"]["epochs"] == {
        "default": 10,
        "description": "Maximum number of epochs.",
        "maximum": 100000,
        "minimum": 1,
        "type": "integer",
    }
    assert spec["data"]["properties"]["dataset"]["enum"] == ["cifar10", "imagefolder", "digits", "fake"]
    assert spec["export"]["properties"]["variants"]["items"]["enum"] == list(api.VARIANTS)
    assert spec["training"]["default"] == {}, "nested sections default to {} so their fields get defaults"
    status = _schema()["properties"]["status"]
    assert status["x-kubernetes-preserve-unknown-fields"] is True, "kopf's bookkeeping must survive pruning"
    assert status["properties"]["phase"]["enum"] == list(api.phases())
    conditions = status["properties"]["conditions"]
    assert (conditions["x-kubernetes-list-type"], conditions["x-kubernetes-list-map-keys"]) == ("map", ["type"])
    assert conditions["items"]["properties"]["type"]["enum"] == list(api.condition_types())
    assert {"Succeeded", "Ready", "Failed"} <= set(api.condition_types())
    assert "type" in conditions["items"]["required"], "a map key must be required"


def test_the_crd_has_cel_rules_for_immutability_paths_and_variants() -> None:
    spec = _schema()["properties"]["spec"]
    for section in ("model", "data", "training", "export"):
        rules = spec["properties"][section]["x-kubernetes-validations"]
        assert {"rule": "self == oldSelf"}.items() <= rules[0].items()
    data_rules = [r["rule"] for r in spec["properties"]["data"]["x-kubernetes-validations"]]
    assert any("has(self.path)" in r for r in data_rules)
    assert any("serving.variant" in r["rule"] for r in spec["x-kubernetes-validations"])
