"""Live progress for people and log collectors: a tqdm bar on a terminal, one JSON line per epoch otherwise."""

import json
import sys
from typing import Any, Literal

from tqdm import tqdm

from kiln import api
from kiln_trainer import evaluate

LogFormat = Literal["auto", "json", "bar"]
_POSTFIX_EVERY = 20  # steps between loss read-outs on the bar (each one syncs a GPU)


def status(history: list[evaluate.EpochRecord], total_epochs: int, *, finished: bool = False) -> api.Progress:
    """The TrainingJob's progress after the newest epoch of ``history``; the ETA assumes the remaining epochs
    take the mean time so far, and is 0 once training has ``finished`` (early or not)."""
    record = history[-1]
    mean_duration = sum(h.duration_seconds for h in history) / len(history)
    return api.Progress(
        epoch=record.epoch,
        total_epochs=total_epochs,
        train_loss=record.train_loss,
        val_loss=record.val_loss,
        val_accuracy=record.val_accuracy,
        samples_per_second=record.samples_per_second,
        eta_seconds=0 if finished else max(0, total_epochs - record.epoch) * mean_duration,
        updated_at=api.now_rfc3339(),
    )


class ProgressLog:
    """Writes progress in the chosen format; ``auto`` picks the bar only when stderr is a terminal. Silent
    on ranks other than 0."""

    def __init__(self, log_format: LogFormat, total_epochs: int, *, enabled: bool = True) -> None:
        bar = log_format == "bar" or (log_format == "auto" and sys.stderr.isatty())
        self.mode = "off" if not enabled else ("bar" if bar else "json")
        self.total_epochs = total_epochs
        self._bar: tqdm[Any] | None = None

    def event(self, name: str, **fields: Any) -> None:
        """A structured line (JSON mode) or a plain one above the bar."""
        if self.mode == "json":
            sys.stdout.write(json.dumps({"event": name, "time": api.now_rfc3339(), **fields}) + "\n")
            sys.stdout.flush()
        elif self.mode == "bar":
            tqdm.write(f"{name}: " + ", ".join(f"{k}={v}" for k, v in fields.items()), file=sys.stderr)

    def start_epoch(self, epoch: int, steps: int) -> None:
        if self.mode == "bar":
            self._bar = tqdm(
                total=steps,
                desc=f"epoch {epoch}/{self.total_epochs}",
                unit="step",
                leave=False,
                file=sys.stderr,
                dynamic_ncols=True,
            )

    def step(self, index: int, loss: Any) -> None:
        """Advance the bar; ``loss`` (a tensor) is read only every few steps."""
        if self._bar is not None:
            self._bar.update(1)
            if index % _POSTFIX_EVERY == 0:
                self._bar.set_postfix(loss=f"{float(loss):.4f}", refresh=False)

    def end_epoch(self, record: evaluate.EpochRecord) -> None:
        """One line per epoch; the learning rate is the one the epoch's steps used (record.learning_rate)."""
        if self._bar is not None:
            self._bar.close()
            self._bar = None
        if self.mode == "json":
            self.event("epoch", total_epochs=self.total_epochs, **vars(record))
        elif self.mode == "bar":
            tqdm.write(
                f"epoch {record.epoch}/{self.total_epochs}: loss {record.train_loss:.4f} "
                f"acc {record.train_accuracy:.4f} | val loss {record.val_loss:.4f} acc {record.val_accuracy:.4f} "
                f"| {record.samples_per_second:.0f} img/s, {record.duration_seconds:.1f}s",
                file=sys.stderr,
            )

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None
