"""The end of training (rank 0): reload the best model, summarise the run into best.pt, hand the model to
the compile step, and report the result to the TrainingJob's status."""

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from torch import nn

from kiln import api
from kiln_trainer import checkpoint, data, distributed, evaluate, progress, report, status_reporter
from kiln_trainer import history as history_file

log = logging.getLogger(__name__)


@dataclass
class TrainResult:
    """What a training run produced (the same on every rank; only rank 0 wrote files)."""

    output_dir: Path
    summary: api.TrainingSummary
    metrics: api.Metrics
    per_class: list[api.ClassMetrics]
    confusion_matrix: list[list[int]]
    class_names: list[str]
    history: list[evaluate.EpochRecord]
    best_checkpoint: Path
    resumed_from_epoch: int | None = None
    model_card: api.ModelCard | None = None
    final: report.FinalReport | None = None  # test set, robustness, clean training pass, plots


def finish(
    spec: api.TrainingJobSpec,
    bundle: data.DataBundle,
    state: checkpoint.TrainingState,
    checkpointer: checkpoint.Checkpointer,
    *,
    ctx: distributed.Context,
    name: str,
    compile: bool,
    reporter: status_reporter.StatusReporter,
) -> TrainResult:
    """Reload the best model, measure it beyond validation (report.measure_final), add the summary to best.pt,
    compile, report the end."""
    assert state.stop_reason is not None, "finish() runs once training stopped"
    output_dir, model, history = checkpointer.output_dir, state.model, state.history
    best = checkpointer.load_best()
    model.load_state_dict(best.weights)
    model.eval()
    final = report.measure_final(
        spec, bundle, model, history, best.confusion_matrix, device=ctx.device, output_dir=output_dir
    )
    warnings = evaluate.overfitting_warnings(
        history, spec.training.overfit_gap, clean_train_accuracy=final.clean_train_accuracy
    )
    for warning in warnings:
        log.warning("%s", warning)
    best.metrics = final.metrics(best.metrics)
    best.summary = api.TrainingSummary(
        architecture=spec.model.architecture,
        dataset=spec.data.dataset,
        epochs_requested=spec.training.epochs,
        epochs_run=history[-1].epoch,
        best_epoch=best.epoch,
        best_val_accuracy=best.best_accuracy,
        final_train_accuracy=history[-1].train_accuracy,
        stop_reason=state.stop_reason,
        duration_seconds=sum(h.duration_seconds for h in history),
        workers=ctx.world_size,
        device=ctx.device.type,
        warnings=warnings,
        clean_train_accuracy=final.clean_train_accuracy,
        test_accuracy=best.metrics.test_accuracy,
    )
    best_path = checkpointer.save_best(best)
    log.info(
        "training stopped (%s) after %d epochs; best validation accuracy %.4f at epoch %d",
        state.stop_reason,
        best.summary.epochs_run,
        best.summary.best_val_accuracy,
        best.summary.best_epoch,
    )
    result = TrainResult(
        output_dir=output_dir,
        summary=best.summary,
        metrics=best.metrics,
        per_class=best.per_class,
        confusion_matrix=best.confusion_matrix,
        class_names=best.class_names if best.class_names is not None else bundle.class_names,
        history=history,
        best_checkpoint=best_path,
        resumed_from_epoch=checkpointer.resumed_from,
        final=final,
    )
    # Report before compiling: the metrics stand even if the compile step fails and is retried.
    final_progress = progress.status(history, spec.training.epochs, finished=True)
    reporter.final(final_progress, best.metrics, warnings, checkpointer.last_name)
    if compile:
        result.model_card = compile_best(spec, bundle, model, best, output_dir, name, final=final, history=history)
        selected = result.model_card.variant(result.model_card.selected)
        reporter.model(
            api.ModelStatus(
                variant=selected.name,
                uri=str((output_dir / selected.path).absolute()),
                sha256=selected.sha256,
                size_bytes=selected.size_bytes,
                accuracy=selected.accuracy,
                latency_ms=selected.latency_ms_batch32,
            )
        )
    return result


def compile_best(
    spec: api.TrainingJobSpec,
    bundle: data.DataBundle,
    model: nn.Module,
    best: checkpoint.Snapshot,
    output_dir: Path,
    name: str,
    *,
    final: report.FinalReport | None = None,
    history: Sequence[evaluate.EpochRecord] = (),
    repeats: int = 10,
    threads: int | None = None,
) -> api.ModelCard:
    """Hand a trained model, the data it was trained on and its checkpoint's figures to the compile step,
    which exports the variants and writes model-card.json. The trainer's hand-off (with the final report and
    the history of the run) and ``kiln compile`` (from a checkpoint alone) both come through here."""
    from kiln_trainer import compile as compiler  # imported here: onnx and onnxruntime only when compiling

    val_images, val_labels = data.stack_images(bundle.val)
    calibration, _ = data.stack_images(bundle.train_eval, limit=spec.export.calibration.samples)
    # Each variant is scored on the test set when the final report scored the model on it.
    test = final.test if final is not None else None
    test_images, test_labels = (
        data.stack_images(bundle.test) if test is not None and bundle.test is not None else (None, None)
    )
    inputs = compiler.CompileInputs(
        model=model.cpu().eval(),
        val_images=val_images,
        val_labels=val_labels,
        calibration_images=calibration,
        class_names=bundle.class_names,
        # Images are RGB whatever the files hold (data.py replicates grayscale).
        preprocessing=api.Preprocessing(image_size=bundle.image_size, channels=3, mean=bundle.mean, std=bundle.std),
        training=best.training_summary(spec),
        metrics=best.metrics,
        per_class=best.per_class,
        confusion_matrix=best.confusion_matrix,
        test_images=test_images,
        test_labels=test_labels,
        test_metrics=test.held_out() if test is not None else None,
        adversarial=final.adversarial if final is not None else None,
        history=history_file.to_card(history),
        plots=[p.relative_to(output_dir).as_posix() for p in final.plots] if final is not None else [],
    )
    return compiler.compile_model(
        spec, inputs, output_dir, name, serve_on_gpu=spec.serving.gpu, repeats=repeats, threads=threads
    )
