"""The end of training (rank 0): reload the best model, summarise the run into best.pt, hand the model to
the compile step, and report the result to the TrainingJob's status."""

import logging
from dataclasses import dataclass
from pathlib import Path

from torch import nn

from kiln import api
from kiln_trainer import checkpoint, data, distributed, evaluate, report, status_reporter
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
    model: nn.Module,
    history: list[evaluate.EpochRecord],
    stop_reason: api.StopReason,
    *,
    ctx: distributed.Context,
    output_dir: Path,
    name: str,
    compile: bool,
    reporter: status_reporter.StatusReporter,
    last_checkpoint: Path | None,
    resumed_from: int | None,
) -> TrainResult:
    """Reload the best model, measure it beyond validation (report.measure_final), add the summary to best.pt,
    compile, report the end."""
    best_path = checkpoint.best_checkpoint_path(output_dir)
    best = checkpoint.load_checkpoint(best_path)
    model.load_state_dict(best["model"])
    model.eval()
    final = report.measure_final(
        spec, bundle, model, history, best["confusion_matrix"], device=ctx.device, output_dir=output_dir
    )
    best_metrics = final.metrics(api.Metrics.model_validate(best["metrics"]))
    warnings = evaluate.overfitting_warnings(
        history, spec.training.overfit_gap, clean_train_accuracy=final.clean_train_accuracy
    )
    for warning in warnings:
        log.warning("%s", warning)
    summary = api.TrainingSummary(
        architecture=spec.model.architecture,
        dataset=spec.data.dataset,
        epochs_requested=spec.training.epochs,
        epochs_run=history[-1].epoch,
        best_epoch=int(best["epoch"]),
        best_val_accuracy=float(best["best_accuracy"]),
        final_train_accuracy=history[-1].train_accuracy,
        stop_reason=stop_reason,
        duration_seconds=sum(h.duration_seconds for h in history),
        workers=ctx.world_size,
        device=ctx.device.type,
        warnings=warnings,
        clean_train_accuracy=final.clean_train_accuracy,
        test_accuracy=best_metrics.test_accuracy,
    )
    checkpoint.save_atomic({**best, "metrics": best_metrics.to_dict(), "summary": summary.to_dict()}, best_path)
    log.info(
        "training stopped (%s) after %d epochs; best validation accuracy %.4f at epoch %d",
        stop_reason,
        summary.epochs_run,
        summary.best_val_accuracy,
        summary.best_epoch,
    )
    result = TrainResult(
        output_dir=output_dir,
        summary=summary,
        metrics=best_metrics,
        per_class=[api.ClassMetrics.model_validate(c) for c in best["per_class"]],
        confusion_matrix=best["confusion_matrix"],
        class_names=list(best["class_names"]),
        history=history,
        best_checkpoint=best_path,
        resumed_from_epoch=resumed_from,
        final=final,
    )
    # Report before compiling: the metrics stand even if the compile step fails and is retried.
    last = history[-1]
    final_progress = api.Progress(
        epoch=last.epoch,
        total_epochs=spec.training.epochs,
        train_loss=last.train_loss,
        val_loss=last.val_loss,
        val_accuracy=last.val_accuracy,
        samples_per_second=last.samples_per_second,
        eta_seconds=0,
        updated_at=api.now_rfc3339(),
    )
    reporter.final(final_progress, best_metrics, warnings, str(last_checkpoint) if last_checkpoint else None)
    if compile:
        result.model_card = compile_best(spec, bundle, model, result, output_dir, name)
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
    result: TrainResult,
    output_dir: Path,
    name: str,
) -> api.ModelCard:
    """Hand the best model to the compile step, which exports the variants and writes model-card.json."""
    from kiln_trainer import compile as compiler  # imported here: onnx and onnxruntime only when compiling

    val_images, val_labels = data.stack_images(bundle.val)
    calibration, _ = data.stack_images(bundle.train_eval, limit=spec.export.calibration.samples)
    test_images, test_labels = data.stack_images(bundle.test) if bundle.test is not None else (None, None)
    final = result.final
    inputs = compiler.CompileInputs(
        model=model.cpu().eval(),
        val_images=val_images,
        val_labels=val_labels,
        calibration_images=calibration,
        class_names=result.class_names,
        preprocessing=api.Preprocessing(image_size=bundle.image_size, channels=3, mean=bundle.mean, std=bundle.std),
        training=result.summary,
        metrics=result.metrics,
        per_class=result.per_class,
        confusion_matrix=result.confusion_matrix,
        test_images=test_images,
        test_labels=test_labels,
        test_metrics=final.test.held_out() if final is not None and final.test is not None else None,
        adversarial=final.adversarial if final is not None else None,
        history=history_file.to_card(result.history),
        plots=[p.relative_to(output_dir).as_posix() for p in final.plots] if final is not None else [],
    )
    return compiler.compile_model(spec, inputs, output_dir, name, serve_on_gpu=spec.serving.gpu)
