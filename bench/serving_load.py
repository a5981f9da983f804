"""Closed-loop load test of `kiln serve`: batching on/off, JSON vs binary tensors, fp32 vs int8-static, against
in-process onnxruntime and PyTorch eager behind the same HTTP stack (and KServe's server when it is installed).

Each client keeps one request in flight on its own keep-alive connection (closed loop) for a fixed time;
throughput counts items (images), latency is per request. Servers run as separate processes so the client
does not share their interpreter. The bench may import torch; kiln_serving never does.

    python bench/serving_load.py --quick            # ~2 s per cell
    python bench/serving_load.py --model-dir DIR    # a trainer output folder instead of the built-in CNN
"""

import argparse
import asyncio
import contextlib
import importlib.util
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    from torch import nn

REPO = Path(__file__).resolve().parents[1]
for root in (REPO, REPO / "serving"):
    if str(root) not in sys.path:
        sys.path.insert(0, str(root))

from kiln import api  # noqa: E402
from kiln.api import constants  # noqa: E402
from kiln_serving.config import cpu_quota  # noqa: E402

IMAGE = 32
CLASSES = 10
KSERVE_PYTHON = Path(os.environ.get("KILN_BENCH_KSERVE_PYTHON", "/tmp/kserve-venv/bin/python"))


@dataclass
class Result:
    name: str
    concurrency: int
    batch: int
    seconds: float
    latencies: list[float]
    errors: int
    # CPU time the server (or this process, in-process) used: robust to other load on the machine.
    cpu_seconds: float

    @property
    def items_per_second(self) -> float:
        return len(self.latencies) * self.batch / self.seconds

    @property
    def cpu_ms_per_item(self) -> float:
        return 1000 * self.cpu_seconds / max(1, len(self.latencies) * self.batch)

    def row(self) -> str:
        lat = np.asarray(self.latencies or [float("nan")]) * 1000
        return (
            f"| {self.name} | {self.concurrency} | {self.batch} | {len(self.latencies) / self.seconds:,.0f} | "
            f"{self.items_per_second:,.0f} | {np.percentile(lat, 50):.2f} | {np.percentile(lat, 99):.2f} | "
            f"{self.cpu_ms_per_item:.3f} | {self.errors} |"
        )


# -- models -----------------------------------------------------------------------------------------------------


def small_cnn() -> "nn.Module":
    """The trainer's small-cnn topology (conv-BN-ReLU-pool x3, width 32), rebuilt here with seeded weights."""
    import torch
    from torch import nn

    torch.manual_seed(0)
    layers: list[nn.Module] = []
    channels = 3
    for out in (32, 64, 128):
        layers += [nn.Conv2d(channels, out, 3, padding=1, bias=False), nn.BatchNorm2d(out), nn.ReLU(), nn.MaxPool2d(2)]
        channels = out
    return nn.Sequential(*layers, nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(channels, CLASSES)).eval()


def build_models(work: Path) -> tuple[Path, Path, Path]:
    """fp32 and int8-static folders holding a plain model.onnx, and the PyTorch weights."""
    import torch
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    net = small_cnn()
    weights = work / "small_cnn.pt"
    torch.save(net.state_dict(), weights)
    fp32 = work / "fp32" / constants.MODEL_FILE
    fp32.parent.mkdir(parents=True)
    torch.onnx.export(net, (torch.randn(2, 3, IMAGE, IMAGE),), str(fp32), input_names=["input"],
                      output_names=["logits"], dynamic_shapes={"input": {0: torch.export.Dim("batch", max=1024)}},
                      external_data=False, opset_version=18, verbose=False)  # fmt: skip

    class Calibration(CalibrationDataReader):  # type: ignore[misc]
        def __init__(self) -> None:
            rng = np.random.default_rng(0)
            self.batches = iter([{"input": rng.normal(size=(8, 3, IMAGE, IMAGE)).astype(np.float32)}
                                 for _ in range(8)])  # fmt: skip

        def get_next(self) -> dict[str, np.ndarray] | None:
            return next(self.batches, None)

    pre = work / "pre.onnx"
    quant_pre_process(str(fp32), str(pre))
    int8 = work / "int8-static" / constants.MODEL_FILE
    int8.parent.mkdir(parents=True)
    # U8S8 QDQ, per channel: the combination that fuses into QLinearConv on x86 (see the serving notes).
    quantize_static(str(pre), str(int8), Calibration(), quant_format=QuantFormat.QDQ, per_channel=True,
                    activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8)  # fmt: skip
    return fp32.parent, int8.parent, weights


def card_models(model_dir: Path, work: Path) -> tuple[Path, Path | None]:
    """fp32 and (when built) int8-static of a trainer's card, copied into plain folders."""
    card = api.ModelCard.read(model_dir / constants.MODEL_CARD_FILE)
    out: list[Path | None] = []
    for variant in ("fp32", "int8-static"):
        try:
            source = model_dir / card.variant(variant).path
        except KeyError:
            out.append(None)
            continue
        target = work / variant / constants.MODEL_FILE
        target.parent.mkdir(parents=True)
        target.write_bytes(source.read_bytes())
        out.append(target.parent)
    assert out[0] is not None
    return out[0], out[1]


# -- servers ----------------------------------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def wait_ready(port: int, process: subprocess.Popen[bytes], path: str = "/v2/health/ready") -> None:
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"server exited with {process.returncode}")
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), timeout=2) as s:
            s.sendall(f"GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n".encode())
            if s.recv(64).startswith(b"HTTP/1.1 200"):
                return
        time.sleep(0.2)
    raise RuntimeError("server not ready after 300 s")


@dataclass(frozen=True)
class Running:
    port: int
    pid: int


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process, all its threads, from /proc."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


@contextlib.contextmanager
def process(command: list[str], port: int, log: Path, ready_path: str = "/v2/health/ready") -> Iterator[Running]:
    extra = [os.environ["PYTHONPATH"]] if os.environ.get("PYTHONPATH") else []
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), str(REPO / "serving"), *extra])}
    with log.open("wb") as out:
        proc = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, env=env)
        try:
            wait_ready(port, proc, ready_path)
            yield Running(port, proc.pid)
        finally:
            proc.terminate()
            proc.wait(timeout=60)


def kiln_server(model_dir: Path, batching: bool, log: Path) -> contextlib.AbstractContextManager[Running]:
    port = free_port()
    command = [sys.executable, "-m", "kiln_serving", "--model-dir", str(model_dir), "--model-name", "m", "--host",
               "127.0.0.1", "--port", str(port), "--max-batch-size", "32", "--max-queue-delay-microseconds",
               "2000" if batching else "0", "--log-level", "warning"]  # fmt: skip
    return process(command, port, log)


def torch_server(model_dir: Path, weights: Path, log: Path) -> contextlib.AbstractContextManager[Running]:
    port = free_port()
    command = [sys.executable, __file__, "--serve-torch", str(weights), "--model-dir", str(model_dir), "--port",
               str(port)]  # fmt: skip
    return process(command, port, log)


def serve_torch(weights: Path, model_dir: Path, port: int) -> int:
    """PyTorch eager behind kiln's HTTP stack (same app, data plane and batcher; only the model differs)."""
    import torch

    import kiln_serving
    from kiln_serving.model import Model, TensorInfo

    class TorchModel(Model):
        def load(self) -> None:
            started = time.perf_counter()
            torch.set_num_threads(cpu_quota())
            self.net = small_cnn()
            self.net.load_state_dict(torch.load(weights, weights_only=True))
            self.inputs = [TensorInfo("input", "FP32", (-1, 3, IMAGE, IMAGE))]
            self.outputs = [TensorInfo("logits", "FP32", (-1, CLASSES))]
            self.predict({"input": np.zeros((32, 3, IMAGE, IMAGE), np.float32)})
            self.provider, self.platform = "torch-eager-cpu", "pytorch_eager"
            self.load_seconds, self.ready, self.reason = time.perf_counter() - started, True, None

        def predict(self, inputs):  # type: ignore[no-untyped-def]
            with torch.inference_mode():
                return {"logits": self.net(torch.from_numpy(np.asarray(inputs["input"]))).numpy()}

    config = kiln_serving.ServingConfig(model_dir=model_dir, host="127.0.0.1", port=port, max_batch_size=32,
                                        max_queue_delay_microseconds=2000)  # fmt: skip
    return kiln_serving.serve(config, model=TorchModel(name="m"))


KSERVE_SCRIPT = """
import sys, numpy as np, onnxruntime as ort, kserve
from kserve import InferOutput, InferResponse
class Onnx(kserve.Model):
    def __init__(self, name, path):
        super().__init__(name)
        self.session = ort.InferenceSession(path)
        self.ready = True
    def predict(self, payload, headers=None):
        y = self.session.run(None, {"input": payload.inputs[0].as_numpy()})[0]
        out = InferOutput(name="logits", shape=list(y.shape), datatype="FP32")
        out.set_data_from_numpy(y, binary_data=False)
        return InferResponse(model_name=self.name, infer_outputs=[out], response_id=payload.id or "0")
server = kserve.ModelServer(http_port=int(sys.argv[2]), enable_grpc=False, workers=1, enable_latency_logging=False)
server.start([Onnx("m", sys.argv[1])])
"""


def kserve_server(model: Path, work: Path) -> contextlib.AbstractContextManager[Running]:
    script = work / "kserve_onnx.py"
    script.write_text(KSERVE_SCRIPT)
    port = free_port()
    return process([str(KSERVE_PYTHON), str(script), str(model), str(port)], port, work / "kserve.log",
                   "/v2/models/m/ready")  # fmt: skip


# -- client -----------------------------------------------------------------------------------------------------


def infer_request(x: np.ndarray, binary: bool, model: str = "m") -> bytes:
    """A whole HTTP/1.1 request, built once and sent many times."""
    tensor: dict[str, object] = {"name": "input", "shape": list(x.shape), "datatype": "FP32"}
    if binary:
        raw = x.astype("<f4").tobytes()
        tensor["parameters"] = {"binary_data_size": len(raw)}
        head = json.dumps({"inputs": [tensor], "outputs": [{"name": "logits", "parameters": {"binary_data": True}}]})
        body = head.encode() + raw
        extra = f"Content-Type: application/octet-stream\r\nInference-Header-Content-Length: {len(head.encode())}\r\n"
    else:
        tensor["data"] = x.reshape(-1).tolist()
        body, extra = json.dumps({"inputs": [tensor]}).encode(), "Content-Type: application/json\r\n"
    start = (f"POST /v2/models/{model}/infer HTTP/1.1\r\nHost: bench\r\n{extra}"
             f"Content-Length: {len(body)}\r\n\r\n")  # fmt: skip
    return start.encode() + body


async def _client(port: int, request: bytes, until: float, latencies: list[float], errors: list[int]) -> None:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        while time.perf_counter() < until:
            started = time.perf_counter()
            writer.write(request)
            head = await reader.readuntil(b"\r\n\r\n")
            length = next(int(line.split(b":")[1]) for line in head.split(b"\r\n")
                          if line.lower().startswith(b"content-length:"))  # fmt: skip
            await reader.readexactly(length)
            if head.startswith(b"HTTP/1.1 200"):
                latencies.append(time.perf_counter() - started)
            else:
                errors.append(1)
    finally:
        writer.close()


def closed_loop(name: str, server: Running, request: bytes, concurrency: int, batch: int, seconds: float) -> Result:
    port = server.port

    async def run() -> Result:
        warm: list[float] = []
        await asyncio.gather(*[_client(port, request, time.perf_counter() + min(0.5, seconds / 4), warm, [])
                               for _ in range(concurrency)])  # fmt: skip
        latencies: list[float] = []
        errors: list[int] = []
        cpu = cpu_seconds(server.pid)
        started = time.perf_counter()
        await asyncio.gather(*[_client(port, request, started + seconds, latencies, errors)
                               for _ in range(concurrency)])  # fmt: skip
        elapsed = time.perf_counter() - started
        return Result(name, concurrency, batch, elapsed, latencies, len(errors), cpu_seconds(server.pid) - cpu)

    return asyncio.run(run())


def in_process(name: str, model: Path, batch: int, seconds: float) -> Result:
    """onnxruntime in this process, one call after another, session set up as the server sets it up."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.intra_op_num_threads, options.inter_op_num_threads = cpu_quota(), 1
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    session = ort.InferenceSession(str(model / constants.MODEL_FILE), options, providers=["CPUExecutionProvider"])
    x = np.random.default_rng(0).normal(size=(batch, 3, IMAGE, IMAGE)).astype(np.float32)
    for _ in range(5):
        session.run(None, {"input": x})
    latencies = []
    cpu = time.process_time()
    started = time.perf_counter()
    while time.perf_counter() - started < seconds:
        t = time.perf_counter()
        session.run(None, {"input": x})
        latencies.append(time.perf_counter() - t)
    return Result(name, 1, batch, time.perf_counter() - started, latencies, 0, time.process_time() - cpu)


# -- the matrix -------------------------------------------------------------------------------------------------


def main(quick: bool, model_dir: Path | None = None) -> str:
    """Run the whole comparison and return it as Markdown."""
    seconds = 2.0 if quick else 10.0
    levels = (1, 8, 32)
    one = np.random.default_rng(1).normal(size=(1, 3, IMAGE, IMAGE)).astype(np.float32)
    many = np.random.default_rng(2).normal(size=(32, 3, IMAGE, IMAGE)).astype(np.float32)
    results: list[Result] = []
    fast = all(importlib.util.find_spec(m) is not None for m in ("httptools", "uvloop"))
    notes = [f"HTTP stack: uvicorn with {'httptools + uvloop' if fast else 'h11 + asyncio (pure Python)'}."]
    with tempfile.TemporaryDirectory(prefix="kiln-bench-") as tmp:
        work = Path(tmp)
        if model_dir is None:
            fp32, int8, weights = build_models(work)
            int8_dir: Path | None = int8
            weights_path: Path | None = weights
        else:
            fp32, int8_dir = card_models(model_dir, work)
            weights_path = None
            notes.append(f"Models from {model_dir}; PyTorch eager skipped (a card folder has no PyTorch model).")

        cells: list[tuple[str, contextlib.AbstractContextManager[Running], bool]] = [
            ("kiln fp32, binary, batching on", kiln_server(fp32, True, work / "a.log"), True),
            ("kiln fp32, binary, batching off", kiln_server(fp32, False, work / "b.log"), True),
            ("kiln fp32, JSON, batching on", kiln_server(fp32, True, work / "c.log"), False),
        ]
        if int8_dir is not None:
            cells.append(("kiln int8-static, binary, batching on", kiln_server(int8_dir, True, work / "d.log"), True))
        if weights_path is not None:
            cells.append(("PyTorch eager fp32 (kiln HTTP), binary, batching on",
                          torch_server(fp32, weights_path, work / "e.log"), True))  # fmt: skip
        if KSERVE_PYTHON.exists():
            kserve = kserve_server(fp32 / constants.MODEL_FILE, work)
            cells.append(("KServe 0.21 ModelServer + onnxruntime fp32, binary, no batching", kserve, True))
        else:
            notes.append(f"KServe peer not run: no KServe virtualenv at {KSERVE_PYTHON}.")
        for name, server, binary in cells:
            try:
                with server as running:
                    for c in levels:
                        results.append(closed_loop(name, running, infer_request(one, binary), c, 1, seconds))
                    if name == "kiln fp32, binary, batching off":
                        # In-process right before and after the served batch-32 cells: the same moment's machine.
                        results.append(in_process("in-process onnxruntime fp32", fp32, 32, seconds / 2))
                        for c in (1, 4):
                            results.append(closed_loop(name, running, infer_request(many, True), c, 32, seconds))
                        results.append(in_process("in-process onnxruntime fp32", fp32, 32, seconds / 2))
            except RuntimeError as err:
                notes.append(f"{name}: not run ({err}).")
        results.append(in_process("in-process onnxruntime fp32", fp32, 1, seconds))
        if int8_dir is not None:
            results.append(in_process("in-process onnxruntime int8-static", int8_dir, 1, seconds))
            results.append(in_process("in-process onnxruntime int8-static", int8_dir, 32, seconds))
    return report(results, notes, seconds)


def report(results: list[Result], notes: list[str], seconds: float) -> str:
    def find(prefix: str, c: int, batch: int = 1) -> Result | None:
        """The cell, or several runs of it pooled into one."""
        hits = [r for r in results if r.name.startswith(prefix) and r.concurrency == c and r.batch == batch]
        if not hits:
            return None
        return Result(hits[0].name, c, batch, sum(r.seconds for r in hits), [x for r in hits for x in r.latencies],
                      sum(r.errors for r in hits), sum(r.cpu_seconds for r in hits))  # fmt: skip

    load = ", ".join(f"{x:.1f}" for x in os.getloadavg())
    lines = [
        "## kiln serve load test",
        "",
        f"Closed loop, {seconds:.0f} s per cell after a warm-up, CPU only, {cpu_quota()} CPU(s) shared by server and "
        f"client (load average at the end: {load}); model: the trainer's small-cnn topology (3x32x32 input, 10 "
        "classes). Batch = images per request. Server CPU ms/item is the server process's CPU time per image: "
        "unlike throughput it hardly moves when other work shares the machine.",
        "",
        "| server | concurrency | batch | requests/s | items/s | p50 ms | p99 ms | server CPU ms/item | errors |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
        *[r.row() for r in results],
        "",
        "### Goals (throughput, and the same comparison in CPU time per item)",
        "",
    ]

    def goal(text: str, fast: Result | None, slow: Result | None, target: float, overhead: bool = False) -> None:
        if fast is None or slow is None:
            lines.append(f"- {text}: not measured")
            return
        if overhead:  # fast = in-process, slow = served: how much the HTTP stack costs
            value, cpu = (
                1 - slow.items_per_second / fast.items_per_second,
                slow.cpu_ms_per_item / fast.cpu_ms_per_item - 1,
            )
            verdict = "met" if value <= target else "NOT met"
            lines.append(
                f"- {text}: throughput **{value:+.0%}** (goal ≤ {target:.0%}) {verdict}; CPU per item {cpu:+.0%}"
            )
            return
        value, cpu = fast.items_per_second / slow.items_per_second, slow.cpu_ms_per_item / fast.cpu_ms_per_item
        verdict = "" if not target else f" (goal ≥ {target:g}x) {'met' if value >= target else 'NOT met'}"
        lines.append(f"- {text}: throughput **{value:.2f}x**{verdict}; CPU per item {cpu:.2f}x")

    goal("served int8-static vs PyTorch eager fp32, concurrency 32", find("kiln int8-static", 32),
         find("PyTorch eager", 32), 3.0)  # fmt: skip
    local = find("in-process onnxruntime fp32", 1, 32)
    for c in (1, 4):
        goal(f"HTTP overhead vs in-process at batch 32 (served at concurrency {c})", local,
             find("kiln fp32, binary, batching off", c, 32), 0.10, overhead=True)  # fmt: skip
    goal("batching on vs off, concurrency 32", find("kiln fp32, binary, batching on", 32),
         find("kiln fp32, binary, batching off", 32), 2.0)  # fmt: skip
    goal("binary vs JSON tensors, concurrency 32 (no goal)", find("kiln fp32, binary, batching on", 32),
         find("kiln fp32, JSON, batching on", 32), 0.0)  # fmt: skip
    goal("kiln vs KServe (both fp32, binary, batching off), concurrency 32 (no goal)",
         find("kiln fp32, binary, batching off", 32), find("KServe", 32), 0.0)  # fmt: skip
    if notes:
        lines += ["", "### Notes", "", *[f"- {n}" for n in notes]]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="2 s per cell instead of 10 s")
    parser.add_argument("--model-dir", type=Path, help="a trainer output folder with model-card.json")
    parser.add_argument("--serve-torch", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--port", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve_torch is not None:
        raise SystemExit(serve_torch(args.serve_torch, args.model_dir, args.port))
    markdown = main(args.quick, args.model_dir)
    out = REPO / "bench" / "results" / "serving_load.md"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(markdown)
    print(markdown)
