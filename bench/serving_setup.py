"""What bench/serving_load.py measures with: the models, the servers it starts as separate processes, and the
closed-loop HTTP client (plus onnxruntime in-process) that produces one `Result` per cell.

The bench may import torch; kiln_serving never does.
"""

import asyncio
import contextlib
import json
import os
import socket
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import grpcclient
import loadclient
import numpy as np
from machine import tree_cpu_seconds

from kiln import api
from kiln.api import constants
from kiln_serving.config import cpu_quota

if TYPE_CHECKING:
    from torch import nn

REPO = Path(__file__).resolve().parents[1]

IMAGE = 32
CLASSES = 10


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


def pooled(runs: list[Result]) -> Result:
    """Several runs of one cell (same name, concurrency and batch) as one: time, requests and CPU added up."""
    first = runs[0]
    return Result(
        first.name,
        first.concurrency,
        first.batch,
        sum(r.seconds for r in runs),
        [x for r in runs for x in r.latencies],
        sum(r.errors for r in runs),
        sum(r.cpu_seconds for r in runs),
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
    grpc_port: int | None = None


@contextlib.contextmanager
def process(
    command: list[str], port: int, log: Path, ready_path: str = "/v2/health/ready", grpc_port: int | None = None
) -> Iterator[Running]:
    extra = [os.environ["PYTHONPATH"]] if os.environ.get("PYTHONPATH") else []
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), str(REPO / "serving"), *extra])}
    with log.open("wb") as out:
        proc = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, env=env)
        try:
            wait_ready(port, proc, ready_path)
            yield Running(port, proc.pid, grpc_port)
        finally:
            proc.terminate()
            proc.wait(timeout=60)


def kiln_server(model_dir: Path, batching: bool, log: Path) -> contextlib.AbstractContextManager[Running]:
    port, grpc_port = free_port(), free_port()
    command = [sys.executable, "-m", "kiln_serving", "--model-dir", str(model_dir), "--model-name", "m", "--host",
               "127.0.0.1", "--port", str(port), "--grpc-port", str(grpc_port), "--max-batch-size", "32",
               "--max-queue-delay-microseconds", "2000" if batching else "0", "--log-level", "warning"]  # fmt: skip
    return process(command, port, log, grpc_port=grpc_port)


def torch_server(model_dir: Path, weights: Path, log: Path) -> contextlib.AbstractContextManager[Running]:
    port = free_port()
    # The script whose --serve-torch runs serve_torch below.
    command = [sys.executable, str(Path(__file__).with_name("serving_load.py")), "--serve-torch", str(weights),
               "--model-dir", str(model_dir), "--port", str(port)]  # fmt: skip
    return process(command, port, log)


def serve_torch(weights: Path, model_dir: Path, port: int) -> int:
    """PyTorch eager behind kiln's HTTP stack (same app, data plane and batcher; only the model differs)."""
    import torch

    import kiln_serving
    from kiln_serving import codec
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

        def predict(self, inputs: Mapping[str, codec.Array]) -> dict[str, codec.Array]:
            with torch.inference_mode():
                return {"logits": self.net(torch.from_numpy(np.asarray(inputs["input"]))).numpy()}

    config = kiln_serving.ServingConfig(model_dir=model_dir, host="127.0.0.1", port=port, max_batch_size=32,
                                        max_queue_delay_microseconds=2000)  # fmt: skip
    return kiln_serving.serve(config, model=TorchModel(name="m"))


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


def closed_loop(name: str, server: Running, request: bytes, concurrency: int, batch: int, seconds: float) -> Result:
    """`concurrency` HTTP/1.1 clients (loadclient.py) each sending `request` back to back for `seconds`."""
    return _measure(name, server.pid, server.port, loadclient.client, request, concurrency, batch, seconds)


def grpc_closed_loop(name: str, server: Running, x: np.ndarray, concurrency: int, seconds: float) -> Result:
    """Like closed_loop over gRPC (grpcclient.py): ModelInfer with raw_input_contents, as tritonclient sends it,
    serialized once and sent again and again, reading only each call's status (as the HTTP client does)."""
    from tritonclient.grpc import service_pb2 as pb

    request = pb.ModelInferRequest(model_name="m")
    request.inputs.add(name="input", datatype="FP32", shape=list(x.shape))
    request.raw_input_contents.append(x.astype("<f4").tobytes())
    call = grpcclient.call("/inference.GRPCInferenceService/ModelInfer", request.SerializeToString())
    assert server.grpc_port is not None
    return _measure(name, server.pid, server.grpc_port, grpcclient.client, call, concurrency, len(x), seconds)


def _measure(name: str, pid: int, port: int, client: Callable[..., Awaitable[None]], request: object,
             concurrency: int, batch: int, seconds: float) -> Result:  # fmt: skip
    """A warm-up, then the closed loop, with the server's CPU time over it."""

    async def run() -> Result:
        warm_until = time.perf_counter() + min(0.5, seconds / 4)
        await asyncio.gather(*[client(port, request, warm_until, [], []) for _ in range(concurrency)])
        latencies: list[float] = []
        errors: list[int] = []
        cpu = tree_cpu_seconds(pid)
        started = time.perf_counter()
        await asyncio.gather(*[client(port, request, started + seconds, latencies, errors) for _ in range(concurrency)])
        elapsed = time.perf_counter() - started
        return Result(name, concurrency, batch, elapsed, latencies, len(errors), tree_cpu_seconds(pid) - cpu)

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
