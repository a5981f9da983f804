"""The training loop on real data: accuracy, metrics, stop conditions, optimizers and schedules."""

import math
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import trainer_support as support

from kiln import api
from kiln_trainer import checkpoint, evaluate, loop, optimizers, stopping


@pytest.fixture(autouse=True)
def _one_thread(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    for name in ("WORLD_SIZE", "RANK", "KILN_TRAININGJOB_NAME", "KILN_TRAININGJOB_NAMESPACE"):
        monkeypatch.delenv(name, raising=False)
    with support.threads(1):
        yield


@pytest.fixture(scope="module")
def digits_run(tmp_path_factory: pytest.TempPathFactory) -> loop.TrainResult:
    with support.threads(1):
        spec = support.spec(training={"epochs": 4, "batchSize": 32})
        return loop.train(spec, tmp_path_factory.mktemp("digits"), compile=False, log_format="json")


def test_the_builtin_cnn_reaches_95_percent_validation_accuracy_on_digits(digits_run: loop.TrainResult) -> None:
    assert digits_run.metrics.accuracy is not None and digits_run.metrics.accuracy >= 0.95
    assert digits_run.summary.best_val_accuracy == digits_run.metrics.accuracy
    assert digits_run.summary.stop_reason == "epochs" and digits_run.summary.epochs_run == 4
    assert digits_run.summary.best_epoch == max(digits_run.history, key=lambda h: h.val_accuracy).epoch


def test_metrics_are_fractions_and_f1_agrees_with_precision_and_recall(digits_run: loop.TrainResult) -> None:
    m = digits_run.metrics
    for value in (m.accuracy, m.precision, m.recall, m.f1):
        assert value is not None and 0.0 <= value <= 1.0
    for c in digits_run.per_class:
        assert 0.0 <= c.precision <= 1.0 and 0.0 <= c.recall <= 1.0
        harmonic = 2 * c.precision * c.recall / (c.precision + c.recall) if c.precision + c.recall else 0.0
        assert c.f1 == pytest.approx(harmonic, abs=1e-9)
    assert m.f1 == pytest.approx(np.mean([c.f1 for c in digits_run.per_class]))
    assert m.recall == pytest.approx(np.mean([c.recall for c in digits_run.per_class]))
    matrix = np.array(digits_run.confusion_matrix)
    assert matrix.shape == (10, 10) and matrix.sum() == sum(c.support for c in digits_run.per_class)
    assert np.trace(matrix) / matrix.sum() == pytest.approx(m.accuracy)
    assert [c.support for c in digits_run.per_class] == matrix.sum(axis=1).tolist()


def test_the_best_checkpoint_holds_what_the_compile_step_needs(digits_run: loop.TrainResult) -> None:
    best = checkpoint.load_checkpoint(checkpoint.best_checkpoint_path(digits_run.output_dir))
    assert best["epoch"] == digits_run.summary.best_epoch
    assert best["best_accuracy"] == digits_run.metrics.accuracy
    assert best["class_names"] == [str(i) for i in range(10)]
    assert api.Metrics.model_validate(best["metrics"]) == digits_run.metrics
    assert [api.ClassMetrics.model_validate(c) for c in best["per_class"]] == digits_run.per_class
    assert best["confusion_matrix"] == digits_run.confusion_matrix
    assert api.TrainingSummary.model_validate(best["summary"]) == digits_run.summary
    assert api.TrainingJobSpec.model_validate(best["config"]).training.epochs == 4


def test_only_the_latest_checkpoints_are_kept_plus_the_best(digits_run: loop.TrainResult) -> None:
    names = sorted(p.name for p in (digits_run.output_dir / "checkpoints").iterdir())
    assert names == ["best.pt", "epoch-0003.pt", "epoch-0004.pt"]


def test_target_accuracy_stops_at_the_first_epoch_that_reaches_it(tmp_path: Path) -> None:
    spec = support.spec(data={"maxSamples": 600}, training={"epochs": 8, "targetAccuracy": 0.5})
    result = loop.train(spec, tmp_path, compile=False, log_format="json")
    accuracies = [h.val_accuracy for h in result.history]
    first = next(i for i, a in enumerate(accuracies) if a >= 0.5)
    assert result.summary.stop_reason == "target-accuracy"
    assert result.summary.epochs_run == first + 1 < 8
    assert all(a < 0.5 for a in accuracies[:first])


def test_early_stopping_stops_after_patience_epochs_without_improvement(tmp_path: Path) -> None:
    # A learning rate too small to move validation accuracy by minDelta: epoch 1 sets the best, epochs 2 and 3
    # do not improve on it by 0.2, so patience 2 stops after epoch 3.
    spec = support.spec(
        data={"maxSamples": 300},
        training={
            "epochs": 10,
            "optimizer": {"learningRate": 1e-7},
            "earlyStopping": {"patience": 2, "minDelta": 0.2},
        },
    )
    result = loop.train(spec, tmp_path, compile=False, log_format="json")
    assert result.summary.stop_reason == "early-stopping"
    assert result.summary.epochs_run == 3 and result.summary.epochs_requested == 10


def test_stop_conditions_count_epochs_without_improvement_by_min_delta() -> None:
    stops = stopping.StopConditions(
        api.TrainingSpec.model_validate({"epochs": 10, "earlyStopping": {"patience": 2, "minDelta": 0.01}})
    )
    verdicts = [stops.check(e, a) for e, a in enumerate([0.5, 0.6, 0.605, 0.7, 0.705, 0.709], start=1)]
    assert verdicts == [None, None, None, None, None, "early-stopping"]
    restored = stopping.StopConditions(api.TrainingSpec(epochs=10))
    restored.load_state_dict(stops.state_dict())
    assert restored.best == 0.7 and restored.epochs_without_improvement == 2


def test_stop_conditions_prefer_the_target_and_end_at_the_last_epoch() -> None:
    stops = stopping.StopConditions(api.TrainingSpec(epochs=3, target_accuracy=0.9))
    assert [stops.check(1, 0.5), stops.check(2, 0.95)] == [None, "target-accuracy"]
    plain = stopping.StopConditions(api.TrainingSpec(epochs=2))
    assert [plain.check(1, 0.1), plain.check(2, 0.1)] == [None, "epochs"]


@pytest.mark.parametrize(
    "training",
    [
        {"optimizer": {"name": "sgd", "learningRate": 0.05}, "scheduler": {"name": "step", "stepSize": 1}},
        {"optimizer": {"name": "adam"}, "scheduler": {"name": "cosine", "warmupEpochs": 1}, "labelSmoothing": 0.1},
        {"optimizer": {"name": "adamw"}, "scheduler": {"name": "onecycle"}, "gradientClipNorm": 1.0},
        {"scheduler": {"name": "none"}, "mixedPrecision": "bf16"},
    ],
)
def test_every_optimizer_and_schedule_trains_and_resumes(tmp_path: Path, training: dict[str, object]) -> None:
    spec = support.spec(data={"maxSamples": 200, "imageSize": 16}, training={"epochs": 2, **training})
    result = loop.train(spec, tmp_path, compile=False, log_format="json")
    assert result.summary.epochs_run == 2 and all(math.isfinite(h.train_loss) for h in result.history)
    assert result.summary.device == "cpu"  # no autocast on CPU, whatever mixedPrecision says
    again = loop.train(spec, tmp_path, compile=False, log_format="json")  # resumes the finished run
    assert again.resumed_from_epoch == 2 and again.summary.epochs_run == 2


def test_the_epoch_schedule_warms_up_then_decays() -> None:
    cosine = api.TrainingSpec.model_validate({"epochs": 5, "scheduler": {"name": "cosine", "warmupEpochs": 1}})
    factors = [optimizers.epoch_factor(cosine, e) for e in range(5)]
    assert factors[0] == 0.5 and factors[1] == 1.0 and factors[1] > factors[2] > factors[3] > factors[4] > 0
    step = api.TrainingSpec.model_validate({"epochs": 5, "scheduler": {"name": "step", "stepSize": 2, "gamma": 0.5}})
    assert [optimizers.epoch_factor(step, e) for e in range(5)] == [1.0, 1.0, 0.5, 0.5, 0.25]


def test_adversarial_accuracy_is_measured_when_requested(tmp_path: Path) -> None:
    spec = support.spec(data={"maxSamples": 300}, training={"epochs": 1}, evaluation={"adversarial": {"epsilon": 0.5}})
    result = loop.train(spec, tmp_path, compile=False, log_format="json")
    adversarial = result.metrics.adversarial_accuracy
    assert adversarial is not None and 0.0 <= adversarial <= 1.0


def test_scores_are_computed_by_class_and_averaged_over_classes() -> None:
    labels = np.array([0, 0, 1, 1, 2, 2])
    predictions = np.array([0, 1, 1, 1, 0, 0])
    score = evaluate.score(labels, predictions, ["a", "b", "c"], loss=0.3)
    assert score.accuracy == pytest.approx(0.5)
    assert [c.precision for c in score.per_class] == pytest.approx([1 / 3, 2 / 3, 0.0])
    assert [c.recall for c in score.per_class] == pytest.approx([0.5, 1.0, 0.0])
    assert score.precision == pytest.approx(1 / 3) and score.recall == pytest.approx(0.5)
    assert score.confusion_matrix == [[1, 1, 0], [0, 2, 0], [2, 0, 0]]
