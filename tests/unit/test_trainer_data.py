"""Datasets on real data: digits, a generated CIFAR-10 folder read by torchvision's real loader, an image
folder, FakeData; the split, the transforms and stack_images."""

from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch
import trainer_support as support

from kiln_trainer import data, errors, loop


@pytest.fixture(autouse=True)
def _one_thread() -> Iterator[None]:
    with support.threads(1):
        yield


def _indices(bundle: data.DataBundle) -> tuple[list[int], list[int]]:
    return bundle.train.indices, bundle.val.indices  # type: ignore[attr-defined]


def test_digits_are_three_channel_normalised_images_of_the_requested_size_with_named_classes() -> None:
    bundle = data.load_data(support.spec(data={"imageSize": 24}))
    image, label = bundle.train[0]
    assert image.shape == (3, 24, 24) and image.dtype == torch.float32
    assert torch.equal(image[0], image[1]) and torch.equal(image[1], image[2])  # grey replicated
    assert bundle.class_names == [str(i) for i in range(10)] and bundle.num_classes == 10
    assert isinstance(label, int) and 0 <= label < 10
    assert image.min() >= -1.0 - 1e-6 and image.max() <= 1.0 + 1e-6  # mean 0.5, std 0.5
    assert len(bundle.train) + len(bundle.val) == 1797
    assert len(bundle.val) == round(1797 * 0.2)


def test_the_split_is_disjoint_and_depends_only_on_the_seed() -> None:
    first = _indices(data.load_data(support.spec()))
    again = _indices(data.load_data(support.spec()))
    other = _indices(data.load_data(support.spec(training={"seed": 7})))
    assert first == again
    assert first != other
    train, val = first
    assert not set(train) & set(val)


def test_max_samples_caps_the_data_before_the_split() -> None:
    bundle = data.load_data(support.spec(data={"maxSamples": 100, "validationSplit": 0.25}))
    assert (len(bundle.train), len(bundle.val)) == (75, 25)


def test_augmentation_changes_training_images_but_never_evaluation_images() -> None:
    spec = support.spec(data={"augment": {"randomCrop": True, "horizontalFlip": True, "rotationDegrees": 15}})
    bundle = data.load_data(spec)
    torch.manual_seed(0)
    augmented = [bundle.train[0][0] for _ in range(4)]
    assert any(not torch.equal(augmented[0], a) for a in augmented[1:])
    assert torch.equal(bundle.train_eval[0][0], bundle.train_eval[0][0])
    assert bundle.train_eval[0][1] == bundle.train[0][1]


def test_stack_images_returns_float32_nchw_and_int64_labels_in_dataset_order() -> None:
    bundle = data.load_data(support.spec())
    images, labels = data.stack_images(bundle.val, limit=5)
    assert images.shape == (5, 3, 32, 32) and images.dtype == np.float32 and labels.dtype == np.int64
    assert np.array_equal(images[2], bundle.val[2][0].numpy()) and labels[2] == bundle.val[2][1]
    all_images, _ = data.stack_images(bundle.val)
    assert len(all_images) == len(bundle.val)


def test_a_generated_cifar10_folder_is_read_by_torchvisions_loader_and_trains_one_epoch(tmp_path: Path) -> None:
    # torchvision.datasets.CIFAR10 itself reads the pickles; kiln's subclass only swaps its md5 checks of the
    # official archive for presence checks, so these generated batch files load.
    folder = support.write_cifar10(tmp_path / "cifar", per_batch=20)
    spec = support.spec(data={"dataset": "cifar10", "path": str(folder)}, training={"epochs": 1, "batchSize": 16})
    bundle = data.load_data(spec)
    assert bundle.class_names == support.CIFAR_CLASSES
    assert len(bundle.train) + len(bundle.val) == 100  # five training batches of 20; test_batch is not used
    assert bundle.train[0][0].shape == (3, 32, 32)
    result = loop.train(spec, tmp_path / "out", compile=False, log_format="json")
    assert result.summary.epochs_run == 1 and result.summary.dataset == "cifar10"
    assert 0.0 <= result.metrics.accuracy <= 1.0  # type: ignore[operator]


def test_the_cifar10_batches_folder_itself_is_accepted_as_the_path(tmp_path: Path) -> None:
    folder = support.write_cifar10(tmp_path / "cifar", per_batch=4) / "cifar-10-batches-py"
    bundle = data.load_data(support.spec(data={"dataset": "cifar10", "path": str(folder)}))
    assert len(bundle.train) + len(bundle.val) == 20


def test_an_image_folder_gives_one_class_per_sub_folder_resized_to_the_image_size(tmp_path: Path) -> None:
    folder = support.write_image_folder(tmp_path / "images")
    bundle = data.load_data(support.spec(data={"dataset": "imagefolder", "path": str(folder), "imageSize": 16}))
    assert bundle.class_names == ["circle", "square"] and bundle.num_classes == 2
    assert bundle.val[0][0].shape == (3, 16, 16)
    assert bundle.mean == [0.485, 0.456, 0.406]


def test_fake_data_has_the_requested_size_and_classes() -> None:
    spec = support.spec(data={"dataset": "fake", "maxSamples": 40, "imageSize": 16}, model={"numClasses": 3})
    bundle = data.load_data(spec)
    assert len(bundle.train) + len(bundle.val) == 40
    assert bundle.num_classes == 3 and bundle.train[0][0].shape == (3, 16, 16)


def test_a_class_count_that_contradicts_the_data_is_a_config_error(tmp_path: Path) -> None:
    folder = support.write_image_folder(tmp_path / "images")
    spec = support.spec(data={"dataset": "imagefolder", "path": str(folder)}, model={"numClasses": 5})
    with pytest.raises(errors.ConfigError, match="model.numClasses: 5 does not match the 2 classes"):
        data.load_data(spec)


def test_an_unreadable_image_is_a_config_error_naming_the_file(tmp_path: Path) -> None:
    folder = support.write_image_folder(tmp_path / "images")
    (folder / "circle" / "0.png").write_bytes(b"not a png")
    bundle = data.load_data(support.spec(data={"dataset": "imagefolder", "path": str(folder)}))
    with pytest.raises(errors.ConfigError, match="cannot read image .*0.png"):
        data.stack_images(bundle.train_eval)
        data.stack_images(bundle.val)
