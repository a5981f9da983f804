"""Bad input to the compile step: a clear CompileError, and nothing half-written that looks valid."""

from pathlib import Path

import pytest
import torch
import trainer_support as support

from kiln import api
from kiln.api import constants
from kiln_trainer import compile as compiler
from kiln_trainer import errors

SIZE = support.COMPILE_SIZE


class Branchy(support.TinyNet):
    """Chooses its output by the data it sees, which torch.export refuses to capture."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.body(x)
        return y if y.sum() > 0 else -y


def _spec(*variants: str) -> api.TrainingJobSpec:
    return api.TrainingJobSpec.model_validate({"export": {"variants": list(variants)}})


def _compile(spec: api.TrainingJobSpec, inputs: compiler.CompileInputs, output_dir: Path) -> api.ModelCard:
    return compiler.compile_model(spec, inputs, output_dir, "tiny", repeats=1, threads=1)


def test_int8_static_with_no_calibration_images_fails_before_anything_is_written(tmp_path: Path) -> None:
    output_dir = tmp_path / "out"
    with pytest.raises(errors.CompileError, match="int8-static needs calibration images"):
        _compile(_spec("fp32", "int8-static"), support.compile_inputs(support.TinyNet(), calibration=0), output_dir)
    assert not output_dir.exists()


def test_without_int8_static_no_calibration_images_are_needed(tmp_path: Path) -> None:
    card = _compile(_spec("fp32", "int8-dynamic"), support.compile_inputs(support.TinyNet(), calibration=0), tmp_path)
    assert [v.name for v in card.variants] == ["fp32", "int8-dynamic"]


def test_validation_images_that_do_not_match_the_preprocessing_are_refused(tmp_path: Path) -> None:
    inputs = support.compile_inputs(support.TinyNet())
    inputs.preprocessing = api.Preprocessing(image_size=SIZE * 2, mean=[0.5] * 3, std=[0.5] * 3)
    with pytest.raises(errors.CompileError, match=r"validation images are \(3, 16, 16\), the preprocessing says"):
        _compile(_spec("fp32"), inputs, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_a_model_whose_outputs_do_not_match_the_class_names_is_refused(tmp_path: Path) -> None:
    with pytest.raises(errors.CompileError, match=r"logits of shape \(5,\), expected \(3,\) for 3 classes"):
        _compile(_spec("fp32"), support.compile_inputs(support.TinyNet(outputs=5)), tmp_path)
    assert list(tmp_path.iterdir()) == []


def test_a_failed_compile_leaves_the_previous_compile_untouched_and_no_staging_behind(tmp_path: Path) -> None:
    torch.manual_seed(0)
    before = _compile(_spec("fp32", "int8-static"), support.compile_inputs(support.TinyNet()), tmp_path)

    with pytest.raises(errors.CompileError, match="cannot be exported to ONNX"):
        _compile(_spec("fp32", "int8-static"), support.compile_inputs(Branchy()), tmp_path)

    assert sorted(p.name for p in tmp_path.iterdir()) == [constants.MODEL_CARD_FILE, constants.MODELS_DIR]
    assert api.ModelCard.read(tmp_path / constants.MODEL_CARD_FILE) == before
    for variant in before.variants:
        assert api.file_sha256(tmp_path / variant.path) == variant.sha256


def test_a_recompile_replaces_the_models_and_the_card_and_clears_a_killed_compiles_leftovers(tmp_path: Path) -> None:
    _compile(_spec("fp32", "int8-dynamic", "int8-static"), support.compile_inputs(support.TinyNet()), tmp_path)
    leftover = tmp_path / f"{compiler.STAGING_PREFIX}killed"
    (leftover / "models").mkdir(parents=True)

    card = _compile(_spec("fp32", "fp16"), support.compile_inputs(support.TinyNet()), tmp_path)

    assert sorted(p.name for p in tmp_path.iterdir()) == [constants.MODEL_CARD_FILE, constants.MODELS_DIR]
    assert sorted(p.name for p in (tmp_path / constants.MODELS_DIR).iterdir()) == ["fp16", "fp32"]
    assert [v.name for v in card.variants] == ["fp32", "fp16"]
    assert api.ModelCard.read(tmp_path / constants.MODEL_CARD_FILE) == card
