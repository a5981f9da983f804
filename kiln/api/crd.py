"""Generate the TrainingJob CustomResourceDefinition from the pydantic models.

The models are the single source of truth: their JSON schema is rewritten into a structural
openAPIV3Schema (refs inlined, nullable unions collapsed, draft-2020 keywords turned into OpenAPI 3.0
ones), then the CEL rules, printer columns and status subresource are added. `kiln crd` prints this;
charts/kiln/crds/trainingjob.yaml is its output, kept equal by a test.
"""

from typing import Any

import yaml

from kiln.api.constants import GROUP, KIND, PLURAL, SHORT_NAMES, SINGULAR, VERSION
from kiln.api.spec import TrainingJobSpec
from kiln.api.status import TrainingJobStatus
from kiln.api.training import DATASETS_NEEDING_PATH

Schema = dict[str, Any]

# What the API server refuses, with messages a user can act on. Keyed by the property they sit on.
# Everything the operator cannot change on a running job is immutable, each with what to do instead; what it
# can act on (runPolicy: suspend, deadlines, retries, TTL; the serving section) is reconciled on every edit.
IMMUTABLE_SECTIONS: dict[str, str] = {
    "model": "the network is fixed once training starts",
    "data": "the data set is fixed once training starts",
    "training": "the training loop is fixed once training starts",
    "evaluation": "evaluation runs inside training",
    "export": "the compile step runs inside training",
    "resources": "the trainer Job's pods cannot be resized or moved",
    "artifacts": "checkpoints and the model are already written there",
}
_needs_path = ", ".join(f"'{d}'" for d in DATASETS_NEEDING_PATH)
SPEC_RULES: list[Schema] = [
    {
        "rule": "!has(self.serving) || !has(self.serving.variant) || self.serving.variant in ['auto', 'fp32'] "
        "|| (has(self.export) && has(self.export.variants) && self.serving.variant in self.export.variants)",
        "message": "serving.variant must be 'auto' or one of export.variants",
    },
]
PROPERTY_RULES: dict[str, list[Schema]] = {
    section: [
        {
            "rule": "self == oldSelf",
            "message": f"{section} is immutable after creation; create a new TrainingJob to change it "
            f"({why}; runPolicy and serving can be edited in place)",
        }
    ]
    for section, why in IMMUTABLE_SECTIONS.items()
}
PROPERTY_RULES["data"].append(
    {
        "rule": f"!has(self.dataset) || !(self.dataset in [{_needs_path}]) || has(self.path)",
        "message": "data.path is required for datasets cifar10 and imagefolder",
    }
)

PRINTER_COLUMNS: list[Schema] = [
    {"name": "Phase", "type": "string", "jsonPath": ".status.phase"},
    # The Ready condition, so a serving outage shows although the phase stays Serving.
    {"name": "Ready", "type": "string", "jsonPath": '.status.conditions[?(@.type=="Ready")].status'},
    {"name": "Epoch", "type": "integer", "jsonPath": ".status.progress.epoch"},
    {"name": "Accuracy", "type": "number", "jsonPath": ".status.progress.valAccuracy"},
    {"name": "Model", "type": "string", "jsonPath": ".status.model.variant"},
    {"name": "Endpoint", "type": "string", "jsonPath": ".status.endpoint", "priority": 0},
    {"name": "Age", "type": "date", "jsonPath": ".metadata.creationTimestamp"},
]

DESCRIPTION = "A TrainingJob trains an image classifier, compiles it to ONNX and serves it."
_DROP = {"title", "$defs"}


def _structural(node: Any, defs: Schema) -> Any:
    """Rewrite one JSON-schema node into OpenAPI v3.0 as the API server accepts it."""
    if isinstance(node, list):
        return [_structural(n, defs) for n in node]
    if not isinstance(node, dict):
        return node
    node = dict(node)
    while "$ref" in node or "anyOf" in node:
        if "$ref" in node:  # inline the definition; siblings (description, default) win
            target = defs[node.pop("$ref").split("/")[-1]]
            node = {**target, **node}
        if "anyOf" in node:  # X | None -> X
            options = [o for o in node.pop("anyOf") if o.get("type") != "null"]
            if len(options) != 1:
                raise ValueError(f"unsupported union in schema: {options}")
            node = {**options[0], **node}
    if node.get("default", 0) is None:
        del node["default"]
    for bound, strict in (("minimum", "exclusiveMinimum"), ("maximum", "exclusiveMaximum")):
        if isinstance(node.get(strict), int | float) and not isinstance(node.get(strict), bool):
            node[bound], node[strict] = node[strict], True
    if node.get("additionalProperties") is False or node.get("x-kubernetes-preserve-unknown-fields"):
        node.pop("additionalProperties", None)
    if node.get("additionalProperties") is True:
        node.pop("additionalProperties")
        node["x-kubernetes-preserve-unknown-fields"] = True
    out: Schema = {}
    for key, value in node.items():
        if key in _DROP:
            continue
        if key == "properties":
            out[key] = {k: _structural(v, defs) for k, v in value.items()}
        elif key in ("items", "additionalProperties"):
            out[key] = _structural(value, defs)
        else:
            out[key] = value
    return out


def openapi_schema(model: type[TrainingJobSpec] | type[TrainingJobStatus]) -> Schema:
    """A model's structural openAPIV3Schema."""
    raw = model.model_json_schema(by_alias=True, mode="validation")
    result: Schema = _structural(raw, raw.get("$defs", {}))
    return result


def trainingjob_crd() -> Schema:
    """The whole CustomResourceDefinition as a dict."""
    spec = openapi_schema(TrainingJobSpec)
    spec["x-kubernetes-validations"] = SPEC_RULES
    for prop, rules in PROPERTY_RULES.items():
        spec["properties"][prop]["x-kubernetes-validations"] = rules
    status = openapi_schema(TrainingJobStatus)
    # kopf keeps its own bookkeeping under status; without this the API server would prune it.
    status["x-kubernetes-preserve-unknown-fields"] = True
    return {
        "apiVersion": "apiextensions.k8s.io/v1",
        "kind": "CustomResourceDefinition",
        "metadata": {"name": f"{PLURAL}.{GROUP}", "labels": {"app.kubernetes.io/part-of": "kiln"}},
        "spec": {
            "group": GROUP,
            "names": {
                "kind": KIND,
                "listKind": f"{KIND}List",
                "plural": PLURAL,
                "singular": SINGULAR,
                "shortNames": list(SHORT_NAMES),
                "categories": ["kiln", "all"],
            },
            "scope": "Namespaced",
            "versions": [
                {
                    "name": VERSION,
                    "served": True,
                    "storage": True,
                    "subresources": {"status": {}},
                    "additionalPrinterColumns": PRINTER_COLUMNS,
                    "schema": {
                        "openAPIV3Schema": {
                            "type": "object",
                            "description": DESCRIPTION,
                            "properties": {
                                "apiVersion": {"type": "string"},
                                "kind": {"type": "string"},
                                "metadata": {"type": "object"},
                                "spec": spec,
                                "status": status,
                            },
                        }
                    },
                }
            ],
        },
    }


def trainingjob_crd_yaml() -> str:
    """The CRD as YAML, as committed in charts/kiln/crds/."""
    header = "# Generated by `kiln crd` from kiln.api; do not edit by hand.\n"
    return header + yaml.safe_dump(trainingjob_crd(), sort_keys=False, width=120)
