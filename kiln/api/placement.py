"""Where pods run and what extra metadata they carry: shared by the trainer's and the server's pods.

Kubernetes' own structures (affinity, tolerations, topology spread constraints, valueFrom) pass through
untouched; only what the operator relies on is checked here, so a mistake fails at admission with the field's
name instead of as a rejected Job or Deployment later.
"""

import re
from typing import Annotated, Any

from pydantic import Field, field_validator, model_validator

from kiln.api import constants
from kiln.api.base import ApiModel

# A Kubernetes object (passed through as written); the API server validates it when the pod is created.
KubeObject = Annotated[dict[str, Any], Field(json_schema_extra={"x-kubernetes-preserve-unknown-fields": True})]

_LABEL_NAME = re.compile(r"^([A-Za-z0-9]([-A-Za-z0-9_.]{0,61}[A-Za-z0-9])?)$")
_DNS_SUBDOMAIN = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$")
_ENV_NAME = re.compile(r"^[-._a-zA-Z][-._a-zA-Z0-9]*$")
AFFINITY_KEYS = ("nodeAffinity", "podAffinity", "podAntiAffinity")
SPREAD_REQUIRED = ("maxSkew", "topologyKey", "whenUnsatisfiable")


def _check_key(field: str, key: str) -> None:
    prefix, _, name = key.rpartition("/")
    if prefix and (len(prefix) > 253 or not _DNS_SUBDOMAIN.match(prefix)):
        raise ValueError(f"{field}: key {key!r} has an invalid prefix (a DNS subdomain)")
    if not _LABEL_NAME.match(name):
        raise ValueError(f"{field}: key {key!r} is not a valid name (at most 63 letters, digits, '-', '_', '.')")


class PodPlacement(ApiModel):
    """Scheduling constraints and extra metadata of a component's pods."""

    node_selector: dict[str, str] | None = Field(None, description="Node selector for the pods.")
    tolerations: list[KubeObject] | None = Field(None, description="Tolerations of the pods.")
    affinity: KubeObject | None = Field(
        None, description="Node and pod (anti-)affinity of the pods, as in a pod spec's affinity."
    )
    topology_spread_constraints: list[KubeObject] | None = Field(
        None,
        description="Topology spread constraints of the pods; one without labelSelector spreads this "
        "component's own pods of this job.",
    )
    priority_class_name: str | None = Field(None, max_length=253, description="PriorityClass of the pods.")
    pod_labels: dict[str, str] | None = Field(
        None, description="Extra labels on the pods; the operator's own labels (selectors) take precedence."
    )
    pod_annotations: dict[str, str] | None = Field(
        None, description="Extra annotations on the pods; the operator's own annotations take precedence."
    )

    @field_validator("pod_labels")
    @classmethod
    def _valid_labels(cls, labels: dict[str, str] | None) -> dict[str, str] | None:
        for key, value in (labels or {}).items():
            _check_key("podLabels", key)
            if value and not _LABEL_NAME.match(value):
                raise ValueError(f"podLabels: value {value!r} of {key!r} is not a valid label value")
        return labels

    @field_validator("pod_annotations")
    @classmethod
    def _valid_annotations(cls, annotations: dict[str, str] | None) -> dict[str, str] | None:
        for key in annotations or {}:
            _check_key("podAnnotations", key)
        return annotations

    @field_validator("affinity")
    @classmethod
    def _valid_affinity(cls, affinity: dict[str, Any] | None) -> dict[str, Any] | None:
        unknown = sorted(set(affinity or {}) - set(AFFINITY_KEYS))
        if unknown:
            raise ValueError(f"affinity: unknown key(s) {', '.join(unknown)}; use {', '.join(AFFINITY_KEYS)}")
        return affinity

    @field_validator("topology_spread_constraints")
    @classmethod
    def _valid_spread(cls, constraints: list[dict[str, Any]] | None) -> list[dict[str, Any]] | None:
        for index, constraint in enumerate(constraints or []):
            missing = [key for key in SPREAD_REQUIRED if key not in constraint]
            if missing:
                raise ValueError(f"topologySpreadConstraints[{index}]: missing {', '.join(missing)}")
        return constraints


class EnvVar(ApiModel):
    """An environment variable of the trainer container."""

    name: str = Field(..., min_length=1, max_length=256, description="Variable name.")
    value: str | None = Field(None, description="Literal value.")
    value_from: KubeObject | None = Field(
        None, description="A source for the value (secretKeyRef, configMapKeyRef, fieldRef, resourceFieldRef)."
    )

    @field_validator("name")
    @classmethod
    def _valid_name(cls, name: str) -> str:
        if not _ENV_NAME.match(name):
            raise ValueError(f"env: {name!r} is not a valid variable name")
        if name in constants.RESERVED_TRAINER_ENV:
            raise ValueError(f"env: {name} is set by the operator (rank, rendezvous and job identity)")
        return name

    @model_validator(mode="after")
    def _one_source(self) -> "EnvVar":
        if self.value is not None and self.value_from is not None:
            raise ValueError(f"env: {self.name} sets both value and valueFrom")
        return self
