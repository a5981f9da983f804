"""What the operator's configuration lets a TrainingJob ask for, beyond what the CRD already refuses.

Whoever may create a TrainingJob gets pods run for them by the operator, so the operator must not become a
way around the cluster's rules (a confused deputy): hostPath volumes reach the node's file system and are
refused unless the configuration allows them; image overrides run arbitrary code under kiln's labels and
are refused unless overrides are allowed or the image is under an allowed registry prefix. The CRD already
limits volumes to an allow-list of sources (kiln.api.volumes.VOLUME_SOURCES). Each refusal names the field.
"""

from kiln import api
from kiln_operator import config


def image_allowed(image: str, cfg: config.OperatorConfig) -> bool:
    """Overrides allowed, or the image sits under an allowed prefix at a path boundary ("reg.io/team" allows
    "reg.io/team/x:1" but not "reg.io/team-evil/x")."""
    if cfg.allow_image_overrides:
        return True
    return any(image == p or image.startswith(p if p.endswith("/") else p + "/") for p in cfg.allowed_image_prefixes)


def violations(spec: api.TrainingJobSpec, cfg: config.OperatorConfig) -> list[str]:
    """One line per refused field, saying what to do instead; empty when the spec is allowed."""
    found = []
    for field, volume in (("spec.data.volume", spec.data.volume), ("spec.artifacts.volume", spec.artifacts.volume)):
        if volume and "hostPath" in volume and not cfg.allow_host_path:
            found.append(
                f"{field}.hostPath: hostPath volumes are not allowed by the operator's configuration "
                "(chart value policy.allowHostPath); use a persistentVolumeClaim"
            )
    for field, image in (("spec.resources.image", spec.resources.image), ("spec.serving.image", spec.serving.image)):
        if image and not image_allowed(image, cfg):
            allowed = ", ".join(cfg.allowed_image_prefixes) or "none"
            found.append(
                f"{field}: image {image!r} is not allowed by the operator's configuration (allowed registry "
                f"prefixes: {allowed}; chart values policy.allowImageOverrides and policy.allowedImagePrefixes); "
                "remove the override to use the operator's image"
            )
    return found
