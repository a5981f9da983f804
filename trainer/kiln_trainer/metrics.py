"""Prometheus metrics of the trainer, served on /metrics while it trains (rank 0; port 0 = off).

Module-level metrics in the trainer's own registry, so local mode can serve a model from the same process
without name clashes. Base units in the names.
"""

import logging
from collections.abc import Callable

from prometheus_client import CollectorRegistry, Counter, Gauge, start_http_server

from kiln_trainer import evaluate

log = logging.getLogger(__name__)

REGISTRY = CollectorRegistry()
EPOCH = Gauge("kiln_trainer_epoch", "Epochs completed.", registry=REGISTRY)
EPOCHS_REQUESTED = Gauge("kiln_trainer_epochs_requested", "Epochs requested (training.epochs).", registry=REGISTRY)
STEP = Gauge("kiln_trainer_step", "Optimizer steps taken in this run.", registry=REGISTRY)
SAMPLES = Counter("kiln_trainer_samples", "Training samples processed by this process.", registry=REGISTRY)
TRAIN_LOSS = Gauge("kiln_trainer_train_loss", "Mean training loss of the last epoch.", registry=REGISTRY)
VALIDATION_LOSS = Gauge("kiln_trainer_validation_loss", "Validation loss of the last epoch.", registry=REGISTRY)
VALIDATION_ACCURACY = Gauge(
    "kiln_trainer_validation_accuracy_ratio", "Validation accuracy of the last epoch (0-1).", registry=REGISTRY
)
BEST_VALIDATION_ACCURACY = Gauge(
    "kiln_trainer_best_validation_accuracy_ratio", "Best validation accuracy so far.", registry=REGISTRY
)
SAMPLES_PER_SECOND = Gauge(
    "kiln_trainer_samples_per_second", "Training throughput of the last epoch (all ranks).", registry=REGISTRY
)
EPOCH_DURATION = Gauge(
    "kiln_trainer_epoch_duration_seconds", "Wall time of the last epoch, evaluation included.", registry=REGISTRY
)


def serve(port: int) -> Callable[[], None]:
    """Start the /metrics endpoint on ``port`` (0: don't) and return what stops it. A port in use is logged,
    not fatal: metrics must never cost a training run."""
    if port <= 0:
        return lambda: None
    try:
        server, thread = start_http_server(port, registry=REGISTRY)
    except OSError as err:
        log.warning("metrics: cannot listen on port %d (%s); continuing without /metrics", port, err)
        return lambda: None
    log.info("metrics: serving /metrics on port %d", port)

    def stop() -> None:
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)

    return stop


def observe_epoch(record: evaluate.EpochRecord, best_accuracy: float) -> None:
    EPOCH.set(record.epoch)
    TRAIN_LOSS.set(record.train_loss)
    VALIDATION_LOSS.set(record.val_loss)
    VALIDATION_ACCURACY.set(record.val_accuracy)
    BEST_VALIDATION_ACCURACY.set(best_accuracy)
    SAMPLES_PER_SECOND.set(record.samples_per_second)
    EPOCH_DURATION.set(record.duration_seconds)
