"""Measuring compiled models with onnxruntime: predictions, agreement with a reference, accuracy, latency,
size and checksum, and the offline-optimised graph.

Latency is the median of a few timed runs after warm-up on one fixed input, every variant timed in the same
rounds on the same fixed thread count; it is for choosing between variants within one compile, not a
benchmark (bench/compile_latency.py is).
"""

import functools
import logging
import os
import statistics
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnxruntime as ort

from kiln_trainer import export

log = logging.getLogger(__name__)

CPU = "CPUExecutionProvider"
CUDA = "CUDAExecutionProvider"
# Parity gate for the fp32 export against PyTorch.
PARITY_MAX_ABS_DIFF = 1e-3
PARITY_MIN_AGREEMENT = 0.999
# Most intra-op threads used to time variants (selection_threads).
SELECTION_MAX_THREADS = 4


@dataclass(frozen=True)
class Comparison:
    """How closely a model's logits follow a reference's on the same images."""

    max_abs_diff: float
    top1_agreement: float
    reference_scale: float = 1.0  # max(1, largest |reference logit|): float error grows with the magnitude


def measurement_provider(serve_on_gpu: bool) -> str:
    """CUDA when the model will be served on a GPU and this onnxruntime has it; the CPU otherwise."""
    return CUDA if serve_on_gpu and CUDA in ort.get_available_providers() else CPU


def open_session(
    path: Path,
    *,
    provider: str = CPU,
    threads: int | None = None,
    level: ort.GraphOptimizationLevel = ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
    optimized_path: Path | None = None,
) -> ort.InferenceSession:
    """An inference session on ``provider``, refusing to fall back silently to the CPU (onnxruntime only
    warns when a provider fails to load)."""
    options = ort.SessionOptions()
    options.graph_optimization_level = level
    options.log_severity_level = 3
    if threads is not None:
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
    if optimized_path is not None:
        options.optimized_model_filepath = str(optimized_path)
    providers = [provider] if provider == CPU else [provider, CPU]
    session = ort.InferenceSession(str(path), options, providers=providers)
    if session.get_providers()[0] != provider:
        raise RuntimeError(f"onnxruntime could not start {provider} for {path} (got {session.get_providers()})")
    return session


def predict(session: ort.InferenceSession, images: np.ndarray, batch_size: int = 64) -> np.ndarray:
    """Logits for every image, run in batches."""
    outputs = [
        session.run([export.OUTPUT_NAME], {export.INPUT_NAME: np.ascontiguousarray(images[i : i + batch_size])})[0]
        for i in range(0, len(images), batch_size)
    ]
    return np.concatenate(outputs).astype(np.float32)


def compare_logits(reference: np.ndarray, candidate: np.ndarray, *, tie_tolerance: float = 0.0) -> Comparison:
    """Largest absolute difference and the fraction of images whose top-1 class is the reference's.

    An image whose two best reference logits are within ``tie_tolerance`` counts as agreeing whichever
    of them the candidate picks: flipping a tie that close is within the tolerance being checked.
    """
    if reference.shape != candidate.shape:
        raise ValueError(f"logits of shape {candidate.shape} cannot be compared with {reference.shape}")
    if reference.size == 0:
        return Comparison(max_abs_diff=0.0, top1_agreement=1.0)
    scale = max(1.0, float(np.max(np.abs(reference))))
    diff = float(np.max(np.abs(reference.astype(np.float64) - candidate.astype(np.float64))))
    ref_top, cand_top = reference.argmax(axis=1), candidate.argmax(axis=1)
    rows = np.arange(len(reference))
    tie = reference[rows, ref_top] - reference[rows, cand_top] <= tie_tolerance
    agree = (ref_top == cand_top) | tie
    return Comparison(max_abs_diff=diff, top1_agreement=float(agree.mean()), reference_scale=scale)


def parity_failure(comparison: Comparison) -> str | None:
    """Why an fp32 export is not faithful to PyTorch, or None when it is."""
    problems = []
    # Relative to the logits' magnitude: a deep network whose logits reach the hundreds (ResNet50 early in
    # training) differs from PyTorch by fp32 reassociation alone more than 1e-3 in absolute terms.
    limit = PARITY_MAX_ABS_DIFF * comparison.reference_scale
    if not comparison.max_abs_diff <= limit:  # also catches NaN
        problems.append(f"max abs diff {comparison.max_abs_diff:.3g} > {limit:.3g}")
    if comparison.top1_agreement < PARITY_MIN_AGREEMENT:
        problems.append(f"top-1 agreement {comparison.top1_agreement:.2%} < {PARITY_MIN_AGREEMENT:.1%}")
    return "; ".join(problems) or None


def accuracy(logits: np.ndarray, labels: np.ndarray) -> float:
    """Top-1 accuracy (0-1)."""
    return float((logits.argmax(axis=1) == labels).mean()) if len(labels) else 0.0


def fixed_batch(images: np.ndarray, size: int) -> np.ndarray:
    """``size`` real images, repeating the set when it is smaller (latency does not depend on content)."""
    repeats = -(-size // len(images))
    return np.ascontiguousarray(np.concatenate([images] * repeats)[:size], dtype=np.float32)


def selection_threads() -> int:
    """Intra-op threads for timing variants when the caller does not say: a fixed small count, not "all
    cores", so the figures do not swing with how many cores other work leaves free."""
    return max(1, min(SELECTION_MAX_THREADS, os.cpu_count() or 1))


def interleaved_medians(runs: Mapping[str, Callable[[], object]], *, repeats: int, warmup: int = 2) -> dict[str, float]:
    """Median wall time in milliseconds of each callable, timed round-robin (a, b, c, a, b, c, ...) after
    ``warmup`` untimed rounds: a slow spell of the machine lands on every candidate, not on one."""
    for _ in range(warmup):
        for run in runs.values():
            run()
    times: dict[str, list[float]] = {name: [] for name in runs}
    for _ in range(max(1, repeats)):
        for name, run in runs.items():
            start = time.perf_counter()
            run()
            times[name].append((time.perf_counter() - start) * 1000)
    return {name: statistics.median(values) for name, values in times.items()}


def median_latency_ms(session: ort.InferenceSession, batch: np.ndarray, *, repeats: int, warmup: int = 2) -> float:
    """Median wall time of one run on ``batch`` in milliseconds, after ``warmup`` untimed runs."""
    run = functools.partial(session.run, [export.OUTPUT_NAME], {export.INPUT_NAME: batch})
    return interleaved_medians({"session": run}, repeats=repeats, warmup=warmup)["session"]


def interleaved_latency_ms(
    sessions: Mapping[str, ort.InferenceSession], batch: np.ndarray, *, repeats: int
) -> dict[str, float]:
    """Median latency of each session on ``batch``, timed round-robin (``interleaved_medians``)."""
    feed = {export.INPUT_NAME: batch}
    runs = {name: functools.partial(session.run, [export.OUTPUT_NAME], feed) for name, session in sessions.items()}
    return interleaved_medians(runs, repeats=repeats)


def save_optimized(src: Path, dst: Path, *, provider: str = CPU) -> Path:
    """onnxruntime's offline-optimised graph of ``src`` at ORT_ENABLE_EXTENDED: fusions (QDQ into
    QLinearConv, Conv+activation, ...) done once instead of at every server start. Not LAYOUT or ALL, whose
    graphs are tied to the CPU features (AVX2, AVX-512) of the machine that saved them."""
    open_session(src, provider=provider, level=ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED, optimized_path=dst)
    log.info("measure: wrote the optimised graph %s", dst)
    return dst
