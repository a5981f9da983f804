"""Mixup and CutMix on training batches, the way timm's ``Mixup`` does it: per batch, with ``probability``,
either blend two images (mixup) or paste a box of one into the other (CutMix), and mix their one-hot
targets by the same share. Randomness comes from torch's global generator, which the loop seeds per
(seed, epoch, rank), so a resumed epoch mixes exactly as the first run did."""

import math

import torch

from kiln import api


class Mixer:
    """Mixes (images, class indices) into (images, soft targets) for a loss that takes class probabilities."""

    def __init__(self, spec: api.MixupSpec, num_classes: int) -> None:
        self.spec, self.num_classes = spec, num_classes

    def _share(self, alpha: float) -> float:
        return float(torch.distributions.Beta(alpha, alpha).sample())

    def __call__(self, images: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The mixed batch and its mixed one-hot targets (cross-entropy's label smoothing applies to them)."""
        soft = torch.nn.functional.one_hot(targets, self.num_classes).to(images.dtype)
        spec = self.spec
        use_mixup, use_cutmix = spec.mixup_alpha > 0, spec.cutmix_alpha > 0
        if not (use_mixup or use_cutmix) or float(torch.rand(())) >= spec.probability:
            return images, soft
        cutmix = use_cutmix and (not use_mixup or float(torch.rand(())) < spec.switch_probability)
        partner = torch.roll(torch.arange(len(images), device=images.device), 1)
        if cutmix:
            share = self._share(spec.cutmix_alpha)
            images, share = cut_and_paste(images, partner, share)
        else:
            share = self._share(spec.mixup_alpha)
            images = images * share + images[partner] * (1 - share)
        return images, soft * share + soft[partner] * (1 - share)


def cut_and_paste(images: torch.Tensor, partner: torch.Tensor, share: float) -> tuple[torch.Tensor, float]:
    """CutMix: a box covering 1 - ``share`` of the area, at a random centre and clipped to the image, taken
    from each image's partner; returns the images and the share of each image that remains its own."""
    height, width = images.shape[-2:]
    cut = math.sqrt(1.0 - share)
    box_h, box_w = int(height * cut), int(width * cut)
    cy, cx = int(torch.randint(height, ())), int(torch.randint(width, ()))
    top, bottom = max(cy - box_h // 2, 0), min(cy + box_h // 2, height)
    left, right = max(cx - box_w // 2, 0), min(cx + box_w // 2, width)
    mixed = images.clone()
    mixed[..., top:bottom, left:right] = images[partner][..., top:bottom, left:right]
    return mixed, 1.0 - (bottom - top) * (right - left) / (height * width)
