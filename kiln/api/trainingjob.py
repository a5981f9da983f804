"""The TrainingJob object and reading it from YAML/JSON with errors a user can act on."""

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from kiln.api.constants import API_VERSION, KIND
from kiln.api.spec import TrainingJobSpec
from kiln.api.status import TrainingJobStatus


class ConfigError(ValueError):
    """An invalid TrainingJob: the message names the file and every bad field."""


class ObjectMeta(BaseModel):
    """The part of Kubernetes' ObjectMeta kiln reads; everything else is kept as is."""

    model_config = ConfigDict(extra="allow")
    name: str = "trainingjob"
    namespace: str | None = None
    labels: dict[str, str] | None = None
    annotations: dict[str, str] | None = None


class TrainingJob(BaseModel):
    """A whole TrainingJob resource."""

    model_config = ConfigDict(populate_by_name=True, extra="forbid")
    api_version: str = Field(API_VERSION, alias="apiVersion")
    kind: str = KIND
    metadata: ObjectMeta = Field(default_factory=ObjectMeta)
    spec: TrainingJobSpec = Field(default_factory=TrainingJobSpec)
    status: TrainingJobStatus | None = None


def format_validation_error(err: ValidationError, source: str) -> str:
    """One line per problem, each naming the field by its camelCase path."""
    lines = []
    for e in err.errors():
        loc = ".".join(str(p) for p in e["loc"] if p not in ("function-after",))
        msg = e["msg"].removeprefix("Value error, ")
        lines.append(f"  {loc}: {msg}" if loc else f"  {msg}")
    return f"{source}: invalid TrainingJob\n" + "\n".join(lines)


def parse_trainingjob(data: Mapping[str, Any], source: str = "<input>") -> TrainingJob:
    """Validate a whole TrainingJob, or a bare spec, into a TrainingJob."""
    if not isinstance(data, Mapping):
        raise ConfigError(f"{source}: expected a mapping (a TrainingJob or its spec), got {type(data).__name__}")
    if "kind" in data or "apiVersion" in data or "spec" in data:
        kind, api_version = data.get("kind", KIND), data.get("apiVersion", API_VERSION)
        if kind != KIND or api_version != API_VERSION:
            raise ConfigError(f"{source}: expected kind {KIND} in {API_VERSION}, got {kind} in {api_version}")
        body: Mapping[str, Any] = {**data, "spec": data.get("spec") or {}}
    else:
        body = {"spec": data}
    try:
        return TrainingJob.model_validate(body)
    except ValidationError as err:
        raise ConfigError(format_validation_error(err, source)) from None


def load_trainingjob(path: Path) -> TrainingJob:
    """Read a TrainingJob (or its spec) from a YAML or JSON file."""
    try:
        text = path.read_text()
    except OSError as err:
        raise ConfigError(f"{path}: cannot read: {err.strerror or err}") from None
    try:
        docs = [d for d in yaml.safe_load_all(text) if d is not None]
    except yaml.YAMLError as err:
        raise ConfigError(f"{path}: not valid YAML: {err}") from None
    if len(docs) != 1:
        raise ConfigError(f"{path}: expected exactly one YAML document, found {len(docs)}")
    return parse_trainingjob(docs[0], str(path))
