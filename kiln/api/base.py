"""The base every API model shares: camelCase on the wire, unknown fields refused."""

import datetime
from typing import Any

from pydantic import AliasGenerator, BaseModel, ConfigDict
from pydantic.alias_generators import to_camel


class ApiModel(BaseModel):
    """A Kubernetes-style object: camelCase keys, typos are errors rather than silently ignored."""

    model_config = ConfigDict(
        alias_generator=AliasGenerator(alias=to_camel),
        populate_by_name=True,
        extra="forbid",
        validate_default=True,
    )

    def to_dict(self) -> dict[str, object]:
        """The wire form: camelCase keys, unset optional fields left out."""
        return self.model_dump(mode="json", by_alias=True, exclude_none=True)


# json_schema_extra of a nested section that defaults to all its defaults: the CRD then defaults it to {}, so
# the API server fills in its fields too.
NESTED: dict[str, Any] = {"default": {}}

RFC3339 = "%Y-%m-%dT%H:%M:%SZ"  # how Kubernetes writes timestamps (UTC, whole seconds)


def now_rfc3339() -> str:
    """The current time in RFC 3339, as Kubernetes writes it: status times, progress updates and a model
    card's creation time."""
    return datetime.datetime.now(datetime.UTC).strftime(RFC3339)
