"""Exponential moving average of the weights (timm's ModelEmaV3 idea): a shadow copy updated after every
optimizer step, evaluated, checkpointed as the best model and exported instead of the raw weights."""

import copy
from typing import Any

import torch
from torch import nn

from kiln import api


class Ema:
    """The averaged model; ``module`` is what evaluation and export use."""

    def __init__(self, model: nn.Module, spec: api.EmaSpec) -> None:
        self.module = copy.deepcopy(model).eval()
        for param in self.module.parameters():
            param.requires_grad_(False)
        self.decay, self.warmup, self.updates = spec.decay, spec.warmup_steps, 0

    def current_decay(self) -> float:
        """The decay of the next update: ramps linearly from 0 over warmupSteps, so early averages follow the
        weights instead of their random start."""
        if self.warmup <= 0:
            return self.decay
        return self.decay * min(1.0, self.updates / self.warmup)

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        """Blend ``model``'s floating-point parameters and buffers in; integer buffers (BatchNorm's batch
        counter) are copied."""
        decay = self.current_decay()
        own = self.module.state_dict()
        for key, value in model.state_dict().items():
            shadow = own[key]
            if shadow.dtype.is_floating_point:
                shadow.mul_(decay).add_(value.detach(), alpha=1.0 - decay)
            else:
                shadow.copy_(value)
        self.updates += 1

    def state_dict(self) -> dict[str, Any]:
        return {"module": self.module.state_dict(), "updates": self.updates}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.module.load_state_dict(state["module"])
        self.updates = int(state["updates"])
