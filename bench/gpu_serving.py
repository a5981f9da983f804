"""Serving on the GPU: `kiln serve` on onnxruntime's CUDA provider (batching on and off) against PyTorch eager on
the GPU behind the same HTTP stack, with `kiln serve` on this machine's CPUs as the reference; closed loop at
concurrency 1/8/32 with one image per request, plus 32-image requests one at a time against the same runtime
called in-process (the HTTP overhead at batch 32).

Self-contained (its own small client and servers) so it does not follow bench/serving_load.py's internals.
The model is kiln's small-cnn (3x32x32, 10 classes, random weights) exported by the trainer's own export.

    python bench/gpu_serving.py --quick                 # needs a GPU
    python bench/gpu_serving.py --quick --device cpu    # smoke test of every code path
"""

import argparse
import asyncio
import contextlib
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path

import loadclient
import numpy as np
from serving_setup import free_port

REPO = Path(__file__).resolve().parents[1]

IMAGE, CLASSES, MODEL = 32, 10, "m"
CUDA = "CUDAExecutionProvider"


def build(work: Path) -> tuple[Path, Path]:
    """A folder holding small-cnn's model.onnx, and its PyTorch weights."""
    import torch

    from kiln import api
    from kiln.api import constants
    from kiln_trainer import export, models

    spec = api.TrainingJobSpec.model_validate({"model": {"architecture": "small-cnn"}, "data": {"imageSize": IMAGE}})
    torch.manual_seed(0)
    net = models.build_model(spec, CLASSES).eval()
    weights = work / "small_cnn.pt"
    torch.save(net.state_dict(), weights)
    folder = work / "fp32"
    images = np.random.default_rng(0).standard_normal((4, 3, IMAGE, IMAGE)).astype(np.float32)
    export.export_onnx(net, images, folder / constants.MODEL_FILE, opset=export.resolve_opset(None), metadata={})
    return folder, weights


# -- servers ----------------------------------------------------------------------------------------------------


def _readiness(port: int) -> tuple[bool, str | None]:
    """(ready, why it never will be): a server whose model failed to load (its provider missing, say) answers
    503 with a reason other than "loading", and waiting longer cannot help."""
    with contextlib.suppress(OSError, ValueError), socket.create_connection(("127.0.0.1", port), timeout=2) as s:
        s.sendall(b"GET /v2/health/ready HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        reply = b""
        while chunk := s.recv(65536):
            reply += chunk
        if reply.startswith(b"HTTP/1.1 200"):
            return True, None
        error = json.loads(reply.partition(b"\r\n\r\n")[2] or b"{}").get("error")
        return False, error if error and error != "loading" else None
    return False, None


@contextlib.contextmanager
def server(argv: list[str], log: Path, started: list[subprocess.Popen[bytes]] | None = None) -> Iterator[int]:
    """Start a server whose argv ends in `--port`, wait until ready, yield its port, stop it; the process is
    appended to ``started`` for callers that look at it."""
    port = free_port()
    paths = [str(REPO), str(REPO / "trainer"), str(REPO / "serving"), os.environ.get("PYTHONPATH", "")]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in paths if p)}
    with log.open("wb") as out:
        proc = subprocess.Popen([*argv, str(port)], stdout=out, stderr=subprocess.STDOUT, env=env)
        if started is not None:
            started.append(proc)
        try:
            deadline = time.monotonic() + 300
            while not (state := _readiness(port))[0]:
                if state[1] is not None:
                    raise RuntimeError(f"the model cannot be served: {state[1][:300]}")
                if proc.poll() is not None or time.monotonic() > deadline:
                    tail = log.read_text(errors="replace").strip().splitlines()[-3:]
                    raise RuntimeError(f"server did not become ready: {' / '.join(tail)}")
                time.sleep(0.2)
            yield port
        finally:
            proc.terminate()
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


def kiln_argv(model_dir: Path, batching: bool, provider: str) -> list[str]:
    return [sys.executable, "-m", "kiln_serving", "--model-dir", str(model_dir), "--model-name", MODEL,
            "--host", "127.0.0.1", "--max-batch-size", "32", "--max-queue-delay-microseconds",
            "2000" if batching else "0", "--providers", provider, "--log-level", "warning", "--port"]  # fmt: skip


def torch_argv(model_dir: Path, weights: Path, device: str) -> list[str]:
    return [sys.executable, str(Path(__file__).resolve()), "--serve-torch", str(weights), "--model-dir",
            str(model_dir), "--device", device, "--port"]  # fmt: skip


def serve_torch(weights: Path, model_dir: Path, device_name: str, port: int) -> int:
    """PyTorch eager on `device_name` behind kiln's HTTP stack (same app, data plane and batcher)."""
    import torch

    import kiln_serving
    from kiln import api
    from kiln_serving.model import Model, TensorInfo
    from kiln_trainer import models

    device = torch.device(device_name)
    spec = api.TrainingJobSpec.model_validate({"model": {"architecture": "small-cnn"}, "data": {"imageSize": IMAGE}})

    class TorchModel(Model):
        def load(self) -> None:
            started = time.perf_counter()
            self.net = models.build_model(spec, CLASSES)
            self.net.load_state_dict(torch.load(weights, weights_only=True))
            self.net = self.net.to(device).eval()
            self.inputs = [TensorInfo("input", "FP32", (-1, 3, IMAGE, IMAGE))]
            self.outputs = [TensorInfo("logits", "FP32", (-1, CLASSES))]
            self.predict({"input": np.zeros((32, 3, IMAGE, IMAGE), np.float32)})
            self.provider, self.platform = f"torch-eager-{device.type}", "pytorch_eager"
            self.load_seconds, self.ready, self.reason = time.perf_counter() - started, True, None

        def predict(self, inputs: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
            with torch.inference_mode():
                x = torch.from_numpy(np.asarray(inputs["input"])).to(device)
                return {"logits": self.net(x).cpu().numpy()}

    config = kiln_serving.ServingConfig(model_dir=model_dir, host="127.0.0.1", port=port, max_batch_size=32,
                                        max_queue_delay_microseconds=2000)  # fmt: skip
    return kiln_serving.serve(config, model=TorchModel(name=MODEL))


# -- client -----------------------------------------------------------------------------------------------------


def request(x: np.ndarray) -> bytes:
    """One whole HTTP/1.1 infer request with a binary tensor, built once and sent many times."""
    raw = x.astype("<f4").tobytes()
    head = json.dumps({
        "inputs": [{"name": "input", "shape": list(x.shape), "datatype": "FP32",
                    "parameters": {"binary_data_size": len(raw)}}],
        "outputs": [{"name": "logits", "parameters": {"binary_data": True}}],
    }).encode()  # fmt: skip
    start = (
        f"POST /v2/models/{MODEL}/infer HTTP/1.1\r\nHost: bench\r\nContent-Type: application/octet-stream\r\n"
        f"Inference-Header-Content-Length: {len(head)}\r\nContent-Length: {len(head) + len(raw)}\r\n\r\n"
    )
    return start.encode() + head + raw


def closed_loop(port: int, payload: bytes, concurrency: int, seconds: float) -> tuple[float, list[float], int]:
    """(seconds measured, per-request latencies, errors) after a short warm-up at the same concurrency."""

    async def run() -> tuple[float, list[float], int]:
        warm = time.perf_counter() + min(1.0, seconds / 3)
        await asyncio.gather(*[loadclient.client(port, payload, warm, [], []) for _ in range(concurrency)])
        latencies: list[float] = []
        errors: list[int] = []
        began = time.perf_counter()
        await asyncio.gather(
            *[loadclient.client(port, payload, began + seconds, latencies, errors) for _ in range(concurrency)]
        )
        return time.perf_counter() - began, latencies, len(errors)

    return asyncio.run(run())


def in_process(model_dir: Path, provider: str, batch: np.ndarray, seconds: float) -> tuple[float, list[float], int]:
    """The same onnxruntime model called in this process, one call after another."""
    import onnxruntime as ort

    from kiln.api import constants

    session = ort.InferenceSession(str(model_dir / constants.MODEL_FILE), providers=[provider])
    run: Callable[[], object] = lambda: session.run(None, {"input": batch})  # noqa: E731
    for _ in range(20):
        run()
    latencies: list[float] = []
    began = time.perf_counter()
    while time.perf_counter() - began < seconds:
        t = time.perf_counter()
        run()
        latencies.append(time.perf_counter() - t)
    return time.perf_counter() - began, latencies, 0


def _row(name: str, concurrency: int, batch: int, measured: tuple[float, list[float], int]) -> tuple[str, float]:
    seconds, latencies, errors = measured
    ms = np.asarray(latencies or [float("nan")]) * 1000
    items = len(latencies) * batch / seconds
    return (f"| {name} | {concurrency} | {batch} | {items:,.0f} | {np.percentile(ms, 50):.2f} | "
            f"{np.percentile(ms, 99):.2f} | {errors} |", items)  # fmt: skip


def section(quick: bool, device: str) -> list[str]:
    """The serving table on `device` (cuda, or cpu for a smoke test), as Markdown lines."""
    import onnxruntime as ort

    seconds = 3.0 if quick else 10.0
    one = np.random.default_rng(1).standard_normal((1, 3, IMAGE, IMAGE)).astype(np.float32)
    many = np.random.default_rng(2).standard_normal((32, 3, IMAGE, IMAGE)).astype(np.float32)
    cuda = device == "cuda" and CUDA in ort.get_available_providers()
    rows: list[str] = []
    notes: list[str] = []
    items: dict[tuple[str, int, int], float] = {}
    with tempfile.TemporaryDirectory(prefix="kiln-bench-gpu-serving-") as tmp:
        work = Path(tmp)
        model_dir, weights = build(work)
        cells: list[tuple[str, list[str]]] = []
        if cuda:
            cells += [("kiln serve, onnxruntime CUDA, batching on", kiln_argv(model_dir, True, "cuda")),
                      ("kiln serve, onnxruntime CUDA, batching off", kiln_argv(model_dir, False, "cuda"))]  # fmt: skip
        else:
            notes.append(f"kiln serve on the GPU not run: onnxruntime has no {CUDA} here (install onnxruntime-gpu).")
        cells += [(f"PyTorch eager {device.upper()} (kiln HTTP), batching on", torch_argv(model_dir, weights, device)),
                  ("kiln serve, onnxruntime CPU, batching on", kiln_argv(model_dir, True, "cpu"))]  # fmt: skip
        for number, (name, argv) in enumerate(cells):
            try:
                with server(argv, work / f"server-{number}.log") as port:
                    for concurrency in (1, 8, 32):
                        row, items[(name, concurrency, 1)] = _row(
                            name, concurrency, 1, closed_loop(port, request(one), concurrency, seconds)
                        )
                        rows.append(row)
                    row, items[(name, 1, 32)] = _row(name, 1, 32, closed_loop(port, request(many), 1, seconds))
                    rows.append(row)
            except RuntimeError as err:
                notes.append(f"{name}: not run ({err}).")
        local = "CUDAExecutionProvider" if cuda else "CPUExecutionProvider"
        label = f"in-process onnxruntime {'CUDA' if cuda else 'CPU'} (no HTTP)"
        row, items[(label, 1, 32)] = _row(label, 1, 32, in_process(model_dir, local, many, seconds))
        rows.append(row)
    lines = [
        f"### Serving on {device.upper()} (closed loop, {seconds:.0f} s per cell; items = images)",
        "",
        "small-cnn 3x32x32, binary tensors. Batch = images per request.",
        "",
        "| server | concurrency | batch | items/s | p50 ms | p99 ms | errors |",
        "|---|---:|---:|---:|---:|---:|---:|",
        *rows,
        "",
    ]
    served = items.get(("kiln serve, onnxruntime CUDA, batching off" if cuda else
                        "kiln serve, onnxruntime CPU, batching on", 1, 32))  # fmt: skip
    local_items = items[(label, 1, 32)]
    if served:
        lines.append(f"- HTTP overhead at batch 32 (1 - served / in-process): {1 - served / local_items:.1%}")
    eager = items.get((f"PyTorch eager {device.upper()} (kiln HTTP), batching on", 32, 1))
    onnx = items.get(("kiln serve, onnxruntime CUDA, batching on", 32, 1))
    if eager and onnx:
        lines.append(
            f"- kiln serve (onnxruntime CUDA) / PyTorch eager on the GPU at concurrency 32: {onnx / eager:.2f}x"
        )
    return lines + [f"- {n}" for n in notes]


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--quick", action="store_true", help="3 s per cell instead of 10 s")
    parser.add_argument("--device", default="cuda", help="cuda (default), or cpu for a smoke test")
    parser.add_argument("--serve-torch", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--model-dir", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--port", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve_torch is not None:
        raise SystemExit(serve_torch(args.serve_torch, args.model_dir, args.device, args.port))
    print("\n".join(section(args.quick, args.device)))
