"""Optimizers and learning-rate schedules from the spec."""

import math
from typing import Any

import torch
from torch import nn

from kiln import api
from kiln_trainer import models

Scheduler = torch.optim.lr_scheduler.LRScheduler


def param_groups(model: nn.Module, spec: api.OptimizerSpec) -> list[dict[str, Any]]:
    """Parameters grouped by (head or backbone, decayed or not). Norm weights and biases (every parameter
    with fewer than two dimensions) get no weight decay unless decayNormAndBias says so, as in timm and
    torchvision's references; the head's learning rate is headLearningRateMultiplier times the backbone's.
    Groups carry ``head``, so freezing knows what to hold."""
    head = models.head_parameter_names(model)
    groups: dict[tuple[bool, bool], list[nn.Parameter]] = {}
    for name, param in model.named_parameters():
        if param.requires_grad:
            decayed = spec.decay_norm_and_bias or param.ndim > 1
            groups.setdefault((name in head, decayed), []).append(param)
    return [
        {
            "params": params,
            "head": is_head,
            "lr": spec.learning_rate * (spec.head_learning_rate_multiplier if is_head else 1.0),
            "weight_decay": spec.weight_decay if decayed else 0.0,
        }
        for (is_head, decayed), params in sorted(groups.items())
    ]


def build_optimizer(model: nn.Module, training: api.TrainingSpec) -> torch.optim.Optimizer:
    """SGD (with momentum), Adam or AdamW over ``param_groups``."""
    spec = training.optimizer
    groups = param_groups(model, spec)
    if spec.name == "sgd":
        return torch.optim.SGD(groups, lr=spec.learning_rate, momentum=spec.momentum)
    if spec.name == "adam":
        return torch.optim.Adam(groups, lr=spec.learning_rate)
    return torch.optim.AdamW(groups, lr=spec.learning_rate)


def hold_frozen(optimizer: torch.optim.Optimizer, training: api.TrainingSpec, epoch: int) -> None:
    """During the first freezeBackboneEpochs epochs (1-based ``epoch``), set the backbone groups' learning
    rate to 0 so only the head moves (with lr 0 neither the update nor decoupled weight decay changes a
    weight). Called after every scheduler step: the schedules recompute each rate from their own state, so
    the backbone resumes its scheduled rate the epoch after."""
    if epoch <= training.freeze_backbone_epochs:
        for group in optimizer.param_groups:
            if not group.get("head", False):
                group["lr"] = 0.0


def learning_rate(optimizer: torch.optim.Optimizer) -> float:
    """The rate the next step uses: the backbone's (the first group), or the head's when it alone trains."""
    rates = [float(g["lr"]) for g in optimizer.param_groups]
    return next((r for r in rates if r > 0), rates[0])


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
            max_lr=[float(g["lr"]) for g in optimizer.param_groups],
            total_steps=max(1, spec.epochs * steps_per_epoch),
            pct_start=min(max(warmup, 0.01), 0.99),
        )
        return onecycle, True
    # A plain function, not a callable object: LambdaLR then keeps nothing of it in its state dict, which
    # stays loadable with weights_only.
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda epoch: epoch_factor(spec, epoch)), False
