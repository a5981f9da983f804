"""The held-out test set (CIFAR-10's test batch, data.testPath, data.testSplit) and per-rank randomness of
the training loaders."""

from pathlib import Path

import pytest
import torch
import trainer_support as support

from kiln_trainer import data, errors


def test_cifar10_reads_its_official_test_batch_as_the_test_set(tmp_path: Path) -> None:
    folder = support.write_cifar10(tmp_path / "cifar", per_batch=12)
    bundle = data.load_data(support.spec(data={"dataset": "cifar10", "path": str(folder)}))
    assert bundle.test is not None and len(bundle.test) == 12  # type: ignore[arg-type]
    assert len(bundle.train) + len(bundle.val) == 5 * 12  # type: ignore[arg-type]
    image, label = bundle.test[0]
    assert image.shape == (3, 32, 32) and 0 <= label < 10


def test_a_cifar10_folder_without_a_test_batch_is_a_config_error(tmp_path: Path) -> None:
    folder = support.write_cifar10(tmp_path / "cifar", per_batch=4)
    (folder / "cifar-10-batches-py" / "test_batch").unlink()
    with pytest.raises(errors.ConfigError, match="test_batch"):
        data.load_data(support.spec(data={"dataset": "cifar10", "path": str(folder)}))


def test_imagefolder_reads_the_test_folder_and_refuses_other_classes(tmp_path: Path) -> None:
    train = support.write_image_folder(tmp_path / "train", per_class=5)
    test = support.write_image_folder(tmp_path / "test", per_class=3)
    spec = support.spec(data={"dataset": "imagefolder", "path": str(train), "testPath": str(test), "imageSize": 16})
    bundle = data.load_data(spec)
    assert bundle.test is not None and len(bundle.test) == 6  # type: ignore[arg-type]
    other = support.write_image_folder(tmp_path / "other", classes=("circle", "star"), per_class=2)
    with pytest.raises(errors.ConfigError, match="differ from the training classes"):
        data.load_data(support.spec(data={"dataset": "imagefolder", "path": str(train), "testPath": str(other)}))


def test_a_test_split_is_held_out_deterministically_and_apart_from_training_and_validation() -> None:
    spec = support.spec(data={"testSplit": 0.1, "maxSamples": 400})
    train, val, test = data._split_indices(1797, spec)
    assert len(test) == 40 and len(val) == 80 and len(train) == 280
    assert not (set(test) & set(train)) and not (set(test) & set(val))
    assert data._split_indices(1797, spec) == (train, val, test)
    assert data.load_data(spec).test is not None
    assert data.load_data(support.spec()).test is None  # no testSplit, no test set


def _constant_dataset(size: int) -> torch.utils.data.Dataset[data.Item]:
    """One image repeated, augmented by random crops and flips: batches differ only by the RNG."""
    spec = support.spec(data={"augment": {"randomCrop": True, "horizontalFlip": True}})
    augment, _ = data.build_transforms(spec, 16, [0.5] * 3, [0.5] * 3)
    image = torch.arange(3 * 16 * 16, dtype=torch.float32).reshape(3, 16, 16) % 251
    image = image.to(torch.uint8)

    class Constant(torch.utils.data.Dataset[data.Item]):
        def __len__(self) -> int:
            return size

        def __getitem__(self, i: int) -> data.Item:
            return augment(image), 0

    return Constant()


def _first_batch(rank: int) -> torch.Tensor:
    spec = support.spec(data={"numWorkers": 1}, training={"batchSize": 8})
    loader = data.build_loader(_constant_dataset(32), spec, train=True, epoch=3, rank=rank, world_size=2)
    images, _ = next(iter(loader))
    return images


def test_each_rank_augments_differently_and_a_rerun_replays_exactly() -> None:
    rank0, rank1 = _first_batch(0), _first_batch(1)
    assert not torch.equal(rank0, rank1)
    assert torch.equal(_first_batch(0), rank0)
