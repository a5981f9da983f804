"""Latency of the compiled variants against PyTorch eager: resnet18 and small-cnn at 32x32 and 224x224,
batch 1 and 32, median milliseconds and speed-up over PyTorch eager fp32, in one run.

Models are built by the trainer (random weights: latency does not depend on their values), exported,
quantized and timed with the compile step's own functions, so the numbers are those `auto` selection sees.
PyTorch and onnxruntime get the same number of threads. fp16 is timed only where onnxruntime has CUDA.
Goal: int8-static at least 2x faster than PyTorch eager at batch 32 on a CPU.

    python bench/compile_latency.py --quick     # 3 timed runs per cell instead of 10
    python bench/compile_latency.py --threads 1 # one core for both runtimes
"""

import argparse
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import onnxruntime as ort

REPO = Path(__file__).resolve().parents[1]
for root in (REPO, REPO / "trainer"):
    if str(root) not in sys.path:
        sys.path.insert(0, str(root))

import torch  # noqa: E402

from kiln import api  # noqa: E402
from kiln_trainer import export, measure, models, quantize  # noqa: E402

CASES = [("small-cnn", 32), ("small-cnn", 224), ("resnet18", 32), ("resnet18", 224)]
BATCHES = (1, 32)
CLASSES = 10
CALIBRATION_IMAGES = 32
GOAL = 2.0
# Untimed runs before timing (oneDNN and onnxruntime set up kernels per shape on the first runs).
WARMUP = 2


def _threads() -> int:
    """The cores this process may use."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


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


def _variants(
    arch: str, size: int, images: np.ndarray, folder: Path, gpu: bool
) -> tuple[torch.nn.Module, dict[str, tuple[Path, str]]]:
    """The model and its compiled variants: name -> (file, provider)."""
    spec = api.TrainingJobSpec.model_validate({"model": {"architecture": arch}, "data": {"imageSize": size}})
    torch.manual_seed(0)
    model = models.build_model(spec, CLASSES).eval()
    fp32 = export.export_onnx(model, images, folder / "fp32.onnx", opset=export.resolve_opset(None), metadata={}).path
    pre = quantize.preprocess(fp32, folder / "pre.onnx")
    settings = quantize.int8_settings()
    built = {
        "fp32": (fp32, measure.CPU),
        "int8-dynamic": (quantize.quantize_int8_dynamic(pre, folder / "dynamic.onnx", settings), measure.CPU),
        "int8-static": (
            quantize.quantize_int8_static(
                pre, folder / "static.onnx", images[:CALIBRATION_IMAGES], method="minmax", settings=settings
            ),
            measure.CPU,
        ),
    }
    if gpu:
        built["fp16 (GPU)"] = (quantize.convert_fp16(fp32, folder / "fp16.onnx"), measure.CUDA)
    return model, built


def _case(arch: str, size: int, repeats: int, threads: int, gpu: bool) -> tuple[list[str], float]:
    """Table rows (one per batch size) for one model at one input size, and int8-static's speed-up over
    PyTorch eager at batch 32."""
    images = np.random.default_rng(0).standard_normal((CALIBRATION_IMAGES, 3, size, size)).astype(np.float32)
    with tempfile.TemporaryDirectory(prefix="kiln-bench-") as tmp:
        model, built = _variants(arch, size, images, Path(tmp), gpu)
        sessions = {
            name: measure.open_session(path, provider=provider, threads=threads)
            for name, (path, provider) in built.items()
        }
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
            rows.append(f"| {arch} | {size}x{size} | {batch_size} | " + " | ".join(cells) + " |")
    return rows, goal_speedup


def main(quick: bool, threads: int | None = None) -> str:
    """Run every case; return a Markdown table of median ms and speed-up over PyTorch eager fp32.
    ``threads`` for both PyTorch and onnxruntime (default: every core this process may use)."""
    repeats, threads = (3 if quick else 10), threads or _threads()
    torch.set_num_threads(threads)
    gpu = measure.CUDA in ort.get_available_providers() and torch.cuda.is_available()
    columns = ["PyTorch eager fp32", "onnxruntime fp32", "int8-dynamic", "int8-static"] + (["fp16 (GPU)"] * gpu)
    settings = quantize.int8_settings()
    lines = [
        "## Compiled inference latency (median ms, speed-up over PyTorch eager fp32)",
        "",
        f"{_cpu_name()}, {threads} thread{'s' * (threads != 1)} for PyTorch and onnxruntime; "
        f"int8 {settings.note}; torch {torch.__version__}, onnxruntime {ort.__version__}; {repeats} timed runs per cell"
        f"{' (quick)' if quick else ''}.",
        "",
        "| model | input | batch | " + " | ".join(columns) + " |",
        "|---|---|---|" + "---|" * len(columns),
    ]
    verdicts = []
    for arch, size in CASES:
        rows, speedup = _case(arch, size, repeats, threads, gpu)
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
