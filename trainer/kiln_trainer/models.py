"""Networks: a small built-in CNN and any torchvision classification model, optionally from local weights."""

import logging
from pathlib import Path

import torch
import torchvision
from torch import nn

from kiln import api
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


def load_weights(model: nn.Module, path: Path, num_classes: int) -> None:
    """Load pretrained weights for fine-tuning: tensors whose shape differs only because the class count
    differs (the classifier) keep their fresh initialisation; anything else that does not fit is an error."""
    weights = _read_weights(path)
    own = model.state_dict()
    fitting, reinitialised = {}, []
    for key, tensor in weights.items():
        if key not in own:
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


def build_model(spec: api.TrainingJobSpec, num_classes: int) -> nn.Module:
    """The architecture named in the spec with ``num_classes`` outputs, on CPU, in training mode."""
    name = spec.model.architecture
    if name == "small-cnn":
        model: nn.Module = SmallCNN(num_classes)
    else:
        if name not in torchvision.models.list_models(module=torchvision.models):
            raise errors.ConfigError(f"model.architecture: unknown architecture {name!r}")
        extra = {"aux_logits": False, "init_weights": True} if name in _AUX_LOGITS else {}
        model = torchvision.models.get_model(name, weights=None, num_classes=num_classes, **extra)
    if spec.model.weights:
        load_weights(model, Path(spec.model.weights), num_classes)
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
