"""Hostile specs: volume sources from an allow-list only, hostPath and image overrides only where the operator's
configuration allows them; every refusal names the field and says what to do."""

import pytest

from kiln import api
from kiln_operator import config, policy, reconciler

STRICT = config.OperatorConfig()


def body(spec: dict[str, object]) -> dict[str, object]:
    return {"metadata": {"name": "digits", "namespace": "team-a", "uid": "u"}, "spec": spec}


@pytest.mark.parametrize("source", ["iscsi", "secret", "projected", "rbd"])
def test_a_volume_source_outside_the_allow_list_is_refused_by_the_model(source: str) -> None:
    with pytest.raises(ValueError, match=f"exactly one volume source.*{source} not allowed"):
        api.TrainingJobSpec.model_validate({"data": {"volume": {source: {}}}})


def test_a_volume_must_name_exactly_one_source() -> None:
    both = {"persistentVolumeClaim": {"claimName": "a"}, "nfs": {"server": "n", "path": "/"}}
    with pytest.raises(ValueError, match="exactly one volume source"):
        api.TrainingJobSpec.model_validate({"artifacts": {"volume": both}})
    for source in ("persistentVolumeClaim", "configMap", "emptyDir", "csi", "nfs", "ephemeral"):
        assert api.TrainingJobSpec.model_validate({"data": {"volume": {source: {}}}}).data.volume == {source: {}}


def test_host_path_is_refused_naming_the_field_unless_the_configuration_allows_it() -> None:
    spec = {"artifacts": {"volume": {"hostPath": {"path": "/"}}}}
    with pytest.raises(reconciler.InvalidSpec, match=r"spec\.artifacts\.volume\.hostPath: .*policy\.allowHostPath"):
        reconciler.validate(body(spec), STRICT)
    allowed = reconciler.validate(body(spec), config.OperatorConfig(allow_host_path=True))
    assert allowed.artifacts.volume == {"hostPath": {"path": "/"}}


def test_image_overrides_are_refused_unless_allowed_or_under_an_allowed_registry_prefix() -> None:
    spec = {"resources": {"image": "evil.example/miner:1"}, "serving": {"image": "reg.example/team-evil/x:1"}}
    with pytest.raises(reconciler.InvalidSpec) as refused:
        reconciler.validate(body(spec), config.OperatorConfig(allowed_image_prefixes=("reg.example/team",)))
    message = str(refused.value)
    assert "spec.resources.image: image 'evil.example/miner:1' is not allowed" in message
    assert "spec.serving.image: image 'reg.example/team-evil/x:1' is not allowed" in message  # not a path prefix
    prefixed = config.OperatorConfig(allowed_image_prefixes=("reg.example/team", "evil.example/"))
    assert policy.image_allowed("reg.example/team/trainer:2", prefixed)
    assert policy.image_allowed("evil.example/miner:1", prefixed)
    assert reconciler.validate(body(spec), config.OperatorConfig(allow_image_overrides=True))
    assert reconciler.validate(body({}), STRICT) == api.TrainingJobSpec()


def test_the_policy_is_read_from_the_environment() -> None:
    cfg = config.OperatorConfig.from_env(
        {
            "KILN_ALLOW_HOST_PATH": "true",
            "KILN_ALLOWED_IMAGE_PREFIXES": "reg.example/team, ghcr.example/kiln/",
            "KILN_EXPORT_DEADLINE_SECONDS": "120",
        }
    )
    assert cfg.allow_host_path and not cfg.allow_image_overrides
    assert cfg.allowed_image_prefixes == ("reg.example/team", "ghcr.example/kiln/")
    assert cfg.export_deadline_seconds == 120
    with pytest.raises(config.ConfigError, match="KILN_EXPORT_DEADLINE_SECONDS"):
        config.OperatorConfig.from_env({"KILN_EXPORT_DEADLINE_SECONDS": "soon"})
