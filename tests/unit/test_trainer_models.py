"""Model building: the architecture list, the built-in CNN, torchvision models and local pretrained weights."""

from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
import torchvision
import trainer_support as support

from kiln.api import architectures
from kiln_trainer import errors, models


@pytest.fixture(autouse=True)
def _one_thread() -> Iterator[None]:
    with support.threads(1):
        yield


def test_the_api_architecture_list_equals_torchvisions_classification_models() -> None:
    assert architectures.TORCHVISION_ARCHITECTURES == set(torchvision.models.list_models(module=torchvision.models))


@pytest.mark.parametrize("architecture", ["small-cnn", "resnet18", "mobilenet_v3_small", "googlenet"])
def test_a_built_model_maps_a_batch_of_images_to_one_logit_per_class(architecture: str) -> None:
    model = models.build_model(support.spec(model={"architecture": architecture}), num_classes=7)
    size = 64 if architecture == "googlenet" else 32
    model.train()
    assert model(torch.randn(2, 3, size, size)).shape == (2, 7)  # plain logits in training mode too
    model.eval()
    with torch.no_grad():
        assert model(torch.randn(1, 3, size, size)).shape == (1, 7)


def test_pretrained_weights_are_loaded_and_a_classifier_for_another_class_count_is_reinitialised(
    tmp_path: Path,
) -> None:
    torch.manual_seed(0)
    pretrained = models.build_model(support.spec(), num_classes=5)
    torch.save(pretrained.state_dict(), tmp_path / "weights.pt")
    torch.manual_seed(1)
    model = models.build_model(support.spec(model={"weights": str(tmp_path / "weights.pt")}), num_classes=10)
    mine, theirs = model.state_dict(), pretrained.state_dict()
    for key, tensor in mine.items():
        if key.startswith("classifier."):
            assert tensor.shape[0] == 10  # the new head, freshly initialised
        else:
            assert torch.equal(tensor, theirs[key]), key


def test_weights_inside_a_checkpoint_dict_are_found(tmp_path: Path) -> None:
    pretrained = models.build_model(support.spec(), num_classes=10)
    torch.save({"model": pretrained.state_dict(), "epoch": 3}, tmp_path / "ckpt.pt")
    model = models.build_model(support.spec(model={"weights": str(tmp_path / "ckpt.pt")}), num_classes=10)
    theirs = pretrained.state_dict()
    assert all(torch.equal(tensor, theirs[key]) for key, tensor in model.state_dict().items())


def test_weights_of_another_architecture_are_refused_naming_a_tensor(tmp_path: Path) -> None:
    torch.save(torchvision.models.squeezenet1_1(num_classes=10).state_dict(), tmp_path / "other.pt")
    with pytest.raises(errors.ConfigError, match="model.weights: .*other.pt has 'features.0.weight'|shape"):
        models.build_model(support.spec(model={"weights": str(tmp_path / "other.pt")}), num_classes=10)


def test_missing_or_unreadable_weights_are_config_errors(tmp_path: Path) -> None:
    with pytest.raises(errors.ConfigError, match="does not exist"):
        models.build_model(support.spec(model={"weights": str(tmp_path / "nope.pt")}), num_classes=10)
    (tmp_path / "junk.pt").write_bytes(b"junk")
    with pytest.raises(errors.ConfigError, match="not a readable PyTorch state dict"):
        models.build_model(support.spec(model={"weights": str(tmp_path / "junk.pt")}), num_classes=10)


def test_an_image_size_the_architecture_cannot_take_is_a_config_error() -> None:
    model = models.build_model(support.spec(model={"architecture": "squeezenet1_1"}), num_classes=10)
    with pytest.raises(errors.ConfigError, match="data.imageSize: 8x8 images are too small .* SqueezeNet"):
        models.check_input_size(model, 8, torch.device("cpu"))
    models.check_input_size(model, 32, torch.device("cpu"))
    assert model.training  # left as it was
