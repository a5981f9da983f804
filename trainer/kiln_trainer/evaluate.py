"""Evaluation: loss, accuracy, macro, weighted and per-class precision/recall/F1, confusion matrix,
pixel-space FGSM/PGD robustness, and the overfitting verdict over an epoch history. The metric maths is
scikit-learn's."""

from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from sklearn import metrics as skm
from torch import nn

from kiln import api


@dataclass
class EpochRecord:
    """What one epoch produced; the history of these drives early stopping, warnings and progress."""

    epoch: int  # 1-based: epochs completed
    train_loss: float
    train_accuracy: float  # on the augmented batches, in training mode
    val_loss: float
    val_accuracy: float
    samples_per_second: float
    duration_seconds: float
    learning_rate: float | None = None  # the rate the epoch's steps used (the first group's, at its start)


@dataclass
class Evaluation:
    """Validation figures of one model."""

    loss: float
    accuracy: float
    precision: float
    recall: float
    f1: float
    per_class: list[api.ClassMetrics]
    confusion_matrix: list[list[int]]
    weighted: tuple[float, float, float] = (0.0, 0.0, 0.0)  # support-weighted precision, recall, F1
    samples: int = 0

    def held_out(self) -> api.HeldOutMetrics:
        """These figures as the card's testMetrics."""
        return api.HeldOutMetrics(
            accuracy=self.accuracy,
            macro_precision=self.precision,
            macro_recall=self.recall,
            macro_f1=self.f1,
            weighted_precision=self.weighted[0],
            weighted_recall=self.weighted[1],
            weighted_f1=self.weighted[2],
            samples=self.samples,
            per_class=self.per_class,
        )

    def metrics(self, adversarial_accuracy: float | None = None) -> api.Metrics:
        return api.Metrics(
            accuracy=self.accuracy,
            precision=self.precision,
            recall=self.recall,
            f1=self.f1,
            adversarial_accuracy=adversarial_accuracy,
        )


def _defined(values: np.ndarray, mask: np.ndarray) -> list[float | None]:
    return [float(v) if m else None for v, m in zip(values, mask, strict=True)]


def score(labels: np.ndarray, predictions: np.ndarray, class_names: Sequence[str], loss: float) -> Evaluation:
    """Figures from labels and predictions. Macro averages weigh every class present in ``labels`` equally; a
    class absent from them has no recall or F1 (None, not 0) and stays out of the averages; a present class
    never predicted counts as precision 0."""
    classes = list(range(len(class_names)))
    precision, recall, f1, support = skm.precision_recall_fscore_support(
        labels, predictions, labels=classes, average=None, zero_division=0
    )
    present = support > 0
    predicted = np.bincount(predictions.astype(np.int64), minlength=len(classes))[: len(classes)] > 0
    per_class = [
        api.ClassMetrics(name=name, precision=p, recall=r, f1=f, support=int(s))
        for name, p, r, f, s in zip(
            class_names,
            _defined(precision, present | predicted),
            _defined(recall, present),
            _defined(f1, present),
            support,
            strict=True,
        )
    ]
    weights = support / max(int(support.sum()), 1)
    return Evaluation(
        loss=loss,
        accuracy=float(skm.accuracy_score(labels, predictions)) if len(labels) else 0.0,
        precision=float(np.mean(precision[present])) if present.any() else 0.0,
        recall=float(np.mean(recall[present])) if present.any() else 0.0,
        f1=float(np.mean(f1[present])) if present.any() else 0.0,
        per_class=per_class,
        confusion_matrix=skm.confusion_matrix(labels, predictions, labels=classes).tolist(),
        weighted=(float(precision @ weights), float(recall @ weights), float(f1 @ weights)),
        samples=len(labels),
    )


@torch.no_grad()
def evaluate(
    model: nn.Module,
    batches: Iterable[tuple[torch.Tensor, torch.Tensor]],
    class_names: Sequence[str],
    *,
    device: torch.device,
    amp_dtype: torch.dtype | None = None,
    channels_last: bool = False,
) -> Evaluation:
    """Run the model over the validation batches in eval mode and score it. Leaves the model in eval mode."""
    model.eval()
    loss_sum = torch.zeros((), dtype=torch.float64, device=device)
    predictions, labels = [], []
    for images, targets in batches:
        images = images.to(device, non_blocking=True)
        targets = targets.to(device, non_blocking=True)
        if channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        with torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
            logits = model(images)
        loss_sum += nn.functional.cross_entropy(logits.float(), targets, reduction="sum")
        predictions.append(logits.argmax(dim=1).cpu())
        labels.append(targets.cpu())
    y_pred = torch.cat(predictions).numpy() if predictions else np.zeros(0, dtype=np.int64)
    y_true = torch.cat(labels).numpy() if labels else np.zeros(0, dtype=np.int64)
    return score(y_true, y_pred, class_names, float(loss_sum) / max(len(y_true), 1))


def attack_steps(spec: api.AdversarialSpec) -> tuple[int, float]:
    """(steps, step size in pixels): one step of epsilon for FGSM; for PGD ``steps`` of stepSize, by default
    2.5 * epsilon / steps (Madry et al.), enough to reach the ball's edge from the clean image."""
    if spec.attack == "fgsm":
        return 1, spec.epsilon
    return spec.steps, spec.step_size if spec.step_size is not None else 2.5 * spec.epsilon / spec.steps


def attack(
    model: nn.Module,
    images: torch.Tensor,
    targets: torch.Tensor,
    spec: api.AdversarialSpec,
    mean: Sequence[float],
    std: Sequence[float],
) -> torch.Tensor:
    """Adversarial versions of normalised ``images``, crafted in pixel space: each image is mapped back to
    [0, 1] pixels through the per-channel normalisation, moved at most ``epsilon`` per pixel along the sign of
    the loss gradient (once for FGSM, ``steps`` times for PGD, projected back into the epsilon ball each
    time), clamped to [0, 1], and normalised again. PGD starts from the clean image, so results replay."""
    shape = (1, -1, 1, 1)
    m = torch.tensor(list(mean), dtype=images.dtype, device=images.device).view(shape)
    s = torch.tensor(list(std), dtype=images.dtype, device=images.device).view(shape)
    clean = (images * s + m).detach()
    steps, step = attack_steps(spec)
    adversarial = clean.clone()
    for _ in range(steps):
        adversarial.requires_grad_(True)
        loss = nn.functional.cross_entropy(model((adversarial - m) / s), targets)
        (grad,) = torch.autograd.grad(loss, adversarial)
        with torch.no_grad():
            moved = adversarial + step * grad.sign()
            adversarial = torch.min(torch.max(moved, clean - spec.epsilon), clean + spec.epsilon).clamp(0, 1)
    return ((adversarial - m) / s).detach()


def adversarial_accuracy(
    model: nn.Module,
    batches: Iterable[tuple[torch.Tensor, torch.Tensor]],
    spec: api.AdversarialSpec,
    *,
    device: torch.device,
    mean: Sequence[float],
    std: Sequence[float],
) -> float:
    """Accuracy under ``attack``. Full precision, eval mode; the model's parameters are not changed."""
    model.eval()
    correct = total = 0
    for images, targets in batches:
        images, targets = images.to(device), targets.to(device)
        adversarial = attack(model, images, targets, spec, mean, std)
        with torch.no_grad():
            correct += int((model(adversarial).argmax(dim=1) == targets).sum())
        total += len(targets)
    return correct / max(total, 1)


def overfitting_warnings(
    history: Sequence[EpochRecord], gap: float, *, clean_train_accuracy: float | None = None
) -> list[str]:
    """Warnings for the card and the status: validation accuracy falling for at least two epochs after its
    best epoch while training loss kept falling, or the best model's accuracy on training images (a clean,
    eval-mode pass: ``clean_train_accuracy``) more than ``gap`` above its validation accuracy. Augmented,
    dropout-on batch accuracy is never compared: it understates what the model fits."""
    warnings: list[str] = []
    if not history:
        return warnings
    best = max(history, key=lambda h: h.val_accuracy)
    after = [h for h in history if h.epoch > best.epoch]
    if len(after) >= 2 and after[-1].val_accuracy < best.val_accuracy and after[-1].train_loss < best.train_loss:
        warnings.append(
            f"overfitting: validation accuracy fell from {best.val_accuracy:.4f} at epoch {best.epoch} to "
            f"{after[-1].val_accuracy:.4f} at epoch {after[-1].epoch} while training loss fell from "
            f"{best.train_loss:.4f} to {after[-1].train_loss:.4f}"
        )
    if clean_train_accuracy is not None and clean_train_accuracy - best.val_accuracy > gap:
        warnings.append(
            f"overfitting: the best model (epoch {best.epoch}) scores {clean_train_accuracy:.4f} on training "
            f"images but {best.val_accuracy:.4f} on validation, a gap of "
            f"{clean_train_accuracy - best.val_accuracy:.4f} (training.overfitGap {gap})"
        )
    return warnings
