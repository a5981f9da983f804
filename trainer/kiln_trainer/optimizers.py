"""Optimizers and learning-rate schedules from the spec."""

import math

import torch
from torch import nn

from kiln import api

Scheduler = torch.optim.lr_scheduler.LRScheduler


def build_optimizer(model: nn.Module, training: api.TrainingSpec) -> torch.optim.Optimizer:
    """SGD (with momentum), Adam or AdamW; weight decay on every parameter."""
    spec = training.optimizer
    params = [p for p in model.parameters() if p.requires_grad]
    if spec.name == "sgd":
        return torch.optim.SGD(params, lr=spec.learning_rate, momentum=spec.momentum, weight_decay=spec.weight_decay)
    if spec.name == "adam":
        return torch.optim.Adam(params, lr=spec.learning_rate, weight_decay=spec.weight_decay)
    return torch.optim.AdamW(params, lr=spec.learning_rate, weight_decay=spec.weight_decay)


def epoch_factor(training: api.TrainingSpec, epoch: int) -> float:
    """Learning-rate multiplier for the 0-based ``epoch``: linear warm-up, then constant, step or cosine."""
    spec, epochs = training.scheduler, training.epochs
    warmup = spec.warmup_epochs if spec.name in ("step", "cosine") else 0
    if epoch < warmup:
        return (epoch + 1) / (warmup + 1)
    if spec.name == "step":
        return float(spec.gamma ** ((epoch - warmup) // spec.step_size))
    if spec.name == "cosine":
        return 0.5 * (1.0 + math.cos(math.pi * (epoch - warmup) / max(1, epochs - warmup)))
    return 1.0


def build_scheduler(
    optimizer: torch.optim.Optimizer, spec: api.TrainingSpec, steps_per_epoch: int
) -> tuple[Scheduler, bool]:
    """The schedule and whether it steps per batch (onecycle) rather than per epoch (the others)."""
    sched = spec.scheduler
    if sched.name == "onecycle":
        warmup = sched.warmup_epochs / spec.epochs if sched.warmup_epochs else 0.3
        onecycle = torch.optim.lr_scheduler.OneCycleLR(
            optimizer,
            max_lr=spec.optimizer.learning_rate,
            total_steps=max(1, spec.epochs * steps_per_epoch),
            pct_start=min(max(warmup, 0.01), 0.99),
        )
        return onecycle, True
    # A plain function, not a callable object: LambdaLR then keeps nothing of it in its state dict, which
    # stays loadable with weights_only.
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda epoch: epoch_factor(spec, epoch)), False
