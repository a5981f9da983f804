"""Networks: a small built-in CNN and any torchvision classification model, optionally with pretrained
weights from a local file or a torchvision weight name (IMAGENET1K_V2) found in the weights volume or the
torch hub cache, downloaded only when the spec allows it, from its mirror when it names one."""

import logging
import os
import urllib.parse
from enum import Enum
from pathlib import Path

import torch
import torchvision
from torch import nn

from kiln import api
from kiln.api import constants
from kiln_trainer import errors

log = logging.getLogger(__name__)

# Models whose auxiliary classifiers only matter with pretrained ImageNet recipes; built without them so
# training mode returns plain logits like every other model.
_AUX_LOGITS = ("googlenet", "inception_v3")


class SmallCNN(nn.Module):
    """Three conv-BN-ReLU-pool stages and a linear head: ~100k parameters, enough for digits (>= 95% in a
    few CPU epochs) and a quick CIFAR-10 baseline; plain ops, so it exports and quantizes cleanly."""

    def __init__(self, num_classes: int, width: int = 32) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        channels = 3
        for out in (width, width * 2, width * 4):
            layers += [nn.Conv2d(channels, out, 3, padding=1, bias=False), nn.BatchNorm2d(out), nn.ReLU(inplace=True)]
            layers.append(nn.MaxPool2d(2))
            channels = out
        self.features = nn.Sequential(*layers)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Sequential(nn.Flatten(), nn.Dropout(0.1), nn.Linear(channels, num_classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.pool(self.features(x)))  # type: ignore[no-any-return]


def _read_weights(path: Path) -> dict[str, torch.Tensor]:
    """A state dict from a local file: a bare state dict, or a checkpoint holding one under model/state_dict."""
    if not path.is_file():
        raise errors.ConfigError(f"model.weights: {path} does not exist")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # torch raises many types for a bad file
        raise errors.ConfigError(f"model.weights: {path} is not a readable PyTorch state dict: {err}") from None
    if isinstance(obj, dict):
        for key in ("model", "state_dict"):
            if isinstance(obj.get(key), dict):
                obj = obj[key]
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise errors.ConfigError(f"model.weights: {path} does not hold a state dict of tensors")
    return obj


def load_weights(model: nn.Module, path: Path, num_classes: int, fresh: frozenset[str] = frozenset()) -> None:
    """Load pretrained weights for fine-tuning: tensors whose shape differs only because the class count
    differs (the classifier), and the ``fresh`` ones (a replaced stem), keep their fresh initialisation;
    anything else that does not fit is an error."""
    weights = _read_weights(path)
    own = model.state_dict()
    fitting, reinitialised = {}, []
    for key, tensor in weights.items():
        if key in fresh:
            reinitialised.append(key)
        elif key not in own:
            if "aux" in key.lower():  # auxiliary heads this trainer builds without
                continue
            raise errors.ConfigError(f"model.weights: {path} has {key!r}, which the architecture lacks")
        if tensor.shape == own[key].shape:
            fitting[key] = tensor
        elif own[key].shape[:1] == (num_classes,):
            reinitialised.append(key)
        else:
            raise errors.ConfigError(
                f"model.weights: {path}: {key!r} has shape {tuple(tensor.shape)}, the architecture wants "
                f"{tuple(own[key].shape)}"
            )
    missing = sorted(k for k in own if k not in weights and not k.endswith("num_batches_tracked"))
    if missing:
        raise errors.ConfigError(f"model.weights: {path} lacks {len(missing)} tensors, e.g. {missing[0]!r}")
    model.load_state_dict(fitting, strict=False)
    if reinitialised:
        log.info("model: loaded %s; re-initialised %s for %d classes", path, ", ".join(reinitialised), num_classes)
    else:
        log.info("model: loaded %s", path)


def named_weights(spec: api.TrainingJobSpec) -> Enum | None:
    """The torchvision weights model.weights names (IMAGENET1K_V2 or ResNet50_Weights.IMAGENET1K_V2), or None
    when it is a file path (it has a slash or a file suffix, or names no weights of the architecture)."""
    value, arch = spec.model.weights, spec.model.architecture
    if not value or "/" in value or value.endswith((".pt", ".pth", ".bin")) or arch == "small-cnn":
        return None
    enum_name, _, member = value.rpartition(".")
    try:
        weights = torchvision.models.get_model_weights(arch)
    except (KeyError, ValueError):
        return None
    if member not in weights.__members__:
        if enum_name or member.isupper():
            known = ", ".join(weights.__members__)
            raise errors.ConfigError(f"model.weights: {arch} has no weights {value!r} (torchvision has: {known})")
        return None
    if enum_name and enum_name != weights.__name__:
        raise errors.ConfigError(f"model.weights: {value!r} are not {arch}'s weights ({weights.__name__})")
    return weights[member]  # type: ignore[no-any-return]


def weights_normalization(spec: api.TrainingJobSpec) -> tuple[list[float], list[float]] | None:
    """The mean and std the named weights were trained with (the default normalisation when they are used)."""
    weights = named_weights(spec)
    if weights is None:
        return None
    transforms = weights.transforms()  # type: ignore[attr-defined]
    return list(transforms.mean), list(transforms.std)


def resolve_weights_file(spec: api.TrainingJobSpec, weights: Enum) -> Path:
    """The file of named weights: the weights volume, then the torch hub cache ($TORCH_HOME/hub/checkpoints);
    else, when model.allowDownload is on, downloaded into the cache from model.weightsMirror (or torchvision's
    URL). The file name is torchvision's, so a pre-filled cache or volume is found as it is."""
    url: str = weights.url  # type: ignore[attr-defined]
    filename = os.path.basename(urllib.parse.urlparse(url).path)
    cache = Path(torch.hub.get_dir()) / "checkpoints"
    places = [Path(constants.WEIGHTS_MOUNT) / filename, cache / filename]
    for place in places:
        if place.is_file():
            return place
    if not spec.model.allow_download:
        raise errors.ConfigError(
            f"model.weights: {spec.model.weights} ({filename}) is in neither {places[0]} nor {places[1]}; "
            "put the file there (model.weightsVolume) or set model.allowDownload"
        )
    source = f"{spec.model.weights_mirror.rstrip('/')}/{filename}" if spec.model.weights_mirror else url
    cache.mkdir(parents=True, exist_ok=True)
    log.info("model: downloading %s to %s", source, places[1])
    try:
        torch.hub.download_url_to_file(source, str(places[1]), progress=False)
    except OSError as err:  # URLError and HTTPError are OSErrors
        raise errors.ConfigError(f"model.weights: cannot download {source}: {err}") from None
    return places[1]


def head_parameter_names(model: nn.Module) -> set[str]:
    """Names of the classifier head's parameters: those of the last top-level child that has parameters (fc,
    classifier, heads or head in torchvision's models, classifier in SmallCNN)."""
    children = [(name, child) for name, child in model.named_children() if any(True for _ in child.parameters())]
    if not children:
        return set()
    name, head = children[-1]
    return {f"{name}.{param}" for param, _ in head.named_parameters()}


def _cifar_stem(model: nn.Module) -> frozenset[str]:
    """Swap a ResNet's ImageNet stem (7x7 stride-2 conv, max-pool) for a 3x3 stride-1 conv and no pool, so
    32x32 images keep a 4x4 map in the last stage; returns the stem keys pretrained weights cannot fill."""
    if not isinstance(model, torchvision.models.ResNet):
        raise errors.ConfigError(f"model.stem: cifar applies to ResNets, not {type(model).__name__}")
    model.conv1 = nn.Conv2d(3, model.conv1.out_channels, kernel_size=3, stride=1, padding=1, bias=False)
    nn.init.kaiming_normal_(model.conv1.weight, mode="fan_out", nonlinearity="relu")
    model.maxpool = nn.Identity()
    return frozenset({"conv1.weight"})


def build_model(spec: api.TrainingJobSpec, num_classes: int) -> nn.Module:
    """The architecture named in the spec with ``num_classes`` outputs, on CPU, in training mode."""
    name = spec.model.architecture
    fresh: frozenset[str] = frozenset()
    if name == "small-cnn":
        model: nn.Module = SmallCNN(num_classes)
    else:
        if name not in torchvision.models.list_models(module=torchvision.models):
            raise errors.ConfigError(f"model.architecture: unknown architecture {name!r}")
        extra = {"aux_logits": False, "init_weights": True} if name in _AUX_LOGITS else {}
        model = torchvision.models.get_model(name, weights=None, num_classes=num_classes, **extra)
    if spec.model.stem == "cifar":
        fresh = _cifar_stem(model)
    if spec.model.weights:
        named = named_weights(spec)
        path = resolve_weights_file(spec, named) if named is not None else Path(spec.model.weights)
        load_weights(model, path, num_classes, fresh)
    return model


def check_input_size(model: nn.Module, image_size: int, device: torch.device) -> None:
    """One forward pass on blank images before training, so an input the architecture cannot take (e.g.
    8x8 images for squeezenet, under 75x75 for inception_v3) is a config error now, not a crash later."""
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            model(torch.zeros(1, 3, image_size, image_size, device=device))
    except RuntimeError as err:
        first_line = str(err).splitlines()[0] if str(err) else type(err).__name__
        raise errors.ConfigError(
            f"data.imageSize: {image_size}x{image_size} images are too small or malformed for "
            f"{type(model).__name__}: {first_line}"
        ) from None
    finally:
        model.train(was_training)
