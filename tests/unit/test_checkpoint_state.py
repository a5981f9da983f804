"""The typed training state and its checkpoint: an epoch checkpoint round-trips through
checkpoint.TrainingState, best.pt through checkpoint.Snapshot, and checkpoints in the key layout kiln has
written since format 1 (spelled out here, as older code wrote them) still load."""

import random
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import trainer_support as support

from kiln import api
from kiln_trainer import checkpoint, ema, evaluate, models, optimizers, stopping

CLASSES = [str(i) for i in range(10)]
# The keys of epoch-NNNN.pt and best.pt as written since format 1; a reader of old checkpoints relies on them.
EPOCH_KEYS = {
    "format",
    "model",
    "optimizer",
    "scheduler",
    "scaler",
    "ema",
    "config",
    "epoch",
    "step",
    "best_accuracy",
    "best_epoch",
    "stop_reason",
    "stop_conditions",
    "history",
    "rng",
    "class_names",
    "metrics",
    "per_class",
    "confusion_matrix",
}
RESUME_KEYS = {"optimizer", "scheduler", "scaler", "ema", "step", "best_epoch", "stop_reason", "stop_conditions"}
BEST_KEYS = EPOCH_KEYS - RESUME_KEYS - {"history", "rng"}


def _spec(**training: Any) -> api.TrainingJobSpec:
    return support.spec(training={"ema": {"decay": 0.9}, **training})


def _state(spec: api.TrainingJobSpec, seed: int) -> checkpoint.TrainingState:
    """A fresh state as the loop builds it (CPU, no fp16 scaler), its weights drawn from ``seed``."""
    torch.manual_seed(seed)
    cfg = spec.training
    model = models.build_model(spec, len(CLASSES))
    optimizer = optimizers.build_optimizer(model, cfg)
    scheduler, _ = optimizers.build_scheduler(optimizer, cfg, steps_per_epoch=4)
    scaler = torch.amp.GradScaler("cuda", enabled=False)
    averaged = ema.Ema(model, cfg.ema) if cfg.ema is not None else None
    return checkpoint.TrainingState(
        spec, CLASSES, model, optimizer, scheduler, scaler, stopping.StopConditions(cfg), averaged
    )


def _train_a_little(state: checkpoint.TrainingState) -> evaluate.Evaluation:
    """Two optimizer steps, one epoch done with its record: a state worth saving."""
    images, labels = torch.randn(8, 3, 32, 32), torch.arange(8) % len(CLASSES)
    for _ in range(2):
        state.optimizer.zero_grad()
        torch.nn.functional.cross_entropy(state.model(images), labels).backward()
        state.optimizer.step()
        if state.averaged is not None:
            state.averaged.update(state.model)
        state.step += 1
    state.scheduler.step()
    state.epoch = 1
    evaluation = evaluate.score(labels.numpy(), (labels.numpy() + 1) % len(CLASSES), CLASSES, loss=2.5)
    state.stop_reason = state.stops.check(state.epoch, evaluation.accuracy)
    state.best_accuracy, state.best_epoch = evaluation.accuracy, 1
    state.history.append(evaluate.EpochRecord(1, 2.0, 0.1, 2.5, 0.0, 100.0, 1.5, learning_rate=0.003))
    return evaluation


def _same_tensors(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_an_epoch_checkpoint_round_trips_through_the_typed_training_state(tmp_path: Path) -> None:
    spec = _spec()
    saved = _state(spec, seed=1)
    evaluation = _train_a_little(saved)
    writer = checkpoint.Checkpointer(tmp_path, every=1, keep=2, writer=True)
    path = writer.save(saved, evaluation)
    assert writer.last == path and set(checkpoint.load_checkpoint(path)) == EPOCH_KEYS
    after_save = (torch.rand(3), np.random.rand(3), random.random())

    loaded = _state(spec, seed=2)  # other weights, to be overwritten
    reader = checkpoint.Checkpointer(tmp_path, every=1, keep=2, writer=True)
    assert reader.resume(loaded)
    assert reader.last == path and reader.resumed_from == 1
    assert _same_tensors(loaded.model.state_dict(), saved.model.state_dict())
    assert loaded.averaged is not None and saved.averaged is not None
    assert _same_tensors(loaded.averaged.module.state_dict(), saved.averaged.module.state_dict())
    assert loaded.averaged.updates == saved.averaged.updates == 2
    assert loaded.optimizer.state_dict()["state"].keys() == saved.optimizer.state_dict()["state"].keys()
    assert loaded.scheduler.state_dict() == saved.scheduler.state_dict()
    assert loaded.stops.state_dict() == saved.stops.state_dict()
    assert (loaded.epoch, loaded.step, loaded.best_epoch, loaded.stop_reason) == (1, 2, 1, saved.stop_reason)
    assert loaded.best_accuracy == saved.best_accuracy and loaded.history == saved.history
    # The RNG states come back as they were when the checkpoint was written.
    assert torch.equal(torch.rand(3), after_save[0])
    assert np.array_equal(np.random.rand(3), after_save[1]) and random.random() == after_save[2]


def test_best_pt_round_trips_through_a_snapshot_of_the_evaluated_model(tmp_path: Path) -> None:
    state = _state(_spec(), seed=1)
    evaluation = _train_a_little(state)
    writer = checkpoint.Checkpointer(tmp_path, every=1, keep=2, writer=True)
    best = state.best(evaluation)
    assert state.averaged is not None
    assert _same_tensors(best.weights, state.averaged.module.state_dict())  # the average, when EMA is on
    path = writer.save_best(best)
    assert set(checkpoint.load_checkpoint(path)) == BEST_KEYS

    back = writer.load_best()
    assert _same_tensors(back.weights, best.weights)
    assert (back.epoch, back.best_accuracy, back.class_names) == (1, best.best_accuracy, CLASSES)
    assert back.metrics == evaluation.metrics() and back.per_class == evaluation.per_class
    assert back.confusion_matrix == evaluation.confusion_matrix and back.summary is None
    assert back.training_summary(state.spec).warnings  # an unfinished run says so

    summary = back.training_summary(state.spec).model_copy(update={"warnings": []})
    back.summary = summary
    writer.save_best(back)
    assert set(checkpoint.load_checkpoint(path)) == BEST_KEYS | {"summary"}
    assert writer.load_best().training_summary(state.spec) == summary


def _old_layout(state: checkpoint.TrainingState, evaluation: evaluate.Evaluation) -> dict[str, Any]:
    """An epoch checkpoint as loop.py spelled it before the typed state, by hand; the history predates
    ``learning_rate`` and the run had no EMA."""
    return {
        "format": 1,
        "model": state.model.state_dict(),
        "optimizer": state.optimizer.state_dict(),
        "scheduler": state.scheduler.state_dict(),
        "scaler": {},
        "config": state.spec.to_dict(),
        "epoch": 1,
        "step": 2,
        "best_accuracy": evaluation.accuracy,
        "best_epoch": 1,
        "stop_reason": None,
        "stop_conditions": state.stops.state_dict(),
        "history": [
            {
                "epoch": 1,
                "train_loss": 2.0,
                "train_accuracy": 0.1,
                "val_loss": 2.5,
                "val_accuracy": 0.0,
                "samples_per_second": 100.0,
                "duration_seconds": 1.5,
            }
        ],
        "rng": checkpoint.rng_states(),
        "class_names": CLASSES,
        "metrics": evaluation.metrics().to_dict(),
        "per_class": [c.to_dict() for c in evaluation.per_class],
        "confusion_matrix": evaluation.confusion_matrix,
    }


def test_a_checkpoint_in_the_old_key_layout_still_resumes_and_reads_as_a_snapshot(tmp_path: Path) -> None:
    spec = support.spec(training={"epochs": 3})
    old = _state(spec, seed=1)
    evaluation = _train_a_little(old)
    path = checkpoint.epoch_checkpoint_path(tmp_path, 1)
    checkpoint.save_atomic(_old_layout(old, evaluation), path)

    state = _state(spec, seed=2)
    assert checkpoint.Checkpointer(tmp_path, every=1, keep=2, writer=True).resume(state)
    assert _same_tensors(state.model.state_dict(), old.model.state_dict())
    assert (state.epoch, state.step, state.stop_reason, state.averaged) == (1, 2, None, None)
    assert state.history[0].learning_rate is None and state.history[0].duration_seconds == 1.5

    # `kiln compile --checkpoint epoch-0001.pt` reads the same file as a snapshot.
    snapshot = checkpoint.load_snapshot(path)
    assert snapshot.class_names == CLASSES and snapshot.metrics == evaluation.metrics()
    assert snapshot.training_summary(spec).epochs_run == 1


def test_resuming_refuses_a_checkpoint_written_for_another_training_config(tmp_path: Path) -> None:
    old = _state(support.spec(training={"epochs": 3}), seed=1)
    checkpoint.Checkpointer(tmp_path, every=1, keep=2, writer=True).save(old, _train_a_little(old))
    other = _state(support.spec(training={"epochs": 3, "labelSmoothing": 0.1}), seed=1)
    with pytest.raises(api.ConfigError, match="labelSmoothing"):
        checkpoint.Checkpointer(tmp_path, every=1, keep=2, writer=True).resume(other)
    assert other.epoch == 0 and other.history == []
