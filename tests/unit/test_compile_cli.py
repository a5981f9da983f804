"""`kiln compile`: re-compiling a checkpoint without re-training, and exit code 78 with one clear line for a
checkpoint that cannot be compiled as configured."""

from pathlib import Path

import card_support
import pytest
import torch
import torchvision
import yaml

from kiln import api, cli
from kiln.api import constants
from kiln_trainer import checkpoint, models

SPEC = {
    "model": {"architecture": "small-cnn"},
    "data": {"dataset": "digits", "maxSamples": 300},
    "export": {"variants": ["fp32", "int8-static"], "calibration": {"samples": 32}},
}


def _write_config(path: Path, spec: dict[str, object], name: str = "digits-cnn") -> Path:
    job = {"apiVersion": constants.API_VERSION, "kind": constants.KIND, "metadata": {"name": name}, "spec": spec}
    path.write_text(yaml.safe_dump(job))
    return path


def _write_checkpoint(output_dir: Path, state_dict: dict[str, torch.Tensor] | None = None) -> Path:
    """A best.pt as the trainer writes it once training ended (the weights need not be trained)."""
    spec = api.TrainingJobSpec.model_validate(SPEC)
    torch.manual_seed(0)
    summary = card_support.training_summary(best_val_accuracy=0.1, duration_seconds=2.0)
    state = {
        "model": state_dict if state_dict is not None else models.build_model(spec, 10).state_dict(),
        "config": spec.to_dict(),
        "epoch": 1,
        "best_accuracy": 0.1,
        "class_names": [str(i) for i in range(10)],
        "metrics": api.Metrics(accuracy=0.1).to_dict(),
        "summary": summary.to_dict(),
    }
    path = checkpoint.best_checkpoint_path(output_dir)
    checkpoint.save_atomic(state, path)
    return path


def _compile(*args: str | Path) -> int:
    return cli.main(["compile", "--threads", "1", "--repeats", "1", *map(str, args)])


def test_kiln_compile_recompiles_the_best_checkpoint_into_models_and_a_card(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    _write_checkpoint(tmp_path)
    config = _write_config(tmp_path / "job.yaml", SPEC)

    assert _compile("--config", config, "--output", tmp_path) == 0

    card = api.ModelCard.read(tmp_path / constants.MODEL_CARD_FILE)
    assert card.name == "digits-cnn"
    assert [v.name for v in card.variants] == ["fp32", "int8-static"]
    assert card.training.epochs_run == 1 and card.metrics.accuracy == 0.1
    assert (tmp_path / card.variant(card.selected).path).is_file()
    assert "model-card.json: serving models/" in capsys.readouterr().out


def test_kiln_compile_without_a_config_uses_the_one_saved_in_the_checkpoint(tmp_path: Path) -> None:
    ckpt = _write_checkpoint(tmp_path / "run")
    assert _compile("--checkpoint", ckpt, "--output", tmp_path / "compiled", "--name", "again") == 0
    card = api.ModelCard.read(tmp_path / "compiled" / constants.MODEL_CARD_FILE)
    assert card.name == "again" and [v.name for v in card.variants] == ["fp32", "int8-static"]


def _assert_config_error(code: int, capsys: pytest.CaptureFixture[str], output_dir: Path, *needles: str) -> None:
    assert code == api.EXIT_CONFIG_ERROR
    lines = capsys.readouterr().err.strip().splitlines()
    assert lines[-1].startswith("kiln compile: error: checkpoint ")
    for needle in needles:
        assert needle in lines[-1]
    assert not (output_dir / constants.MODEL_CARD_FILE).exists()
    assert not (output_dir / constants.MODELS_DIR).exists()


def test_a_checkpoint_trained_for_another_config_exits_78(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    _write_checkpoint(tmp_path)
    config = _write_config(tmp_path / "job.yaml", {**SPEC, "model": {"architecture": "resnet18"}})
    code = _compile("--config", config, "--output", tmp_path)
    _assert_config_error(code, capsys, tmp_path, "different config", "resnet18", "leave out --config")


def test_weights_that_do_not_fit_the_architecture_exit_78(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    foreign = torchvision.models.resnet18(weights=None, num_classes=10).state_dict()
    ckpt = _write_checkpoint(tmp_path, state_dict=foreign)
    code = _compile("--checkpoint", ckpt, "--output", tmp_path)
    _assert_config_error(code, capsys, tmp_path, "does not fit small-cnn with 10 classes")


def test_a_corrupt_or_missing_checkpoint_exits_78(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    config = _write_config(tmp_path / "job.yaml", SPEC)
    _assert_config_error(_compile("--config", config, "--output", tmp_path), capsys, tmp_path, "does not exist")
    path = checkpoint.best_checkpoint_path(tmp_path)
    path.parent.mkdir(parents=True)
    path.write_bytes(b"not a checkpoint")
    _assert_config_error(_compile("--config", config, "--output", tmp_path), capsys, tmp_path, "corrupt")
