"""When to stop: epochs exhausted, target accuracy reached, or no improvement for ``patience`` epochs."""

from typing import Any

from kiln import api


class StopConditions:
    """Checked after each epoch's evaluation; its state (best accuracy, epochs without improvement) goes into
    the checkpoint so a resumed run stops exactly where an uninterrupted one would."""

    def __init__(self, spec: api.TrainingSpec) -> None:
        self.epochs = spec.epochs
        self.target = spec.target_accuracy
        self.patience = spec.early_stopping.patience if spec.early_stopping else None
        self.min_delta = spec.early_stopping.min_delta if spec.early_stopping else 0.0
        self.best = float("-inf")
        self.epochs_without_improvement = 0

    def check(self, epoch: int, val_accuracy: float) -> api.StopReason | None:
        """The reason to stop after ``epoch`` (1-based), or None to go on."""
        if val_accuracy > self.best + self.min_delta:
            self.best, self.epochs_without_improvement = val_accuracy, 0
        else:
            self.epochs_without_improvement += 1
        if self.target is not None and val_accuracy >= self.target:
            return "target-accuracy"
        if self.patience is not None and self.epochs_without_improvement >= self.patience:
            return "early-stopping"
        if epoch >= self.epochs:
            return "epochs"
        return None

    def state_dict(self) -> dict[str, Any]:
        return {"best": self.best, "epochs_without_improvement": self.epochs_without_improvement}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.best = float(state["best"])
        self.epochs_without_improvement = int(state["epochs_without_improvement"])
