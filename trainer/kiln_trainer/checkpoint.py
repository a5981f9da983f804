"""Checkpoints: plain dicts with everything needed to resume, written atomically under DIR/checkpoints/.

``epoch-NNNN.pt`` holds model, optimizer, scheduler, scaler, epoch, best accuracy, early-stopping state,
RNG states, history and the config; the latest ``keepCheckpoints`` of them are kept. ``best.pt`` holds the
best model by validation accuracy with its metrics (and, once training ended, the training summary): it is
what gets compiled.
"""

import logging
import os
import random
import re
from pathlib import Path
from typing import Any

import numpy as np
import torch

from kiln import api
from kiln.api import constants
from kiln_trainer import errors, resume

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


def check_compatible(state: dict[str, Any], spec: api.TrainingJobSpec, path: Path, *, remedy: str = "") -> None:
    """Refuse a checkpoint written for another config instead of silently mixing two trainings. ``remedy`` is
    the advice in the error (default: for training, where starting over is fine)."""
    # Normalise both through the API so defaults and aliases compare equal.
    try:
        saved = training_config(api.TrainingJobSpec.model_validate(state["config"]).to_dict())
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


class Checkpointer:
    """Decides when to save, writes atomically, prunes old epochs, finds what to resume from. Only the
    writer rank writes; every rank may read."""

    def __init__(self, output_dir: Path, *, every: int, keep: int, writer: bool) -> None:
        self.output_dir, self.every, self.keep, self.writer = output_dir, every, keep, writer
        if writer:  # fail before training, not after the first epoch
            try:
                checkpoints_dir(output_dir).mkdir(parents=True, exist_ok=True)
            except OSError as err:
                raise errors.ConfigError(
                    f"output: cannot create {checkpoints_dir(output_dir)}: {err.strerror or err}"
                ) from None

    def due(self, epoch: int, *, last: bool) -> bool:
        """The save policy: every ``every`` epochs, and always after the last one."""
        return self.writer and (last or epoch % self.every == 0)

    def save(self, state: dict[str, Any], epoch: int) -> Path:
        """Write the epoch checkpoint, then drop all but the newest ``keep``."""
        path = epoch_checkpoint_path(self.output_dir, epoch)
        save_atomic({"format": FORMAT_VERSION, **state}, path)
        for _, old in epoch_checkpoints(self.output_dir)[: -self.keep]:
            old.unlink(missing_ok=True)
        log.debug("checkpoint: wrote %s", path)
        return path

    def save_best(self, state: dict[str, Any]) -> Path:
        path = best_checkpoint_path(self.output_dir)
        save_atomic({"format": FORMAT_VERSION, **state}, path)
        return path

    def latest(self) -> Path | None:
        found = epoch_checkpoints(self.output_dir)
        return found[-1][1] if found else None

    def resume_state(self, spec: api.TrainingJobSpec) -> dict[str, Any] | None:
        """The newest epoch checkpoint if there is one, checked against the spec; None to start fresh."""
        if self.writer and checkpoints_dir(self.output_dir).is_dir():
            for tmp in checkpoints_dir(self.output_dir).glob("*.tmp"):
                tmp.unlink(missing_ok=True)  # left by a kill mid-write; the previous file is intact
        path = self.latest()
        if path is None:
            return None
        state = load_checkpoint(path)
        check_compatible(state, spec, path)
        if not isinstance(state.get("epoch"), int):
            raise errors.ConfigError(f"checkpoint {path} has no epoch; delete it to start over")
        return state


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
