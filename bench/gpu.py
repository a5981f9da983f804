"""GPU benchmarks: training images/s with and without AMP, compiled inference on CUDA (and TensorRT) providers,
and serving on the GPU — whatever this machine's packages allow, each missing piece named instead of failing.

- Training: resnet18 on scikit-learn's digits at 224x224 (in memory, so the GPU and not JPEG decoding is
  measured), kiln's train() against a plain loop in the tutorial's style on the same loader, each in fp32 and
  with AMP (bf16 autocast, kiln's `mixedPrecision: auto` on a GPU that supports it). The first epoch of every
  run is warm-up and left out.
- Compile: PyTorch eager on the GPU (fp32, fp16) against onnxruntime's CUDA provider (fp32 and kiln's fp16
  variant) and TensorRT (full mode only: engines take minutes to build); inputs start and end on the host for
  every runtime. onnxruntime on the CPU is the reference column.
- Serving: bench/gpu_serving.py.

With torch but without kiln's own dependencies (pydantic, ...), only a torch-only probe runs: resnet18 training
steps on synthetic data in fp32 and bf16, and eager latency in fp32 and fp16.

    python bench/run.py --quick --only gpu    # what bench/gpu.sh runs
    python bench/gpu.py --device cpu --quick  # smoke test of every code path on a machine without a GPU
"""

import argparse
import contextlib
import copy
import functools
import io
import logging
import os
import statistics
import tempfile
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

CLASSES = 10
TENSORRT, CUDA, CPU = "TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider"


def missing(*modules: str) -> list[str]:
    """Which of these modules cannot be imported here, each with the reason."""
    out = []
    for name in modules:
        try:
            __import__(name)
        except Exception as err:  # ImportError, or a broken install raising something else
            out.append(f"{name} ({type(err).__name__}: {str(err).splitlines()[0][:120] if str(err) else ''})")
    return out


def ort_providers() -> list[str]:
    try:
        import onnxruntime as ort
    except ImportError:
        return []
    return list(ort.get_available_providers())


def _ms(run: Callable[[], object], repeats: int, warmup: int) -> float:
    for _ in range(warmup):
        run()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        run()
        times.append((time.perf_counter() - start) * 1000)
    return statistics.median(times)


def _spread(values: list[float]) -> str:
    """median (min–max), the format every repeated number in the report uses."""
    if not values:
        return "n/a"
    return f"{statistics.median(values):,.0f} ({min(values):,.0f}–{max(values):,.0f})"


# -- training ---------------------------------------------------------------------------------------------------


def _training_spec(quick: bool, device: torch.device, precision: str) -> Any:
    from kiln import api

    gpu = device.type == "cuda"
    workers = min(8, max(1, (os.cpu_count() or 2) // 2))
    return api.TrainingJobSpec.model_validate({
        "model": {"architecture": "resnet18" if gpu else "small-cnn"},
        "data": {"dataset": "digits", "imageSize": 224 if gpu else 32, "numWorkers": workers,
                 **({} if gpu else {"maxSamples": 320})},
        "training": {"epochs": 2 if quick else 4, "batchSize": 128 if gpu else 32, "mixedPrecision": precision,
                     "optimizer": {"name": "adamw", "learningRate": 1e-3}, "scheduler": {"name": "none"}},
    })  # fmt: skip


def plain_loop(spec: Any, device: torch.device, amp: bool) -> list[float]:
    """The tutorial's loop moved to the device (channels_last and pinned, non-blocking copies as kiln does);
    training images per second of each epoch."""
    from kiln_trainer import data, models

    bundle = data.load_data(spec)
    torch.manual_seed(spec.training.seed)
    net = models.build_model(spec, bundle.num_classes).to(device)
    if device.type == "cuda":
        net = net.to(memory_format=torch.channels_last)
    criterion = torch.nn.CrossEntropyLoss()
    optimizer = torch.optim.AdamW(net.parameters(), lr=spec.training.optimizer.learning_rate)
    trainloader = data.build_loader(bundle.train, spec, train=True, pin_memory=device.type == "cuda")
    throughput = []
    for _ in range(spec.training.epochs):
        net.train()
        start, seen, running_loss = time.perf_counter(), 0, 0.0
        for inputs, labels in trainloader:
            inputs, labels = inputs.to(device, non_blocking=True), labels.to(device, non_blocking=True)
            optimizer.zero_grad()
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
                loss = criterion(net(inputs), labels)
            loss.backward()
            optimizer.step()
            running_loss += loss.item()
            seen += len(labels)
        throughput.append(seen / (time.perf_counter() - start))
    return throughput


def kiln_loop(spec: Any) -> list[float]:
    from kiln_trainer import loop

    with tempfile.TemporaryDirectory() as out, contextlib.redirect_stdout(io.StringIO()):
        result = loop.train(spec, Path(out), compile=False, log_format="json")
    return [h.samples_per_second for h in result.history]


def training_section(quick: bool, device: torch.device) -> list[str]:
    precisions = [("fp32", "none", False)] + ([("AMP bf16", "bf16", True)] if device.type == "cuda" else [])
    runs = 1 if quick else 2
    rows, ips = [], {}
    for label, precision, amp in precisions:
        spec = _training_spec(quick, device, precision)
        plain: list[float] = []
        kiln: list[float] = []
        for _ in range(runs):  # alternate, so drift on the machine touches both loops alike
            plain += plain_loop(spec, device, amp)[1:]
            kiln += kiln_loop(spec)[1:]
        ips[label] = (statistics.median(plain), statistics.median(kiln))
        overhead = ips[label][0] / ips[label][1] - 1
        rows.append(f"| {label} | {_spread(plain)} | {_spread(kiln)} | {overhead:+.1%} |")
    spec = _training_spec(quick, device, "none")
    lines = [
        f"### Training images/s on {device.type.upper()} (median, min–max over epochs after the first)",
        "",
        f"{spec.model.architecture} on digits {spec.data.image_size}x{spec.data.image_size}, batch "
        f"{spec.training.batch_size}, AdamW, {spec.data.num_workers} loader workers, {runs} run(s) x "
        f"{spec.training.epochs} epochs per loop and precision.",
        "",
        "| precision | plain loop | kiln train() | kiln overhead |",
        "|---|---:|---:|---:|",
        *rows,
    ]
    if "AMP bf16" in ips:
        lines += ["", f"AMP speed-up: plain {ips['AMP bf16'][0] / ips['fp32'][0]:.2f}x, "
                      f"kiln {ips['AMP bf16'][1] / ips['fp32'][1]:.2f}x."]  # fmt: skip
    else:
        lines += ["", "AMP not measured: kiln never uses mixed precision on a CPU."]
    return lines


# -- compiled inference -----------------------------------------------------------------------------------------


def _sessions(fp32: Path, fp16: Path, work: Path, quick: bool, threads: int) -> tuple[dict[str, Any], list[str]]:
    """onnxruntime sessions by column name, and notes on what could not be opened."""
    import onnxruntime as ort

    from kiln_trainer import measure

    available, notes = ort_providers(), []
    sessions = {f"onnxruntime CPU fp32 ({threads} threads)": measure.open_session(fp32, threads=threads)}
    if CUDA in available:
        for name, path in (("onnxruntime CUDA fp32", fp32), ("onnxruntime CUDA fp16", fp16)):
            try:
                sessions[name] = measure.open_session(path, provider=CUDA)
            except Exception as err:
                notes.append(f"{name}: {str(err).splitlines()[0][:200]}")
    if TENSORRT in available and not quick:
        options = {"trt_fp16_enable": "True", "trt_engine_cache_enable": "True", "trt_engine_cache_path": str(work)}
        try:
            session = ort.InferenceSession(str(fp32), providers=[(TENSORRT, options), CUDA, CPU])
            if session.get_providers()[0] == TENSORRT:
                sessions["onnxruntime TensorRT fp16"] = session
            else:
                notes.append(f"TensorRT did not start (got {session.get_providers()})")
        except Exception as err:
            notes.append(f"TensorRT: {str(err).splitlines()[0][:200]}")
    return sessions, notes


def _eager(net: torch.nn.Module, host: torch.Tensor, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    out: torch.Tensor = net(host.to(device, dtype)).float().cpu()
    return out


def compile_section(quick: bool, device: torch.device) -> list[str]:
    from kiln import api
    from kiln_trainer import export, measure, models, quantize

    gpu = device.type == "cuda"
    cases = [("small-cnn", 32), ("resnet18", 224)] if quick else [
        ("small-cnn", 32), ("small-cnn", 224), ("resnet18", 32), ("resnet18", 224)]  # fmt: skip
    repeats, warmup = (20, 5) if quick else (100, 10)
    threads = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    rows: list[str] = []
    columns: list[str] = []
    notes: set[str] = set()
    for arch, size in cases:
        spec = api.TrainingJobSpec.model_validate({"model": {"architecture": arch}, "data": {"imageSize": size}})
        torch.manual_seed(0)
        model = models.build_model(spec, CLASSES).eval()
        images = np.random.default_rng(0).standard_normal((8, 3, size, size)).astype(np.float32)
        with tempfile.TemporaryDirectory(prefix="kiln-bench-gpu-") as tmp:
            work = Path(tmp)
            fp32 = export.export_onnx(model, images, work / "fp32.onnx", opset=export.resolve_opset(None),
                                      metadata={}).path  # fmt: skip
            fp16 = quantize.convert_fp16(fp32, work / "fp16.onnx")
            sessions, session_notes = _sessions(fp32, fp16, work, quick, threads)
            notes.update(session_notes)
            eager = {f"PyTorch eager {device.type.upper()} fp32": (model.to(device), torch.float32)}
            if gpu:
                eager[f"PyTorch eager {device.type.upper()} fp16"] = (copy.deepcopy(model).half(), torch.float16)
            columns = list(eager) + list(sessions)
            for batch_size in (1, 32):
                batch = measure.fixed_batch(images, batch_size)
                host = torch.from_numpy(batch)
                cells = []
                with torch.inference_mode():
                    for net, dtype in eager.values():
                        # Host in, host out, as onnxruntime's run() is timed; .cpu() waits for the GPU.
                        cells.append(_ms(functools.partial(_eager, net, host, device, dtype), repeats, warmup))
                for session in sessions.values():
                    cells.append(measure.median_latency_ms(session, batch, repeats=repeats, warmup=warmup))
                base = cells[0]
                shown = [f"{cells[0]:.2f}"] + [f"{ms:.2f} ({base / ms:.1f}x)" for ms in cells[1:]]
                rows.append(f"| {arch} | {size}x{size} | {batch_size} | " + " | ".join(shown) + " |")
    if CUDA not in ort_providers():
        notes.add(f"onnxruntime here has no CUDA provider (providers: {', '.join(ort_providers())}): install "
                  "onnxruntime-gpu instead of onnxruntime for the CUDA and TensorRT columns.")  # fmt: skip
    if quick and TENSORRT in ort_providers():
        notes.add("TensorRT left out in quick mode (engine builds take minutes); run without --quick.")
    lines = [
        f"### Compiled inference on {device.type.upper()} (median ms of {repeats} runs; speed-up over the first "
        "column)",
        "",
        "Random weights (latency does not depend on them); batches start and end in host memory for every runtime.",
        "",
        "| model | input | batch | " + " | ".join(columns) + " |",
        "|---|---|---|" + "---|" * len(columns),
        *rows,
    ]
    return lines + (["", *[f"- {n}" for n in sorted(notes)]] if notes else [])


# -- without kiln's dependencies --------------------------------------------------------------------------------


def torch_only_section(quick: bool, device: torch.device) -> list[str]:
    """resnet18 (torchvision) on synthetic tensors already on the device: what the GPU does, no loader."""
    import torchvision

    size, batch, steps = (224, 128, 10 if quick else 30) if device.type == "cuda" else (32, 16, 3)
    net = torchvision.models.resnet18(num_classes=CLASSES).to(device).to(memory_format=torch.channels_last)
    x = torch.randn(batch, 3, size, size, device=device).to(memory_format=torch.channels_last)
    y = torch.randint(0, CLASSES, (batch,), device=device)
    optimizer = torch.optim.AdamW(net.parameters(), lr=1e-3)
    lines = ["### torch-only probe (kiln's dependencies missing)", "",
             f"torchvision resnet18, {size}x{size}, batch {batch}, synthetic data on the device.", "",
             "| measure | fp32 | bf16 autocast |", "|---|---:|---:|"]  # fmt: skip

    def step(amp: bool) -> None:
        optimizer.zero_grad()
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
            loss = torch.nn.functional.cross_entropy(net(x), y)
        loss.backward()  # type: ignore[no-untyped-call]
        optimizer.step()
        loss.item()

    ips = [batch / (_ms(functools.partial(step, amp), steps, 3) / 1000) for amp in (False, True)]
    lines.append(f"| training images/s | {ips[0]:,.0f} | {ips[1]:,.0f} |")
    net.eval()
    for b in (1, 32):
        host = torch.randn(b, 3, size, size)

        def forward(amp: bool, host: torch.Tensor = host) -> torch.Tensor:
            with torch.inference_mode(), torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
                out: torch.Tensor = net(host.to(device)).float().cpu()
            return out

        ms = [_ms(functools.partial(forward, amp), 20, 5) for amp in (False, True)]
        lines.append(f"| inference ms, batch {b} (host in/out) | {ms[0]:.2f} | {ms[1]:.2f} |")
    return lines


# -- main -------------------------------------------------------------------------------------------------------


def environment(device: torch.device) -> list[str]:
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU (smoke test)"
    return [
        f"Device: {name}; torch {torch.__version__} (CUDA {torch.version.cuda}), onnxruntime providers: "
        f"{', '.join(ort_providers()) or 'onnxruntime missing'}.",
    ]


def main(quick: bool, device_name: str | None = None) -> str:
    """Every GPU section this machine can run, as Markdown; on a machine without CUDA, a one-line note."""
    if device_name is None and not torch.cuda.is_available():
        return "Not run: torch sees no CUDA device here.\n"
    device = torch.device(device_name or "cuda")
    logging.disable(logging.WARNING)
    # onnxconverter-common warns once per weight it rounds to fp16 (hundreds of lines for resnet18).
    warnings.filterwarnings("ignore", category=UserWarning, module="onnxconverter_common")
    lines = environment(device)
    kiln_missing = missing("pydantic", "kiln.api", "onnx", "onnxscript", "onnxruntime", "kiln_trainer.loop",
                           "kiln_trainer.quantize")  # fmt: skip
    sections: list[tuple[str, Callable[[], list[str]]]] = []
    if kiln_missing:
        lines += ["", f"kiln cannot run here: missing {'; '.join(kiln_missing)} (carry their wheels in .whl/)."]
        sections.append(("torch-only probe", lambda: torch_only_section(quick, device)))
    else:
        sections += [("training", lambda: training_section(quick, device)),
                     ("compile", lambda: compile_section(quick, device))]  # fmt: skip
        serving_missing = missing("starlette", "uvicorn", "multipart", "kiln_serving.app")
        if serving_missing:
            lines += ["", f"Serving not measured: missing {'; '.join(serving_missing)}."]
        else:
            import gpu_serving

            sections.append(("serving", lambda: gpu_serving.section(quick, device.type)))
    for name, run in sections:
        began = time.monotonic()
        try:
            body = run()
        except Exception as err:  # one section failing leaves the others' numbers
            logging.disable(logging.NOTSET)
            logging.getLogger("bench.gpu").exception("%s section failed", name)
            logging.disable(logging.WARNING)
            body = [f"### {name}", "", f"**Not measured**: {type(err).__name__}: {str(err).splitlines()[0][:300]}"]
        lines += ["", *body, "", f"({name}: {time.monotonic() - began:.0f} s)"]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--quick", action="store_true", help="fewer epochs and runs; no TensorRT")
    parser.add_argument("--device", help="torch device to use (default: cuda); `cpu` smoke-tests the code paths")
    args = parser.parse_args()
    print(main(args.quick, args.device))
