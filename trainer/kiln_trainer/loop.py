"""The training loop: data → model → forward → loss → backward → update → evaluate → checkpoint → report →
stop, then the hand-off to the compile step. ``train()`` is what ``kiln train``, trainer pods and local mode
(``kiln run``) all call; it reads top to bottom.
"""

import contextlib
import logging
import math
import random
import signal
import time
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader

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
    cfg, pin = spec.training, ctx.device.type == "cuda"

    # -- data, then model, optimizer and schedule, resumed from the newest compatible checkpoint
    _seed(cfg.seed)
    bundle = data.load_data(spec, rank=ctx.rank, world_size=ctx.world_size)
    checkpointer = checkpoint.Checkpointer(
        output_dir, every=cfg.checkpoint_every, keep=cfg.keep_checkpoints, writer=ctx.is_main
    )
    state, step = _prepare(spec, bundle, ctx, checkpointer)
    val_loader = data.build_loader(bundle.val, spec, train=False, pin_memory=pin)

    # -- reporting: progress lines or bar, /metrics, TrainingJob status (rank 0)
    progress_log = progress.ProgressLog(log_format, cfg.epochs, enabled=ctx.is_main)
    reporter = status_reporter.StatusReporter.from_env(enabled=ctx.is_main, min_interval=status_interval)
    metrics.EPOCHS_REQUESTED.set(cfg.epochs)
    start = api.Progress(epoch=state.epoch, total_epochs=cfg.epochs, updated_at=api.now_rfc3339())
    reporter.progress(start, checkpointer.last_name)

    while state.stop_reason is None:
        state.epoch += 1
        epoch_start = time.perf_counter()
        _seed(cfg.seed, state.epoch, ctx.rank)
        loader = data.build_loader(
            bundle.train, spec, train=True, epoch=state.epoch, rank=ctx.rank, world_size=ctx.world_size, pin_memory=pin
        )

        # -- forward, loss, backward and update, batch by batch
        totals = step.run_epoch(state, loader, stop, progress_log, reporter)
        train_seconds = time.perf_counter() - epoch_start

        # -- evaluate (rank 0 alone; the others wait for its verdict)
        if ctx.is_main:
            evaluation = evaluate.evaluate(
                state.evaluated,
                val_loader,
                bundle.class_names,
                device=ctx.device,
                amp_dtype=step.amp_dtype,
                channels_last=step.channels_last,
            )
            state.stop_reason = state.stops.check(state.epoch, evaluation.accuracy)
            record = evaluate.EpochRecord(
                epoch=state.epoch,
                train_loss=totals.loss_sum / max(totals.seen, 1),
                train_accuracy=totals.correct / max(totals.seen, 1),
                val_loss=evaluation.loss,
                val_accuracy=evaluation.accuracy,
                samples_per_second=totals.seen / max(train_seconds, 1e-9),
                duration_seconds=0.0,
                learning_rate=totals.learning_rate,
            )
            state.history.append(record)

            # -- checkpoint: the best model whenever it improves, the full state on schedule
            if evaluation.accuracy > state.best_accuracy:
                state.best_accuracy, state.best_epoch = evaluation.accuracy, state.epoch
                checkpointer.save_best(state.best(evaluation))
            record.duration_seconds = time.perf_counter() - epoch_start
            if checkpointer.due(state.epoch, last=state.stop_reason is not None):
                checkpointer.save(state, evaluation)

            # -- report
            history_file.write_csv(output_dir, state.history)
            progress_log.end_epoch(record)
            metrics.observe_epoch(record, state.best_accuracy)
            reporter.progress(progress.status(state.history, cfg.epochs), checkpointer.last_name)

        # -- stop: rank 0 decided; everyone follows
        state.stop_reason = distributed.broadcast(ctx, state.stop_reason)

    # -- finish: the best model, its summary, the hand-off to the compile step (rank 0)
    result: handoff.TrainResult | None = None
    if ctx.is_main:
        result = handoff.finish(
            spec, bundle, state, checkpointer, ctx=ctx, name=name, compile=compile, reporter=reporter
        )
    result = distributed.after_main(ctx, result)
    assert result is not None
    return result


def _prepare(
    spec: api.TrainingJobSpec, bundle: data.DataBundle, ctx: distributed.Context, checkpointer: checkpoint.Checkpointer
) -> tuple[checkpoint.TrainingState, "_Step"]:
    """Build model, EMA, optimizer, schedule and loss, restore them from the newest checkpoint if there is
    one, then wrap the model for DDP."""
    cfg, device = spec.training, ctx.device
    model = models.build_model(spec, bundle.num_classes).to(device)
    if cfg.sync_batch_norm and ctx.enabled and device.type == "cuda":
        model = nn.SyncBatchNorm.convert_sync_batchnorm(model)  # type: ignore[no-untyped-call]
    models.check_input_size(model, bundle.image_size, device)
    channels_last = device.type == "cuda"
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    amp_dtype, scaler = _precision(cfg, device)
    averaged = ema.Ema(model, cfg.ema) if cfg.ema is not None else None  # evaluated and exported when on
    optimizer = optimizers.build_optimizer(model, cfg)
    batches = len(data.build_loader(bundle.train, spec, train=True, rank=ctx.rank, world_size=ctx.world_size))
    scheduler, per_batch = optimizers.build_scheduler(
        optimizer, cfg, math.ceil(batches / cfg.gradient_accumulation_steps)
    )
    state = checkpoint.TrainingState(
        spec, bundle.class_names, model, optimizer, scheduler, scaler, stopping.StopConditions(cfg), averaged
    )

    if checkpointer.resume(state) and ctx.is_main:
        if state.stop_reason is not None:
            log.info(
                "%s: training already ended (%s) after epoch %d; handing off",
                checkpointer.last,
                state.stop_reason,
                state.epoch,
            )
        else:
            log.info(
                "resuming from %s: epoch %d of %d done, continuing at epoch %d",
                checkpointer.last,
                state.epoch,
                cfg.epochs,
                state.epoch + 1,
            )
    if distributed.broadcast(ctx, state.epoch) != state.epoch:
        raise RuntimeError(
            f"rank {ctx.rank} would resume at epoch {state.epoch + 1}, rank 0 elsewhere: every rank "
            "must see the same output folder"
        )

    # DDP after the resume: it broadcasts rank 0's weights once, when wrapped.
    train_model: nn.Module = model
    if ctx.enabled:
        train_model = DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
    mixer = mixup.Mixer(cfg.mixup, bundle.num_classes) if cfg.mixup is not None else None
    criterion = nn.CrossEntropyLoss(label_smoothing=cfg.label_smoothing)
    return state, _Step(ctx, cfg, train_model, criterion, mixer, amp_dtype, channels_last, per_batch)


class _Totals(NamedTuple):
    """One epoch's training figures, summed over all ranks."""

    loss_sum: float
    correct: float
    seen: float
    learning_rate: float  # as used by the epoch's first step


@dataclass
class _Step:
    """How one epoch trains: forward under autocast (on mixed batches with mixup/CutMix), loss, backward
    through the grad scaler with gradients of ``gradientAccumulationSteps`` batches adding up, clipping, the
    update, the moving average, and the schedule (per update or per epoch)."""

    ctx: distributed.Context
    training: api.TrainingSpec
    model: nn.Module  # what runs forward: the DDP wrapper when distributed
    criterion: nn.Module
    mixer: mixup.Mixer | None
    amp_dtype: torch.dtype | None
    channels_last: bool
    per_batch: bool

    def run_epoch(
        self,
        state: checkpoint.TrainingState,
        loader: DataLoader[data.Item],
        stop: interrupts.StopSignal,
        progress_log: progress.ProgressLog,
        reporter: status_reporter.StatusReporter,
    ) -> _Totals:
        """Train on every batch of ``loader``. Raises TrainingInterrupted between steps once any rank was asked
        to stop."""
        cfg, device, optimizer, scaler = self.training, self.ctx.device, state.optimizer, state.scaler
        accumulate = cfg.gradient_accumulation_steps
        self.model.train()
        optimizers.hold_frozen(optimizer, cfg, state.epoch)
        learning_rate = optimizers.learning_rate(optimizer)  # as used by this epoch's first step
        optimizer.zero_grad(set_to_none=True)
        totals = torch.zeros(3, dtype=torch.float64, device=device)  # loss sum, correct, samples
        progress_log.start_epoch(state.epoch, len(loader))
        for step, (images, targets) in enumerate(loader, start=1):
            images = images.to(device, non_blocking=True)
            targets = targets.to(device, non_blocking=True)
            if self.channels_last:
                images = images.contiguous(memory_format=torch.channels_last)

            mixed: torch.Tensor | None = None  # mixup/CutMix targets
            if self.mixer is not None:
                images, mixed = self.mixer(images, targets)

            # -- forward, loss and backward; gradients of `accumulate` batches add up, DDP syncs the last
            boundary = step % accumulate == 0 or step == len(loader)
            no_sync = self.ctx.enabled and not boundary
            with self.model.no_sync() if no_sync else contextlib.nullcontext():  # type: ignore[operator]
                with torch.autocast(device.type, dtype=self.amp_dtype, enabled=self.amp_dtype is not None):
                    logits = self.model(images)
                    loss = self.criterion(logits, targets if mixed is None else mixed)
                scaler.scale(loss / accumulate).backward()

            # -- update
            if boundary:
                if cfg.gradient_clip_norm is not None:
                    scaler.unscale_(optimizer)
                    nn.utils.clip_grad_norm_(state.model.parameters(), cfg.gradient_clip_norm)
                scaler.step(optimizer)
                scaler.update()
                optimizer.zero_grad(set_to_none=True)
                if self.per_batch:
                    state.scheduler.step()
                    optimizers.hold_frozen(optimizer, cfg, state.epoch)
                if state.averaged is not None:
                    state.averaged.update(state.model)
                state.step += 1  # optimizer steps

            # -- bookkeeping, without waiting for the device
            with torch.no_grad():
                totals[0] += loss.detach().double() * len(targets)
                totals[1] += (logits.argmax(dim=1) == targets).sum()
                totals[2] += len(targets)
            metrics.STEP.set(state.step)
            metrics.SAMPLES.inc(len(targets))
            progress_log.step(step, loss)
            if distributed.any_rank(self.ctx, stop.requested is not None):
                progress_log.close()
                reporter.flush()
                raise errors.TrainingInterrupted(stop.requested or signal.SIGTERM)
        if not self.per_batch:
            state.scheduler.step()
        loss_sum, correct, seen = distributed.sum_across(self.ctx, totals).tolist()
        return _Totals(loss_sum, correct, seen, learning_rate)
