"""Validation: loss, accuracy, macro and per-class precision/recall/F1, confusion matrix, FGSM robustness,
and the overfitting verdict over an epoch history. The metric maths is scikit-learn's."""

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

    def metrics(self, adversarial_accuracy: float | None = None) -> api.Metrics:
        return api.Metrics(
            accuracy=self.accuracy,
            precision=self.precision,
            recall=self.recall,
            f1=self.f1,
            adversarial_accuracy=adversarial_accuracy,
        )


def score(labels: np.ndarray, predictions: np.ndarray, class_names: Sequence[str], loss: float) -> Evaluation:
    """Figures from labels and predictions. Macro averages weigh every class equally; a class that is never
    predicted counts as precision 0 rather than raising."""
    classes = list(range(len(class_names)))
    precision, recall, f1, support = skm.precision_recall_fscore_support(
        labels, predictions, labels=classes, average=None, zero_division=0
    )
    per_class = [
        api.ClassMetrics(name=name, precision=float(p), recall=float(r), f1=float(f), support=int(s))
        for name, p, r, f, s in zip(class_names, precision, recall, f1, support, strict=True)
    ]
    return Evaluation(
        loss=loss,
        accuracy=float(skm.accuracy_score(labels, predictions)) if len(labels) else 0.0,
        precision=float(np.mean(precision)),
        recall=float(np.mean(recall)),
        f1=float(np.mean(f1)),
        per_class=per_class,
        confusion_matrix=skm.confusion_matrix(labels, predictions, labels=classes).tolist(),
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


def adversarial_accuracy(
    model: nn.Module,
    batches: Iterable[tuple[torch.Tensor, torch.Tensor]],
    *,
    device: torch.device,
    epsilon: float,
) -> float:
    """Accuracy under FGSM: each image moved by ``epsilon`` (normalised units) along the sign of its loss
    gradient. Full precision, eval mode; the model's parameters are not changed."""
    model.eval()
    correct = total = 0
    for images, targets in batches:
        images = images.to(device).requires_grad_(True)
        targets = targets.to(device)
        loss = nn.functional.cross_entropy(model(images), targets)
        (grad,) = torch.autograd.grad(loss, images)
        with torch.no_grad():
            adversarial = images + epsilon * grad.sign()
            correct += int((model(adversarial).argmax(dim=1) == targets).sum())
        total += len(targets)
    return correct / max(total, 1)


def overfitting_warnings(history: Sequence[EpochRecord], gap: float) -> list[str]:
    """Warnings for the card and the status: validation accuracy falling for two epochs in a row while
    training accuracy rose, or training accuracy ending more than ``gap`` above validation accuracy."""
    warnings = []
    if len(history) >= 3:
        a, b, c = history[-3:]
        if a.val_accuracy > b.val_accuracy > c.val_accuracy and a.train_accuracy < b.train_accuracy < c.train_accuracy:
            warnings.append(
                f"overfitting: validation accuracy fell from {a.val_accuracy:.4f} to {c.val_accuracy:.4f} over "
                f"epochs {a.epoch}-{c.epoch} while training accuracy rose from {a.train_accuracy:.4f} to "
                f"{c.train_accuracy:.4f}"
            )
    if history:
        last = history[-1]
        if last.train_accuracy - last.val_accuracy > gap:
            warnings.append(
                f"overfitting: training accuracy {last.train_accuracy:.4f} exceeds validation accuracy "
                f"{last.val_accuracy:.4f} by {last.train_accuracy - last.val_accuracy:.4f} at epoch {last.epoch} "
                f"(training.overfitGap {gap})"
            )
    return warnings
