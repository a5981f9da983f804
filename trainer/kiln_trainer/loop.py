"""The training loop: data → model → forward → loss → backward → update → evaluate → checkpoint → report →
stop, then the hand-off to the compile step. ``train()`` is what ``kiln train``, trainer pods and local mode
(``kiln run``) all call; it reads top to bottom.
"""

import contextlib
import dataclasses
import logging
import math
import random
import signal
import time
from pathlib import Path

import numpy as np
import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from kiln import api
from kiln_trainer import (
    checkpoint,
    data,
    distributed,
    ema,
    errors,
    evaluate,
    handoff,
    interrupts,
    metrics,
    mixup,
    models,
    optimizers,
    progress,
    resume,
    status_reporter,
    stopping,
)
from kiln_trainer import (
    history as history_file,
)

log = logging.getLogger(__name__)

TrainResult = handoff.TrainResult  # re-exported: what train() returns


def _seed(*parts: int) -> None:
    """Seed torch, numpy and random from ``parts``; reseeding at each epoch makes an epoch's shuffling,
    augmentation and dropout depend on (seed, epoch, rank) only, so a resumed epoch replays exactly."""
    value = int(np.random.SeedSequence(list(parts)).generate_state(1)[0])
    torch.manual_seed(value)
    np.random.seed(value)
    random.seed(value)


def _precision(spec: api.TrainingSpec, device: torch.device) -> tuple[torch.dtype | None, torch.amp.GradScaler]:
    """Autocast dtype and grad scaler: bf16 on CUDA when supported, fp16 with a scaler otherwise; none on CPU."""
    if device.type != "cuda" or spec.mixed_precision == "none":
        return None, torch.amp.GradScaler("cuda", enabled=False)
    # auto: native bf16 only (T4/V100 emulate it, slower than fp16); is_bf16_supported() counts emulation.
    native_bf16 = torch.cuda.is_bf16_supported(including_emulation=False)
    bf16 = spec.mixed_precision == "bf16" or (spec.mixed_precision == "auto" and native_bf16)
    dtype = torch.bfloat16 if bf16 else torch.float16
    return dtype, torch.amp.GradScaler("cuda", enabled=dtype == torch.float16)


def train(
    spec: api.TrainingJobSpec,
    output_dir: Path,
    *,
    name: str = "model",
    compile: bool = True,
    metrics_port: int = 0,
    log_format: progress.LogFormat = "auto",
    status_interval: float = 5.0,
) -> handoff.TrainResult:
    """Train (resuming from a compatible checkpoint in ``output_dir``), keep the best model by validation
    accuracy, and compile it unless ``compile`` is False. Raises ConfigError for bad config or data and
    TrainingInterrupted on SIGINT/SIGTERM (the last checkpoint stays usable)."""
    ctx = distributed.setup()
    stop_metrics = metrics.serve(metrics_port if ctx.is_main else 0)
    try:
        with interrupts.StopSignal() as stop:
            return _train(spec, output_dir.absolute(), ctx, stop, name, compile, log_format, status_interval)
    finally:
        stop_metrics()
        distributed.teardown(ctx)


def _train(
    spec: api.TrainingJobSpec,
    output_dir: Path,
    ctx: distributed.Context,
    stop: interrupts.StopSignal,
    name: str,
    compile: bool,
    log_format: progress.LogFormat,
    status_interval: float,
) -> handoff.TrainResult:
    cfg, device, seed = spec.training, ctx.device, spec.training.seed

    # -- data and model
    _seed(seed)
    bundle = data.load_data(spec, rank=ctx.rank, world_size=ctx.world_size)
    model = models.build_model(spec, bundle.num_classes).to(device)
    if cfg.sync_batch_norm and ctx.enabled and device.type == "cuda":
        model = nn.SyncBatchNorm.convert_sync_batchnorm(model)  # type: ignore[no-untyped-call]
    models.check_input_size(model, bundle.image_size, device)
    channels_last = device.type == "cuda"
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    amp_dtype, scaler = _precision(cfg, device)
    averaged = ema.Ema(model, cfg.ema) if cfg.ema is not None else None  # evaluated and exported when on
    mixer = mixup.Mixer(cfg.mixup, bundle.num_classes) if cfg.mixup is not None else None
    accumulate = cfg.gradient_accumulation_steps
    pin = device.type == "cuda"
    val_loader = data.build_loader(bundle.val, spec, train=False, pin_memory=pin)

    # -- optimizer, schedule, loss
    optimizer = optimizers.build_optimizer(model, cfg)
    batches = len(data.build_loader(bundle.train, spec, train=True, rank=ctx.rank, world_size=ctx.world_size))
    steps_per_epoch = math.ceil(batches / accumulate)
    scheduler, per_batch = optimizers.build_scheduler(optimizer, cfg, steps_per_epoch)
    criterion = nn.CrossEntropyLoss(label_smoothing=cfg.label_smoothing)

    # -- resume from the newest compatible checkpoint
    checkpointer = checkpoint.Checkpointer(
        output_dir, every=cfg.checkpoint_every, keep=cfg.keep_checkpoints, writer=ctx.is_main
    )
    stops = stopping.StopConditions(cfg)
    history: list[evaluate.EpochRecord] = []
    best_accuracy, best_epoch, epoch, global_step = -1.0, 0, 0, 0
    stop_reason: api.StopReason | None = None
    last_checkpoint: Path | None = None
    state = checkpointer.resume_state(spec)
    if state is not None:
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        resume.load_scaler(scaler, state["scaler"])
        stops.load_state_dict(state["stop_conditions"])
        checkpoint.restore_rng(state["rng"])
        if averaged is not None and state.get("ema") is not None:
            averaged.load_state_dict(state["ema"])
        history = [evaluate.EpochRecord(**h) for h in state["history"]]
        best_accuracy, best_epoch, epoch = state["best_accuracy"], state["best_epoch"], state["epoch"]
        global_step, stop_reason, last_checkpoint = state["step"], state.get("stop_reason"), checkpointer.latest()
        if ctx.is_main and stop_reason is not None:
            log.info("%s: training already ended (%s) after epoch %d; handing off", last_checkpoint, stop_reason, epoch)
        elif ctx.is_main:
            log.info(
                "resuming from %s: epoch %d of %d done, continuing at epoch %d",
                last_checkpoint,
                epoch,
                cfg.epochs,
                epoch + 1,
            )
    resumed_from = epoch if state is not None else None
    if distributed.broadcast(ctx, epoch) != epoch:
        raise RuntimeError(
            f"rank {ctx.rank} would resume at epoch {epoch + 1}, rank 0 elsewhere: every rank "
            "must see the same output folder"
        )
    train_model: nn.Module = model
    if ctx.enabled:
        train_model = DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)

    # -- reporting: progress lines or bar, /metrics, TrainingJob status (rank 0)
    progress_log = progress.ProgressLog(log_format, cfg.epochs, enabled=ctx.is_main)
    reporter = status_reporter.StatusReporter.from_env(enabled=ctx.is_main, min_interval=status_interval)
    metrics.EPOCHS_REQUESTED.set(cfg.epochs)
    reporter.progress(
        api.Progress(epoch=epoch, total_epochs=cfg.epochs, updated_at=api.now_rfc3339()),
        str(last_checkpoint) if last_checkpoint else None,
    )

    while stop_reason is None:
        epoch += 1
        epoch_start = time.perf_counter()
        _seed(seed, epoch, ctx.rank)
        loader = data.build_loader(
            bundle.train, spec, train=True, epoch=epoch, rank=ctx.rank, world_size=ctx.world_size, pin_memory=pin
        )
        train_model.train()
        optimizers.hold_frozen(optimizer, cfg, epoch)
        learning_rate = optimizers.learning_rate(optimizer)  # as used by this epoch's first step
        optimizer.zero_grad(set_to_none=True)
        totals = torch.zeros(3, dtype=torch.float64, device=device)  # loss sum, correct, samples
        progress_log.start_epoch(epoch, len(loader))
        for step, (images, targets) in enumerate(loader, start=1):
            images = images.to(device, non_blocking=True)
            targets = targets.to(device, non_blocking=True)
            if channels_last:
                images = images.contiguous(memory_format=torch.channels_last)

            mixed: torch.Tensor | None = None  # mixup/CutMix targets
            if mixer is not None:
                images, mixed = mixer(images, targets)

            # -- forward, loss and backward; gradients of `accumulate` batches add up, DDP syncs the last
            boundary = step % accumulate == 0 or step == len(loader)
            with train_model.no_sync() if ctx.enabled and not boundary else contextlib.nullcontext():  # type: ignore[operator]
                with torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
                    logits = train_model(images)
                    loss = criterion(logits, targets if mixed is None else mixed)
                scaler.scale(loss / accumulate).backward()

            # -- update
            if boundary:
                if cfg.gradient_clip_norm is not None:
                    scaler.unscale_(optimizer)
                    nn.utils.clip_grad_norm_(model.parameters(), cfg.gradient_clip_norm)
                scaler.step(optimizer)
                scaler.update()
                optimizer.zero_grad(set_to_none=True)
                if per_batch:
                    scheduler.step()
                    optimizers.hold_frozen(optimizer, cfg, epoch)
                if averaged is not None:
                    averaged.update(model)
                global_step += 1  # optimizer steps

            # -- bookkeeping, without waiting for the device
            with torch.no_grad():
                totals[0] += loss.detach().double() * len(targets)
                totals[1] += (logits.argmax(dim=1) == targets).sum()
                totals[2] += len(targets)
            metrics.STEP.set(global_step)
            metrics.SAMPLES.inc(len(targets))
            progress_log.step(step, loss)
            if distributed.any_rank(ctx, stop.requested is not None):
                progress_log.close()
                reporter.flush()
                raise errors.TrainingInterrupted(stop.requested or signal.SIGTERM)
        if not per_batch:
            scheduler.step()
        loss_sum, correct, seen = distributed.sum_across(ctx, totals).tolist()
        train_seconds = time.perf_counter() - epoch_start

        # -- evaluate (rank 0 alone; the others wait for its verdict)
        if ctx.is_main:
            evaluated = averaged.module if averaged is not None else model
            evaluation = evaluate.evaluate(
                evaluated,
                val_loader,
                bundle.class_names,
                device=device,
                amp_dtype=amp_dtype,
                channels_last=channels_last,
            )
            stop_reason = stops.check(epoch, evaluation.accuracy)
            record = evaluate.EpochRecord(
                epoch=epoch,
                train_loss=loss_sum / max(seen, 1),
                train_accuracy=correct / max(seen, 1),
                val_loss=evaluation.loss,
                val_accuracy=evaluation.accuracy,
                samples_per_second=seen / max(train_seconds, 1e-9),
                duration_seconds=0.0,
                learning_rate=learning_rate,
            )
            history.append(record)

            # -- checkpoint: the best model whenever it improves, the full state on schedule
            if evaluation.accuracy > best_accuracy:
                best_accuracy, best_epoch = evaluation.accuracy, epoch
                checkpointer.save_best(
                    {
                        "model": evaluated.state_dict(),
                        "config": spec.to_dict(),
                        "epoch": epoch,
                        "best_accuracy": best_accuracy,
                        "class_names": bundle.class_names,
                        "metrics": evaluation.metrics().to_dict(),
                        "per_class": [c.to_dict() for c in evaluation.per_class],
                        "confusion_matrix": evaluation.confusion_matrix,
                    }
                )
            record.duration_seconds = time.perf_counter() - epoch_start
            if checkpointer.due(epoch, last=stop_reason is not None):
                last_checkpoint = checkpointer.save(
                    {
                        "model": model.state_dict(),
                        "optimizer": optimizer.state_dict(),
                        "scheduler": scheduler.state_dict(),
                        "scaler": scaler.state_dict(),
                        "ema": averaged.state_dict() if averaged is not None else None,
                        "config": spec.to_dict(),
                        "epoch": epoch,
                        "step": global_step,
                        "best_accuracy": best_accuracy,
                        "best_epoch": best_epoch,
                        "stop_reason": stop_reason,
                        "stop_conditions": stops.state_dict(),
                        "history": [dataclasses.asdict(h) for h in history],
                        "rng": checkpoint.rng_states(),
                        "class_names": bundle.class_names,
                        "metrics": evaluation.metrics().to_dict(),
                        "per_class": [c.to_dict() for c in evaluation.per_class],
                        "confusion_matrix": evaluation.confusion_matrix,
                    },
                    epoch,
                )

            # -- report
            history_file.write_csv(output_dir, history)
            progress_log.end_epoch(record)
            metrics.observe_epoch(record, best_accuracy)
            reporter.progress(_progress(record, history, cfg.epochs), str(last_checkpoint) if last_checkpoint else None)

        # -- stop: rank 0 decided; everyone follows
        stop_reason = distributed.broadcast(ctx, stop_reason)

    # -- finish: the best model, its summary, the hand-off to the compile step (rank 0)
    result: handoff.TrainResult | None = None
    if ctx.is_main:
        assert stop_reason is not None
        result = handoff.finish(
            spec,
            bundle,
            model,
            history,
            stop_reason,
            ctx=ctx,
            output_dir=output_dir,
            name=name,
            compile=compile,
            reporter=reporter,
            last_checkpoint=last_checkpoint,
            resumed_from=resumed_from,
        )
    result = distributed.after_main(ctx, result)
    assert result is not None
    return result


def _progress(record: evaluate.EpochRecord, history: list[evaluate.EpochRecord], total: int) -> api.Progress:
    mean_duration = sum(h.duration_seconds for h in history) / len(history)
    return api.Progress(
        epoch=record.epoch,
        total_epochs=total,
        train_loss=record.train_loss,
        val_loss=record.val_loss,
        val_accuracy=record.val_accuracy,
        samples_per_second=record.samples_per_second,
        eta_seconds=max(0, total - record.epoch) * mean_duration,
        updated_at=api.now_rfc3339(),
    )
