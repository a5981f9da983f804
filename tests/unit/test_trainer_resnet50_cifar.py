"""The seed's case at test size: ResNet50 with the CIFAR stem on a CIFAR-10-format folder (generated here,
a few images per batch), one epoch, test metrics from the folder's test_batch, compiled to fp32 ONNX. The
real run (50,000 images, a GPU) is bench/gpu_cifar10.py."""

from pathlib import Path

import pytest
import trainer_support as support

from kiln_trainer import loop


@pytest.mark.slow
def test_resnet50_with_the_cifar_stem_trains_an_epoch_reports_test_metrics_and_compiles(tmp_path: Path) -> None:
    folder = support.write_cifar10(tmp_path / "cifar", per_batch=8)
    spec = support.spec(
        model={"architecture": "resnet50", "stem": "cifar"},
        data={"dataset": "cifar10", "path": str(folder), "augment": {"randomCrop": True, "horizontalFlip": True}},
        training={
            "epochs": 1,
            "batchSize": 16,
            "optimizer": {"name": "sgd", "learningRate": 0.05, "weightDecay": 5e-4},
            "labelSmoothing": 0.1,
        },
        export={"variants": ["fp32"]},
    )
    with support.threads(2):
        result = loop.train(spec, tmp_path / "out", log_format="json")
    card = result.model_card
    assert card is not None and card.training.architecture == "resnet50"
    assert card.test_metrics is not None and card.test_metrics.samples == 8
    assert card.variant("fp32").test_accuracy is not None
    assert card.input.shape == [-1, 3, 32, 32] and card.output.shape == [-1, 10]
    assert (tmp_path / "out" / card.variant("fp32").path).is_file()
