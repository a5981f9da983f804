"""The compile step end to end on real data: the built-in CNN trained on scikit-learn's digits, compiled to
every variant, each checked with real onnxruntime sessions."""

import json
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch

from kiln import api
from kiln.api import constants
from kiln_trainer import compile as compiler
from kiln_trainer import data, export, measure, models

# Train to a target, not for a fixed number of epochs: how far 4 epochs get depends on the CPU's numerics
# (89.4% on an AMD EPYC, above 90% elsewhere), reaching 95% does not.
TARGET_ACCURACY = 0.95
MAX_EPOCHS = 30


def _accuracy(model: torch.nn.Module, images: np.ndarray, labels: np.ndarray) -> float:
    model.eval()
    with torch.inference_mode():
        return float((model(torch.from_numpy(images)).argmax(1).numpy() == labels).mean())


def _train(model: torch.nn.Module, images: np.ndarray, labels: np.ndarray, val: tuple[np.ndarray, np.ndarray]) -> int:
    """A plain training loop, run until the small CNN reaches TARGET_ACCURACY on validation; returns the
    epochs it took."""
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    x, y = torch.from_numpy(images), torch.from_numpy(labels)
    generator = torch.Generator().manual_seed(0)
    for epoch in range(1, MAX_EPOCHS + 1):
        model.train()
        order = torch.randperm(len(x), generator=generator)
        for start in range(0, len(x), 64):
            batch = order[start : start + 64]
            loss = torch.nn.functional.cross_entropy(model(x[batch]), y[batch])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
        if _accuracy(model, *val) >= TARGET_ACCURACY:
            return epoch
    raise AssertionError(f"the small CNN did not reach {TARGET_ACCURACY} on digits in {MAX_EPOCHS} epochs")


class Compiled:
    """A compiled digits model and what went into it."""

    def __init__(self, card: api.ModelCard, output_dir: Path, inputs: compiler.CompileInputs) -> None:
        self.card, self.output_dir, self.inputs = card, output_dir, inputs


@pytest.fixture(scope="module")
def compiled(tmp_path_factory: pytest.TempPathFactory) -> Compiled:
    torch.manual_seed(0)
    spec = api.TrainingJobSpec.model_validate(
        {"export": {"variants": list(api.VARIANTS), "calibration": {"samples": 256}}}
    )
    bundle = data.load_data(spec)
    train_images, train_labels = data.stack_images(bundle.train_eval)
    val_images, val_labels = data.stack_images(bundle.val)
    model = models.build_model(spec, bundle.num_classes)
    epochs = _train(model, train_images, train_labels, (val_images, val_labels))
    accuracy = _accuracy(model, val_images, val_labels)
    inputs = compiler.CompileInputs(
        model=model,
        val_images=val_images,
        val_labels=val_labels,
        calibration_images=train_images,
        class_names=bundle.class_names,
        preprocessing=api.Preprocessing(image_size=bundle.image_size, mean=bundle.mean, std=bundle.std),
        training=api.TrainingSummary(
            architecture="small-cnn",
            dataset="digits",
            epochs_requested=MAX_EPOCHS,
            epochs_run=epochs,
            best_epoch=epochs,
            best_val_accuracy=accuracy,
            stop_reason="epochs",
            duration_seconds=1.0,
        ),
        metrics=api.Metrics(accuracy=accuracy),
    )
    output_dir = tmp_path_factory.mktemp("digits")
    card = compiler.compile_model(spec, inputs, output_dir, "digits", repeats=3, threads=1)
    return Compiled(card, output_dir, inputs)


def test_the_digits_cnn_compiles_to_all_four_variants(compiled: Compiled) -> None:
    assert [v.name for v in compiled.card.variants] == ["fp32", "fp16", "int8-dynamic", "int8-static"]
    for variant in compiled.card.variants:
        assert variant.path == f"models/{variant.name}/model.onnx"
        assert (compiled.output_dir / variant.path).is_file()
        assert variant.accuracy is not None and variant.latency_ms_batch1 and variant.latency_ms_batch32
        assert variant.max_abs_diff is not None and variant.top1_agreement is not None


def test_the_fp32_export_agrees_with_pytorch(compiled: Compiled) -> None:
    fp32 = compiled.card.variant("fp32")
    assert fp32.max_abs_diff is not None and fp32.max_abs_diff <= 1e-3
    assert fp32.top1_agreement is not None and fp32.top1_agreement >= 0.999
    # Independently of the card: the written file, run by onnxruntime, gives PyTorch's logits.
    images = compiled.inputs.val_images[:64]
    onnx_logits = measure.predict(measure.open_session(compiled.output_dir / fp32.path, threads=1), images)
    with torch.inference_mode():
        torch_logits = compiled.inputs.model(torch.from_numpy(images)).numpy()
    np.testing.assert_allclose(onnx_logits, torch_logits, atol=1e-3)


def test_the_trained_cnn_is_accurate_and_int8_static_stays_within_two_points(compiled: Compiled) -> None:
    fp32, int8 = compiled.card.variant("fp32"), compiled.card.variant("int8-static")
    # PyTorch reached the target; the fp32 export may differ on a near-tie image or two, never by a point.
    assert compiled.inputs.metrics.accuracy is not None and compiled.inputs.metrics.accuracy >= TARGET_ACCURACY
    assert fp32.accuracy is not None and fp32.accuracy >= compiled.inputs.metrics.accuracy - 0.01
    assert int8.accuracy is not None and int8.accuracy >= fp32.accuracy - 0.02
    assert not int8.rejected


def test_every_recorded_sha256_and_size_match_the_file(compiled: Compiled) -> None:
    for variant in compiled.card.variants:
        path = compiled.output_dir / variant.path
        assert api.file_sha256(path) == variant.sha256
        assert path.stat().st_size == variant.size_bytes


def test_the_card_on_disk_is_the_returned_card_and_lists_classes_and_preprocessing(compiled: Compiled) -> None:
    card = api.ModelCard.read(compiled.output_dir / constants.MODEL_CARD_FILE)
    assert card == compiled.card
    assert card.class_names == [str(i) for i in range(10)]
    assert card.input == api.TensorSpec(name="input", datatype="FP32", shape=[-1, 3, 32, 32])
    assert card.output == api.TensorSpec(name="logits", datatype="FP32", shape=[-1, 10])
    assert card.opset >= 18 and "dynamo=True" in card.exporter
    assert card.training.architecture == "small-cnn"


def test_every_variant_carries_class_names_and_preprocessing_as_onnx_metadata(compiled: Compiled) -> None:
    for variant in compiled.card.variants:
        meta = export.read_metadata(compiled.output_dir / variant.path)
        assert json.loads(meta["class_names"]) == compiled.card.class_names
        assert api.Preprocessing.model_validate(json.loads(meta["preprocessing"])) == compiled.card.preprocessing
        assert meta["kiln_variant"] == variant.name


def test_every_variant_keeps_float32_inputs_and_outputs_and_runs_at_any_batch_size(compiled: Compiled) -> None:
    images = compiled.inputs.val_images[:5]
    for variant in compiled.card.variants:
        session = measure.open_session(compiled.output_dir / variant.path, threads=1)
        assert session.get_inputs()[0].type == "tensor(float)"
        assert session.get_outputs()[0].type == "tensor(float)"
        for batch in (1, 5):
            (logits,) = session.run(["logits"], {"input": images[:batch]})
            assert logits.shape == (batch, 10)


def test_the_selected_variant_is_never_slower_than_fp32_and_has_an_optimised_graph(compiled: Compiled) -> None:
    card = compiled.card
    chosen, fp32 = card.variant(card.selected), card.variant("fp32")
    assert card.selected != "fp16"  # not serving on a GPU
    assert not chosen.rejected
    assert chosen.latency_ms_batch32 is not None and fp32.latency_ms_batch32 is not None
    assert chosen.latency_ms_batch32 <= fp32.latency_ms_batch32
    assert card.selection_reason.startswith("auto")
    assert chosen.optimized_path == f"models/{card.selected}/model.optimized.onnx"
    assert [v.name for v in card.variants if v.optimized_path] == [card.selected]
    optimized = compiled.output_dir / chosen.optimized_path
    onnx.checker.check_model(str(optimized))
    logits = measure.predict(measure.open_session(optimized, threads=1), compiled.inputs.val_images)
    assert measure.accuracy(logits, compiled.inputs.val_labels) == pytest.approx(chosen.accuracy, abs=0.01)


def test_the_output_folder_holds_only_models_and_the_card(compiled: Compiled) -> None:
    assert sorted(p.name for p in compiled.output_dir.iterdir()) == [constants.MODEL_CARD_FILE, constants.MODELS_DIR]
    assert sorted(p.name for p in (compiled.output_dir / constants.MODELS_DIR).iterdir()) == sorted(api.VARIANTS)
