"""Datasets: read from disk (never downloaded), split deterministically from the seed, augment, normalise.

Every dataset is read once as a *source* of ``(image, label)`` pairs (PIL images or uint8 CHW tensors); the
train and validation splits are index views of it with their own transforms, so the split is identical on
every rank and every restart.
"""

import logging
import pickle
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torchvision
from PIL import Image, UnidentifiedImageError
from torch.utils.data import DataLoader, Dataset, DistributedSampler, Subset
from torchvision.transforms import v2

from kiln import api
from kiln.api import constants
from kiln_trainer import errors, models

log = logging.getLogger(__name__)

Item = tuple[torch.Tensor, int]
Transform = Callable[[Any], torch.Tensor]

# FakeData size when data.maxSamples does not say.
FAKE_DEFAULT_SAMPLES = 1024


@dataclass
class DataBundle:
    """The splits and what the model and the model card need to know about them."""

    train: Dataset[Item]  # training split, augmented
    train_eval: Dataset[Item]  # the same split without augmentation (training accuracy, calibration)
    val: Dataset[Item]  # validation split, no augmentation
    test: Dataset[Item] | None  # held-out test set, no augmentation; never used to select anything
    class_names: list[str]
    num_classes: int
    image_size: int
    mean: list[float]
    std: list[float]


class _Source(Dataset[tuple[Any, int]]):
    """Raw ``(image, label)`` pairs plus the class names, before any split or transform."""

    class_names: list[str]

    def __len__(self) -> int:
        raise NotImplementedError


class _Split(Dataset[Item]):
    """An index view of a source with its own transform (train and validation share one source)."""

    def __init__(self, source: Dataset[tuple[Any, int]], indices: Sequence[int], transform: Transform) -> None:
        self.source, self.indices, self.transform = source, list(indices), transform

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, i: int) -> Item:
        image, label = self.source[self.indices[i]]
        return self.transform(image), int(label)


class _Cifar10(torchvision.datasets.CIFAR10):  # type: ignore[misc]
    """torchvision's CIFAR-10 loader with its md5 checks replaced by presence checks.

    The real loader reads the real pickle batches; only the checksums of the official archive are dropped, so
    a re-packed or generated CIFAR-format folder loads too. ``download`` is never passed.
    """

    meta = {**torchvision.datasets.CIFAR10.meta, "md5": None}  # check_integrity(path, None) = file exists

    def __init__(self, folder: Path, train: bool = True) -> None:
        # Accept the batches folder itself or the folder holding cifar-10-batches-py/.
        if (folder / "data_batch_1").is_file() or (folder / "test_batch").is_file():
            self.base_folder = ""
        super().__init__(str(folder), train=train, download=False)

    def _check_integrity(self) -> bool:
        folder = Path(self.root) / self.base_folder
        return all((folder / name).is_file() for name, _ in (self.train_list if self.train else self.test_list))


class _Digits(_Source):
    """scikit-learn's bundled 8x8 digits (1,797 real images, no download), upscaled to the input size and
    replicated to 3 channels so every architecture accepts them."""

    def __init__(self, image_size: int) -> None:
        from sklearn.datasets import load_digits

        digits = load_digits()
        grey = torch.from_numpy(digits.images.astype(np.float32) / 16.0).unsqueeze(1)
        big = torch.nn.functional.interpolate(grey, size=(image_size, image_size), mode="bilinear")
        self.images = (big.clamp(0, 1) * 255).round().to(torch.uint8).expand(-1, 3, -1, -1).contiguous()
        self.labels = [int(t) for t in digits.target]
        self.class_names = [str(i) for i in range(10)]

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> tuple[Any, int]:
        return self.images[i], self.labels[i]


class _Wrapped(_Source):
    """A torchvision dataset as a source."""

    def __init__(self, dataset: Dataset[tuple[Any, Any]], class_names: list[str]) -> None:
        self.dataset, self.class_names = dataset, class_names

    def __len__(self) -> int:
        return len(self.dataset)  # type: ignore[arg-type]

    def __getitem__(self, i: int) -> tuple[Any, int]:
        image, label = self.dataset[i]
        return image, int(label)


def _load_image(path: str) -> Image.Image:
    """ImageFolder's loader, but an unreadable file is a config error naming the file."""
    try:
        with open(path, "rb") as f:
            return Image.open(f).convert("RGB")
    except (UnidentifiedImageError, OSError) as err:
        raise errors.ConfigError(f"data.path: cannot read image {path}: {err}") from None


def _dataset_path(spec: api.TrainingJobSpec, value: str | None, field: str = "data.path") -> Path:
    """A dataset folder (data.path, data.testPath), resolved inside the data volume when one is mounted and the
    path is relative."""
    assert value is not None  # the API requires data.path for datasets that read files
    path = Path(value)
    if spec.data.volume is not None and not path.is_absolute():
        path = Path(constants.DATA_MOUNT) / path
    if not path.exists():
        raise errors.ConfigError(f"{field}: {path} does not exist (dataset {spec.data.dataset})")
    if not path.is_dir():
        raise errors.ConfigError(f"{field}: {path} is not a folder (dataset {spec.data.dataset})")
    return path


def _image_folder(path: Path, field: str) -> torchvision.datasets.ImageFolder:
    try:
        return torchvision.datasets.ImageFolder(str(path), loader=_load_image)
    except FileNotFoundError:
        raise errors.ConfigError(
            f"{field}: {path} holds no images for imagefolder (expected one sub-folder per class with "
            "image files in it)"
        ) from None


def _read_cifar10(path: Path, train: bool) -> _Cifar10:
    try:
        return _Cifar10(path, train=train)
    except RuntimeError:
        wanted = "data_batch_1..5 and batches.meta" if train else "test_batch and batches.meta"
        raise errors.ConfigError(
            f"data.path: {path} holds no CIFAR-10 python batches ({wanted}, directly or under cifar-10-batches-py/)"
        ) from None
    except (pickle.UnpicklingError, EOFError, KeyError, ValueError) as err:
        raise errors.ConfigError(f"data.path: {path}: malformed CIFAR-10 batch file: {err!r}") from None


def _read_test_source(spec: api.TrainingJobSpec, class_names: list[str]) -> _Source | None:
    """The dataset's own test set: CIFAR-10's test_batch, or the imagefolder at data.testPath; None when the
    dataset has none (data.testSplit may then hold one out)."""
    dataset = spec.data.dataset
    if dataset == "cifar10":
        cifar = _read_cifar10(_dataset_path(spec, spec.data.path), train=False)
        source: _Source = _Wrapped(cifar, list(cifar.classes))
    elif dataset == "imagefolder" and spec.data.test_path is not None:
        folder = _image_folder(_dataset_path(spec, spec.data.test_path, "data.testPath"), "data.testPath")
        source = _Wrapped(folder, list(folder.classes))
    else:
        if spec.data.test_path is not None:
            raise errors.ConfigError(f"data.testPath: only imagefolder reads a test folder, not {dataset}")
        return None
    if spec.data.test_split is not None:
        raise errors.ConfigError(f"data.testSplit: {dataset} at {spec.data.path} has its own test set; unset testSplit")
    if source.class_names != class_names:
        raise errors.ConfigError(
            f"data.testPath: the test classes ({', '.join(source.class_names[:5])}) differ from the training "
            f"classes ({', '.join(class_names[:5])})"
        )
    return source


def _read_source(spec: api.TrainingJobSpec, image_size: int) -> _Source:
    """Open the dataset named in the spec; every way it can be missing or malformed is a ConfigError."""
    dataset = spec.data.dataset
    if dataset == "digits":
        return _Digits(image_size)
    if dataset == "fake":
        classes = api.resolved_num_classes(spec) or 10
        fake = torchvision.datasets.FakeData(
            size=spec.data.max_samples or FAKE_DEFAULT_SAMPLES,
            image_size=(3, image_size, image_size),
            num_classes=classes,
            random_offset=spec.training.seed,
        )
        return _Wrapped(fake, [str(i) for i in range(classes)])
    path = _dataset_path(spec, spec.data.path)
    if dataset == "cifar10":
        cifar = _read_cifar10(path, train=True)
        return _Wrapped(cifar, list(cifar.classes))
    folder = _image_folder(path, "data.path")
    return _Wrapped(folder, list(folder.classes))


def _split_indices(size: int, spec: api.TrainingJobSpec) -> tuple[list[int], list[int], list[int]]:
    """A seeded permutation, cut to maxSamples, then cut into validation (the head), test (the tail, when
    data.testSplit asks for one) and training (the rest) indices."""
    order = np.random.default_rng(spec.training.seed).permutation(size)
    if spec.data.max_samples is not None:
        order = order[: spec.data.max_samples]
    n_val = max(1, round(len(order) * spec.data.validation_split))
    n_test = max(1, round(len(order) * spec.data.test_split)) if spec.data.test_split is not None else 0
    if len(order) - n_val - n_test < 1:
        raise errors.ConfigError(
            f"data: {len(order)} samples leave nothing to train on after a validationSplit of "
            f"{spec.data.validation_split} and a testSplit of {spec.data.test_split or 0}"
        )
    test = order[len(order) - n_test :] if n_test else order[:0]
    return [int(i) for i in order[n_val : len(order) - n_test]], [int(i) for i in order[:n_val]], [int(i) for i in test]


def build_transforms(
    spec: api.TrainingJobSpec, image_size: int, mean: list[float], std: list[float]
) -> tuple[Transform, Transform]:
    """(training, evaluation) transforms. Evaluation is exactly what the server does: resize to a square,
    scale to [0, 1], normalise, so validation accuracy predicts serving accuracy."""
    aug = spec.data.augment
    train_ops: list[Any] = [v2.ToImage()]
    if aug.random_resized_crop:
        train_ops.append(v2.RandomResizedCrop(image_size, antialias=True))
    else:
        train_ops.append(v2.Resize((image_size, image_size), antialias=True))
    if aug.random_crop:
        train_ops.append(v2.RandomCrop(image_size, padding=aug.crop_padding))
    if aug.horizontal_flip:
        train_ops.append(v2.RandomHorizontalFlip())
    if aug.rotation_degrees > 0:
        train_ops.append(v2.RandomRotation(aug.rotation_degrees))
    tail = [v2.ToDtype(torch.float32, scale=True), v2.Normalize(mean, std), v2.ToPureTensor()]
    evaluation = [v2.ToImage(), v2.Resize((image_size, image_size), antialias=True), *tail]
    return v2.Compose(train_ops + tail), v2.Compose(evaluation)


def _normalization(spec: api.TrainingJobSpec) -> tuple[list[float], list[float]]:
    """Mean and std for the three RGB channels (a single value applies to all three): data.normalize, else
    the normalisation named torchvision weights were trained with, else the dataset's usual one."""
    own = models.weights_normalization(spec) if spec.data.normalize is None else None
    if own is not None:
        return own
    norm = api.resolved_normalize(spec)
    if len(norm.mean) == 1:
        return norm.mean * 3, norm.std * 3
    if len(norm.mean) != 3:
        raise errors.ConfigError(f"data.normalize: images are RGB, so give 1 or 3 channels, not {len(norm.mean)}")
    return list(norm.mean), list(norm.std)


def load_data(spec: api.TrainingJobSpec, *, rank: int = 0, world_size: int = 1) -> DataBundle:
    """Read, split and wrap the dataset. Every rank builds the same full splits; the training sampler
    (``build_loader``) shards them, so ``rank`` and ``world_size`` only decide who logs the summary."""
    image_size = api.resolved_image_size(spec)
    mean, std = _normalization(spec)
    source = _read_source(spec, image_size)
    class_names = source.class_names
    num_classes = len(class_names)
    if spec.model.num_classes is not None and spec.model.num_classes != num_classes:
        raise errors.ConfigError(
            f"model.numClasses: {spec.model.num_classes} does not match the {num_classes} classes of "
            f"{spec.data.dataset} data ({', '.join(class_names[:5])}{', ...' if num_classes > 5 else ''})"
        )
    if num_classes < 2:
        raise errors.ConfigError(f"data: {spec.data.dataset} has {num_classes} class; at least 2 are needed")
    train_idx, val_idx, test_idx = _split_indices(len(source), spec)
    train_tf, eval_tf = build_transforms(spec, image_size, mean, std)
    test_source = _read_test_source(spec, class_names)
    test: Dataset[Item] | None = None
    if test_source is not None:
        test = _Split(test_source, range(len(test_source)), eval_tf)
    elif test_idx:
        test = _Split(source, test_idx, eval_tf)
    if rank == 0:
        log.info(
            "data: %s, %d training, %d validation and %d test images of %dx%d, %d classes (world size %d)",
            spec.data.dataset,
            len(train_idx),
            len(val_idx),
            len(test) if test is not None else 0,  # type: ignore[arg-type]
            image_size,
            image_size,
            num_classes,
            world_size,
        )
    return DataBundle(
        train=_Split(source, train_idx, train_tf),
        train_eval=_Split(source, train_idx, eval_tf),
        val=_Split(source, val_idx, eval_tf),
        test=test,
        class_names=class_names,
        num_classes=num_classes,
        image_size=image_size,
        mean=mean,
        std=std,
    )


def build_loader(
    dataset: Dataset[Item],
    spec: api.TrainingJobSpec,
    *,
    train: bool,
    epoch: int = 0,
    rank: int = 0,
    world_size: int = 1,
    pin_memory: bool = False,
) -> DataLoader[Item]:
    """A DataLoader whose order and augmentation depend only on (seed, epoch, rank): the sampler shuffles with
    seed+epoch (the same permutation on every rank, sharded by rank) and worker seeds come from a generator
    seeded with (seed, epoch, rank), so every rank augments differently and a resumed epoch replays exactly.
    Training drops a last short batch (BatchNorm cannot train on one image); evaluation keeps every image."""
    workers = spec.data.num_workers
    batch = spec.training.batch_size
    generator = torch.Generator().manual_seed(rank_seed(spec.training.seed, epoch, rank))
    sampler: DistributedSampler[Item] | None = None
    if train:
        sampler = DistributedSampler(dataset, num_replicas=world_size, rank=rank, shuffle=True, seed=spec.training.seed)
        sampler.set_epoch(epoch)
    return DataLoader(
        dataset,
        batch_size=batch if train else api.eval_batch_size(spec),
        sampler=sampler,
        shuffle=False,
        num_workers=workers,
        pin_memory=pin_memory,
        drop_last=train and sampler is not None and len(sampler) > batch,
        generator=generator,
        prefetch_factor=api.LOADER_PREFETCH_FACTOR if workers > 0 else None,
    )


def rank_seed(*parts: int) -> int:
    """One 63-bit seed from (seed, epoch, rank, ...): a hash, so neighbouring tuples give unrelated streams."""
    return int(np.random.SeedSequence(list(parts)).generate_state(2, dtype=np.uint64)[0] >> np.uint64(1))


def clean_train_subset(bundle: DataBundle) -> Dataset[Item]:
    """As many training images as the validation split holds (evenly spread, no augmentation): what the
    overfitting check scores the best model on, in eval mode, beside its validation accuracy."""
    size, count = len(bundle.train_eval), len(bundle.val)  # type: ignore[arg-type]
    step = max(1, size // max(count, 1))
    return Subset(bundle.train_eval, list(range(0, size, step))[:count])


def stack_images(dataset: Dataset[Item], limit: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """The first ``limit`` items as float32 NCHW images and int64 labels, in dataset order (for the compile
    step's accuracy checks and calibration)."""
    count = len(dataset) if limit is None else min(limit, len(dataset))  # type: ignore[arg-type]
    images, labels = [], []
    for i in range(count):
        image, label = dataset[i]
        images.append(image.numpy())
        labels.append(label)
    if not images:
        return np.zeros((0, 3, 1, 1), dtype=np.float32), np.zeros((0,), dtype=np.int64)
    return np.stack(images).astype(np.float32), np.asarray(labels, dtype=np.int64)
