"""The volume sources a TrainingJob may mount (data, weights, artifacts): one allow-list, enforced by the
spec's validation and, through the CRD's CEL rule, by the API server."""

from typing import Annotated, Any

from pydantic import AfterValidator, WithJsonSchema

# Exactly one per volume, its fields passed through untouched. Others (iscsi, rbd, secret, projected, ...) are
# refused here and by the API server; hostPath only where the operator's configuration allows it (checked by
# the operator, which then fails the job naming the field).
VOLUME_SOURCES: tuple[str, ...] = (
    "persistentVolumeClaim",
    "configMap",
    "emptyDir",
    "csi",
    "nfs",
    "ephemeral",
    "hostPath",
)
_ONE_SOURCE = (
    f"must set exactly one volume source: {', '.join(VOLUME_SOURCES[:-1])} (or hostPath where the operator allows it)"
)


def _one_known_source(volume: dict[str, Any]) -> dict[str, Any]:
    unknown = sorted(set(volume) - set(VOLUME_SOURCES))
    if unknown or len(volume) != 1:
        found = f"; {', '.join(unknown)} not allowed" if unknown else ""
        raise ValueError(f"{_ONE_SOURCE}{found}")
    return volume


VolumeSource = Annotated[
    dict[str, Any],
    AfterValidator(_one_known_source),
    WithJsonSchema(
        {
            "type": "object",
            "properties": {
                k: {
                    "type": "object",
                    "description": f"A {k} volume source, its fields as in a Pod's volume"
                    + (" (only where the operator's configuration allows it)." if k == "hostPath" else "."),
                    "x-kubernetes-preserve-unknown-fields": True,
                }
                for k in VOLUME_SOURCES
            },
            "x-kubernetes-validations": [
                {
                    "rule": f"[{', '.join(f'has(self.{k})' for k in VOLUME_SOURCES)}].exists_one(x, x)",
                    "message": _ONE_SOURCE,
                }
            ],
        }
    ),
]
