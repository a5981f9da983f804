"""Model-card fixtures: one place that builds a valid card or training summary, tests override what they
are about."""

from typing import Any

from kiln import api


def training_summary(**overrides: Any) -> api.TrainingSummary:
    """A one-epoch small-cnn run on digits that stopped on its epochs."""
    fields: dict[str, Any] = {
        "architecture": "small-cnn",
        "dataset": "digits",
        "epochs_requested": 1,
        "epochs_run": 1,
        "best_epoch": 1,
        "best_val_accuracy": 0.9,
        "stop_reason": "epochs",
        "duration_seconds": 1.0,
    }
    return api.TrainingSummary(**{**fields, **overrides})


def model_card(**overrides: Any) -> api.ModelCard:
    """A card for a 10-class 32x32 model with one fp32 variant (the file need not exist)."""
    fields: dict[str, Any] = {
        "name": "digits",
        "created_at": "2026-11-28T12:00:00Z",
        "input": api.TensorSpec(name="input", shape=[-1, 3, 32, 32]),
        "output": api.TensorSpec(name="logits", shape=[-1, 10]),
        "class_names": [str(i) for i in range(10)],
        "preprocessing": api.Preprocessing(image_size=32, mean=[0.5] * 3, std=[0.5] * 3),
        "metrics": api.Metrics(accuracy=0.9),
        "training": training_summary(),
        "opset": 18,
        "exporter": "torch.onnx (dynamo)",
        "variants": [api.VariantReport(name="fp32", path="models/fp32/model.onnx", sha256="ab" * 32, size_bytes=1)],
        "selected": "fp32",
        "selection_reason": "only variant",
    }
    return api.ModelCard(**{**fields, **overrides})
