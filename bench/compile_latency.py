"""Latency of the compiled variants against PyTorch eager: resnet18 and small-cnn at 32x32 and 224x224,
batch 1 and 32, median milliseconds and speed-up over PyTorch eager fp32, in one run; and each variant's
validation accuracy where trained weights exist.

Models are built by the trainer, exported, quantized and timed with the compile step's own functions, so the
numbers are those `auto` selection sees. small-cnn at 32x32 is first trained briefly on digits with kiln's
train() (which also compiles it and writes a model card); its variants are built from the best checkpoint,
calibrated on the training split as the compile step does, and each is scored on the validation split. The
other cases use random weights (latency does not depend on their values) and have no accuracy. PyTorch and
onnxruntime get the same number of threads. fp16 is timed only where onnxruntime has CUDA.
Goal: int8-static at least 2x faster than PyTorch eager at batch 32 on a CPU.

    python bench/compile_latency.py --quick     # 3 timed runs per cell instead of 10
    python bench/compile_latency.py --threads 1 # one core for both runtimes
"""

import argparse
import contextlib
import io
import logging
import statistics
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import machine
import numpy as np
import onnxruntime as ort
import torch

from kiln import api
from kiln.api import constants
from kiln_trainer import checkpoint, data, export, loop, measure, models, quantize

CASES = [("small-cnn", 32), ("small-cnn", 224), ("resnet18", 32), ("resnet18", 224)]
BATCHES = (1, 32)
CLASSES = 10
CALIBRATION_IMAGES = 32
GOAL = 2.0
# Untimed runs before timing (oneDNN and onnxruntime set up kernels per shape on the first runs).
WARMUP = 2
# The case trained before timing (on digits, whose images are resized to this size), and for how long.
TRAINED_CASE = ("small-cnn", 32)
TRAIN_EPOCHS_QUICK, TRAIN_EPOCHS_FULL = 3, 4


@dataclass
class Trained:
    """small-cnn trained on digits by kiln's train(): the best checkpoint's weights and the arrays the compile
    step uses (validation split for accuracy, training split without augmentation for calibration)."""

    weights: dict[str, torch.Tensor]
    val_images: np.ndarray
    val_labels: np.ndarray
    calibration: np.ndarray
    calibration_method: str
    card: api.ModelCard
    epochs: int
    seconds: float


def _digits_spec(epochs: int) -> api.TrainingJobSpec:
    arch, size = TRAINED_CASE
    return api.TrainingJobSpec.model_validate(
        {
            "model": {"architecture": arch},
            "data": {"dataset": "digits", "imageSize": size, "numWorkers": 0},
            "training": {"epochs": epochs},
        }
    )


def train_small_cnn(epochs: int, folder: Path) -> Trained:
    """Train (and compile: the card is the compile step's own view of the same checkpoint) quietly in
    ``folder``; return what the bench needs to score its own variants."""
    spec = _digits_spec(epochs)
    began = time.monotonic()
    logging.disable(logging.WARNING)
    try:
        with contextlib.redirect_stdout(io.StringIO()):
            result = loop.train(spec, folder, name="bench-small-cnn", compile=True, metrics_port=0, log_format="json")
    finally:
        logging.disable(logging.NOTSET)
    seconds = time.monotonic() - began
    bundle = data.load_data(spec)
    val_images, val_labels = data.stack_images(bundle.val)
    calibration, _ = data.stack_images(bundle.train_eval, limit=spec.export.calibration.samples)
    return Trained(
        weights=checkpoint.load_checkpoint(result.best_checkpoint)["model"],
        val_images=val_images,
        val_labels=val_labels,
        calibration=calibration,
        calibration_method=spec.export.calibration.method,
        card=api.ModelCard.read(folder / constants.MODEL_CARD_FILE),
        epochs=epochs,
        seconds=seconds,
    )


def _torch_ms(model: torch.nn.Module, batch: np.ndarray, repeats: int) -> float:
    """Median PyTorch eager latency (inference mode) after WARMUP untimed runs."""
    x = torch.from_numpy(batch)
    times = []
    with torch.inference_mode():
        for _ in range(WARMUP):
            model(x)
        for _ in range(repeats):
            start = time.perf_counter()
            model(x)
            times.append((time.perf_counter() - start) * 1000)
    return statistics.median(times)


def _torch_accuracy(model: torch.nn.Module, images: np.ndarray, labels: np.ndarray, batch_size: int = 64) -> float:
    with torch.inference_mode():
        chunks = range(0, len(images), batch_size)
        logits = [model(torch.from_numpy(images[i : i + batch_size])).numpy() for i in chunks]
    return measure.accuracy(np.concatenate(logits), labels)


def _variants(
    arch: str, size: int, images: np.ndarray, folder: Path, gpu: bool, trained: Trained | None
) -> tuple[torch.nn.Module, dict[str, tuple[Path, str]]]:
    """The model (random weights, or ``trained``'s) and its compiled variants: name -> (file, provider)."""
    spec = api.TrainingJobSpec.model_validate({"model": {"architecture": arch}, "data": {"imageSize": size}})
    torch.manual_seed(0)
    model = models.build_model(spec, CLASSES)
    if trained is not None:
        model.load_state_dict(trained.weights)
    model.eval()
    calibration = trained.calibration if trained is not None else images[:CALIBRATION_IMAGES]
    method = trained.calibration_method if trained is not None else "minmax"
    fp32 = export.export_onnx(model, images, folder / "fp32.onnx", opset=export.resolve_opset(None), metadata={}).path
    pre = quantize.preprocess(fp32, folder / "pre.onnx")
    settings = quantize.int8_settings()
    built = {
        "fp32": (fp32, measure.CPU),
        "int8-dynamic": (quantize.quantize_int8_dynamic(pre, folder / "dynamic.onnx", settings), measure.CPU),
        "int8-static": (
            quantize.quantize_int8_static(pre, folder / "static.onnx", calibration, method=method, settings=settings),
            measure.CPU,
        ),
    }
    if gpu:
        built["fp16 (GPU)"] = (quantize.convert_fp16(fp32, folder / "fp16.onnx"), measure.CUDA)
    return model, built


def _case(
    arch: str, size: int, repeats: int, threads: int, gpu: bool, trained: Trained | None
) -> tuple[list[str], float]:
    """Table rows (one per batch size) for one model at one input size, with each variant's validation
    accuracy when ``trained``, and int8-static's speed-up over PyTorch eager at batch 32."""
    if trained is not None:
        images = trained.val_images
    else:
        images = np.random.default_rng(0).standard_normal((CALIBRATION_IMAGES, 3, size, size)).astype(np.float32)
    with tempfile.TemporaryDirectory(prefix="kiln-bench-") as tmp:
        model, built = _variants(arch, size, images, Path(tmp), gpu, trained)
        sessions = {
            name: measure.open_session(path, provider=provider, threads=threads)
            for name, (path, provider) in built.items()
        }
        accuracy: dict[str, float] = {}
        if trained is not None:
            accuracy["PyTorch eager"] = _torch_accuracy(model, trained.val_images, trained.val_labels)
            for name, session in sessions.items():
                accuracy[name] = measure.accuracy(measure.predict(session, trained.val_images), trained.val_labels)
        if accuracy:
            accuracy_cell = " / ".join(f"{value:.3f}" for value in accuracy.values())
        elif arch == TRAINED_CASE[0]:
            accuracy_cell = f"- (trained at {TRAINED_CASE[1]}x{TRAINED_CASE[1]} only)"
        else:
            accuracy_cell = "- (no trained weights)"
        rows, goal_speedup = [], 0.0
        for batch_size in BATCHES:
            batch = measure.fixed_batch(images, batch_size)
            eager = _torch_ms(model, batch, repeats)
            cells = [f"{eager:.2f}"]
            for session in sessions.values():
                ms = measure.median_latency_ms(session, batch, repeats=repeats, warmup=WARMUP)
                cells.append(f"{ms:.2f} ({eager / ms:.1f}x)")
                if session is sessions["int8-static"] and batch_size == 32:
                    goal_speedup = eager / ms
            cells.append(accuracy_cell)
            rows.append(f"| {arch} | {size}x{size} | {batch_size} | " + " | ".join(cells) + " |")
    return rows, goal_speedup


def main(quick: bool, threads: int | None = None) -> str:
    """Run every case; return a Markdown table of median ms and speed-up over PyTorch eager fp32.
    ``threads`` for both PyTorch and onnxruntime (default: every core this process may use)."""
    repeats, threads = (3 if quick else 10), threads or machine.nproc()
    epochs = TRAIN_EPOCHS_QUICK if quick else TRAIN_EPOCHS_FULL
    with tempfile.TemporaryDirectory(prefix="kiln-bench-train-") as tmp:
        trained = train_small_cnn(epochs, Path(tmp))
    torch.set_num_threads(threads)  # after train(), which sets its own
    gpu = measure.CUDA in ort.get_available_providers() and torch.cuda.is_available()
    variants = ["onnxruntime fp32", "int8-dynamic", "int8-static"] + (["fp16 (GPU)"] * gpu)
    accuracy_column = "validation accuracy (PyTorch eager / " + " / ".join(variants) + ")"
    columns = ["PyTorch eager fp32", *variants, accuracy_column]
    settings = quantize.int8_settings()
    card = ", ".join(f"{v.name} {v.accuracy:.3f}" for v in trained.card.variants if v.accuracy is not None)
    lines = [
        "## Compiled inference latency (median ms, speed-up over PyTorch eager fp32)",
        "",
        f"{machine.cpu_model()}, {threads} thread{'s' * (threads != 1)} for PyTorch and onnxruntime; "
        f"int8 {settings.note}; torch {torch.__version__}, onnxruntime {ort.__version__}; {repeats} timed runs per cell"
        f"{' (quick)' if quick else ''}.",
        "",
        f"Accuracy: {TRAINED_CASE[0]} at {TRAINED_CASE[1]}x{TRAINED_CASE[1]} was first trained with kiln's train() for "
        f"{trained.epochs} epochs on digits ({trained.seconds:.0f} s, compile step included); the variants timed "
        f"here are built from its best checkpoint (int8-static calibrated on {len(trained.calibration)} training "
        f"images, {trained.calibration_method}) and scored on the {len(trained.val_labels)} validation images. "
        f"The compile step's own model card for that checkpoint: {card}. The other cases have random weights.",
        "",
        "| model | input | batch | " + " | ".join(columns) + " |",
        "|---|---|---|" + "---|" * len(columns),
    ]
    verdicts = []
    for arch, size in CASES:
        rows, speedup = _case(arch, size, repeats, threads, gpu, trained if (arch, size) == TRAINED_CASE else None)
        lines += rows
        verdicts.append(f"{arch} {size}x{size} {speedup:.1f}x ({'met' if speedup >= GOAL else 'not met'})")
    lines += ["", f"Goal, int8-static >= {GOAL:.0f}x faster than PyTorch eager at batch 32: " + "; ".join(verdicts)]
    return "\n".join(lines)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="3 timed runs per cell instead of 10")
    parser.add_argument("--threads", type=int, help="threads for PyTorch and onnxruntime (default: all cores)")
    args = parser.parse_args()
    print(main(args.quick, args.threads))
