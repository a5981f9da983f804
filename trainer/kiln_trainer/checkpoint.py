"""Checkpoints, and the typed state they hold: this module alone spells a checkpoint's keys.

``epoch-NNNN.pt`` holds a ``TrainingState`` (model, optimizer, scheduler, scaler, EMA, epoch, best accuracy,
early-stopping state, RNG states, history, config) with the figures of that epoch's evaluation; the latest
``keepCheckpoints`` of them are kept, written atomically under DIR/checkpoints/. ``best.pt`` holds the
``Snapshot`` of the best model by validation accuracy (and, once training ended, the training summary): it is
what gets compiled. The loop, the hand-off and ``kiln compile`` pass these objects, never the keys; the keys
on disk are those of format 1, so every checkpoint written since still loads.
"""

import dataclasses
import logging
import os
import random
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from kiln import api
from kiln.api import constants
from kiln_trainer import ema, errors, evaluate, optimizers, resume, stopping

log = logging.getLogger(__name__)

FORMAT_VERSION = 1
BEST_FILE = "best.pt"
_EPOCH_FILE = re.compile(r"^epoch-(\d+)\.pt$")
# Spec fields that change how a run executes, not what it computes: a checkpoint stays valid across them.
_OPERATIONAL = {"data.numWorkers", "data.volume"}
_TRAINING_SECTIONS = ("model", "data", "training")


def checkpoints_dir(output_dir: Path) -> Path:
    return output_dir / constants.CHECKPOINTS_DIR


def best_checkpoint_path(output_dir: Path) -> Path:
    """Where the best model of a run is (what ``kiln compile`` reads)."""
    return checkpoints_dir(output_dir) / BEST_FILE


def epoch_checkpoint_path(output_dir: Path, epoch: int) -> Path:
    return checkpoints_dir(output_dir) / f"epoch-{epoch:04d}.pt"


def epoch_checkpoints(output_dir: Path) -> list[tuple[int, Path]]:
    """(epoch, path) of every complete epoch checkpoint, oldest first; half-written temp files never match."""
    folder = checkpoints_dir(output_dir)
    if not folder.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in folder.iterdir() if (m := _EPOCH_FILE.match(p.name))]
    return sorted(found)


def save_atomic(state: dict[str, Any], path: Path) -> None:
    """Write to a temp file, flush it to disk, then rename: a kill at any moment leaves either the old file or
    the new one, never half of one."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        torch.save(state, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def load_checkpoint(path: Path) -> dict[str, Any]:
    """Read a checkpoint on CPU (tensors and plain data only, nothing executable); a missing or unreadable
    file is a ConfigError naming it."""
    if not path.is_file():
        raise errors.ConfigError(f"checkpoint {path} does not exist")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # truncated zip, bad pickle, wrong magic: torch raises many types
        raise errors.ConfigError(
            f"checkpoint {path} is corrupt or not a kiln checkpoint ({type(err).__name__}: {str(err)[:200]}); "
            "delete it to start over"
        ) from None
    if not isinstance(state, dict) or not isinstance(state.get("model"), dict) or "config" not in state:
        raise errors.ConfigError(
            f"checkpoint {path} is not a kiln checkpoint (no model state or config); delete it to start over"
        )
    return state


def _flatten(value: Any, prefix: str) -> dict[str, Any]:
    if isinstance(value, dict):
        out: dict[str, Any] = {}
        for key, item in value.items():
            out.update(_flatten(item, f"{prefix}.{key}" if prefix else str(key)))
        return out
    return {prefix: value}


def training_config(config: dict[str, Any]) -> dict[str, Any]:
    """The spec fields that decide what training computes (model, data, training), flattened to dotted
    camelCase paths; serving, export, resources and the operational fields above are left out."""
    flat = _flatten({k: config.get(k, {}) for k in _TRAINING_SECTIONS}, "")
    return {k: v for k, v in flat.items() if not any(k == o or k.startswith(o + ".") for o in _OPERATIONAL)}


def check_compatible(config: dict[str, Any], spec: api.TrainingJobSpec, path: Path, *, remedy: str = "") -> None:
    """Refuse a checkpoint written for another config (``config``, as saved in it) instead of silently mixing
    two trainings. ``remedy`` is the advice in the error (default: for training, where starting over is fine)."""
    # Normalise both through the API so defaults and aliases compare equal.
    try:
        saved = training_config(api.TrainingJobSpec.model_validate(config).to_dict())
    except Exception:
        raise errors.ConfigError(
            f"checkpoint {path} holds a config this version cannot read; delete it to start over"
        ) from None
    wanted = training_config(spec.to_dict())
    changed = [
        f"{k}: {saved.get(k)!r} -> {wanted.get(k)!r}"
        for k in sorted(set(saved) | set(wanted))
        if saved.get(k) != wanted.get(k)
    ]
    if changed:
        shown = "; ".join(changed[:5]) + ("; ..." if len(changed) > 5 else "")
        remedy = remedy or f"use another output folder or delete {path.parent} to start over"
        raise errors.ConfigError(f"checkpoint {path} was written for a different config ({shown}); {remedy}")


@dataclass
class Snapshot:
    """The model as evaluated at one epoch: all of best.pt, and what ``kiln compile`` reads from any checkpoint.
    Reading is lenient where a hand-made or intermediate checkpoint may lack a figure (it reads as empty)."""

    weights: dict[str, torch.Tensor]
    config: dict[str, Any]  # the spec as saved (``spec.to_dict()``); check_compatible compares it to a spec
    epoch: int
    best_accuracy: float  # of the run so far
    class_names: list[str] | None
    metrics: api.Metrics
    per_class: list[api.ClassMetrics] = field(default_factory=list)
    confusion_matrix: list[list[int]] = field(default_factory=list)
    summary: api.TrainingSummary | None = None  # set in best.pt once training ended

    def to_dict(self) -> dict[str, Any]:
        saved: dict[str, Any] = {
            "model": self.weights,
            "config": self.config,
            "epoch": self.epoch,
            "best_accuracy": self.best_accuracy,
            "class_names": self.class_names,
            "metrics": self.metrics.to_dict(),
            "per_class": [c.to_dict() for c in self.per_class],
            "confusion_matrix": self.confusion_matrix,
        }
        if self.summary is not None:
            saved["summary"] = self.summary.to_dict()
        return saved

    @classmethod
    def from_dict(cls, saved: dict[str, Any]) -> "Snapshot":
        names = saved.get("class_names")
        return cls(
            weights=saved["model"],
            config=saved["config"],
            epoch=int(saved.get("epoch") or 0),
            best_accuracy=float(saved.get("best_accuracy") or 0.0),
            class_names=None if names is None else list(names),
            metrics=api.Metrics.model_validate(saved.get("metrics") or {}),
            per_class=[api.ClassMetrics.model_validate(c) for c in saved.get("per_class") or []],
            confusion_matrix=[list(map(int, row)) for row in saved.get("confusion_matrix") or []],
            summary=api.TrainingSummary.model_validate(saved["summary"]) if saved.get("summary") else None,
        )

    def training_summary(self, spec: api.TrainingJobSpec) -> api.TrainingSummary:
        """The saved training summary; a checkpoint written before training ended has none, so one is made
        from what it does hold, and says so."""
        if self.summary is not None:
            return self.summary
        return api.TrainingSummary(
            architecture=spec.model.architecture,
            dataset=spec.data.dataset,
            epochs_requested=spec.training.epochs,
            epochs_run=self.epoch,
            best_epoch=self.epoch,
            best_val_accuracy=self.best_accuracy,
            stop_reason="epochs",
            duration_seconds=0.0,
            warnings=["compiled from a checkpoint without a training summary (training had not finished)"],
        )


def load_snapshot(path: Path) -> Snapshot:
    """The model, figures and config of any checkpoint (best or epoch); ConfigError when unreadable."""
    return Snapshot.from_dict(load_checkpoint(path))


@dataclass
class TrainingState:
    """Everything a run needs to continue where it stopped. The loop updates it epoch by epoch (only rank 0
    keeps the figures); ``to_dict`` and ``load`` are the epoch checkpoint's format."""

    spec: api.TrainingJobSpec
    class_names: list[str]
    model: nn.Module  # the bare model (not the DDP wrapper)
    optimizer: torch.optim.Optimizer
    scheduler: optimizers.Scheduler
    scaler: torch.amp.GradScaler
    stops: stopping.StopConditions
    averaged: ema.Ema | None = None  # the weights' moving average, when training.ema is on
    epoch: int = 0  # epochs completed
    step: int = 0  # optimizer steps taken
    best_accuracy: float = -1.0
    best_epoch: int = 0
    stop_reason: api.StopReason | None = None
    history: list[evaluate.EpochRecord] = field(default_factory=list)

    @property
    def evaluated(self) -> nn.Module:
        """The model that is evaluated, kept as the best and exported: the average when EMA is on."""
        return self.averaged.module if self.averaged is not None else self.model

    def _snapshot(self, weights: dict[str, torch.Tensor], evaluation: evaluate.Evaluation) -> Snapshot:
        return Snapshot(
            weights=weights,
            config=self.spec.to_dict(),
            epoch=self.epoch,
            best_accuracy=self.best_accuracy,
            class_names=self.class_names,
            metrics=evaluation.metrics(),
            per_class=evaluation.per_class,
            confusion_matrix=evaluation.confusion_matrix,
        )

    def best(self, evaluation: evaluate.Evaluation) -> Snapshot:
        """The evaluated model as it is now, with ``evaluation``'s figures: what best.pt holds."""
        return self._snapshot(self.evaluated.state_dict(), evaluation)

    def to_dict(self, evaluation: evaluate.Evaluation) -> dict[str, Any]:
        """The epoch checkpoint: the raw weights (the average apart, under ``ema``) and all that resumes."""
        return {
            **self._snapshot(self.model.state_dict(), evaluation).to_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "scaler": self.scaler.state_dict(),
            "ema": self.averaged.state_dict() if self.averaged is not None else None,
            "step": self.step,
            "best_epoch": self.best_epoch,
            "stop_reason": self.stop_reason,
            "stop_conditions": self.stops.state_dict(),
            "history": [dataclasses.asdict(h) for h in self.history],
            "rng": rng_states(),
        }

    def load(self, saved: dict[str, Any]) -> None:
        """Restore everything ``to_dict`` saved, RNG states included. A checkpoint from a run without fp16
        (no scaler state), without EMA, or from a node with more GPUs still loads (see resume.py)."""
        self.model.load_state_dict(saved["model"])
        self.optimizer.load_state_dict(saved["optimizer"])
        self.scheduler.load_state_dict(saved["scheduler"])
        resume.load_scaler(self.scaler, saved["scaler"])
        self.stops.load_state_dict(saved["stop_conditions"])
        restore_rng(saved["rng"])
        if self.averaged is not None and saved.get("ema") is not None:
            self.averaged.load_state_dict(saved["ema"])
        self.history = [evaluate.EpochRecord(**h) for h in saved["history"]]
        self.best_accuracy, self.best_epoch = float(saved["best_accuracy"]), int(saved["best_epoch"])
        self.epoch, self.step, self.stop_reason = int(saved["epoch"]), int(saved["step"]), saved.get("stop_reason")


class Checkpointer:
    """Decides when to save, writes atomically, prunes old epochs, finds what to resume from, and remembers
    the newest epoch checkpoint (``last``) and the epoch resumed from. Only the writer rank writes; every rank
    may read."""

    def __init__(self, output_dir: Path, *, every: int, keep: int, writer: bool) -> None:
        self.output_dir, self.every, self.keep, self.writer = output_dir, every, keep, writer
        self.last: Path | None = None
        self.resumed_from: int | None = None  # the epoch this process resumed after; None: a fresh start
        if writer:  # fail before training, not after the first epoch
            try:
                checkpoints_dir(output_dir).mkdir(parents=True, exist_ok=True)
            except OSError as err:
                raise errors.ConfigError(
                    f"output: cannot create {checkpoints_dir(output_dir)}: {err.strerror or err}"
                ) from None

    @property
    def last_name(self) -> str | None:
        """The newest epoch checkpoint as the TrainingJob's status names it (None before the first)."""
        return None if self.last is None else str(self.last)

    def due(self, epoch: int, *, last: bool) -> bool:
        """The save policy: every ``every`` epochs, and always after the last one."""
        return self.writer and (last or epoch % self.every == 0)

    def save(self, state: TrainingState, evaluation: evaluate.Evaluation) -> Path:
        """Write the epoch checkpoint, then drop all but the newest ``keep``."""
        path = epoch_checkpoint_path(self.output_dir, state.epoch)
        save_atomic({"format": FORMAT_VERSION, **state.to_dict(evaluation)}, path)
        for _, old in epoch_checkpoints(self.output_dir)[: -self.keep]:
            old.unlink(missing_ok=True)
        log.debug("checkpoint: wrote %s", path)
        self.last = path
        return path

    def save_best(self, best: Snapshot) -> Path:
        path = best_checkpoint_path(self.output_dir)
        save_atomic({"format": FORMAT_VERSION, **best.to_dict()}, path)
        return path

    def load_best(self) -> Snapshot:
        return load_snapshot(best_checkpoint_path(self.output_dir))

    def latest(self) -> Path | None:
        found = epoch_checkpoints(self.output_dir)
        return found[-1][1] if found else None

    def resume(self, state: TrainingState) -> bool:
        """Load the newest epoch checkpoint into ``state`` after checking it against the state's spec; False
        (state untouched) to start fresh."""
        if self.writer and checkpoints_dir(self.output_dir).is_dir():
            for tmp in checkpoints_dir(self.output_dir).glob("*.tmp"):
                tmp.unlink(missing_ok=True)  # left by a kill mid-write; the previous file is intact
        path = self.latest()
        if path is None:
            return False
        saved = load_checkpoint(path)
        check_compatible(saved["config"], state.spec, path)
        if not isinstance(saved.get("epoch"), int):
            raise errors.ConfigError(f"checkpoint {path} has no epoch; delete it to start over")
        state.load(saved)
        self.last, self.resumed_from = path, state.epoch
        return True


def rng_states() -> dict[str, Any]:
    """RNG states as plain data (loadable with weights_only)."""
    np_state: dict[str, Any] = np.random.get_state(legacy=False)
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "numpy": {**np_state, "state": {"key": np_state["state"]["key"].tolist(), "pos": np_state["state"]["pos"]}},
        "python": random.getstate(),
    }


def restore_rng(states: dict[str, Any]) -> None:
    torch.set_rng_state(states["torch"])
    resume.restore_cuda_rng(states["cuda"])
    np_state = states["numpy"]
    key = np.asarray(np_state["state"]["key"], dtype=np.uint32)
    np.random.set_state({**np_state, "state": {"key": key, "pos": np_state["state"]["pos"]}})
    random.setstate(states["python"])
