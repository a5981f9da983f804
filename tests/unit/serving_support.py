"""Shared pieces of the serving tests: tiny real ONNX models, model cards, and a real server on a free port, in
this process or as a child process."""

import contextlib
import functools
import gc
import io
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import card_support
import httpx
import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper
from PIL import Image
from prometheus_client.parser import text_string_to_metric_families

from kiln import api
from kiln.api import constants
from kiln_cluster.controlplane import free_port
from kiln_serving import Server, ServingConfig, codec, start
from kiln_serving.model import Model, TensorInfo

REPO = Path(__file__).resolve().parents[2]
SIZE = 8
CLASSES = ["cat", "dog", "bird", "fish", "frog"]
DATATYPES = ["BOOL", "UINT8", "UINT16", "UINT32", "UINT64", "INT8", "INT16", "INT32", "INT64", "FP16", "FP32", "FP64"]
_ONNX_TYPES = {
    "BOOL": TensorProto.BOOL, "UINT8": TensorProto.UINT8, "UINT16": TensorProto.UINT16,
    "UINT32": TensorProto.UINT32, "UINT64": TensorProto.UINT64, "INT8": TensorProto.INT8,
    "INT16": TensorProto.INT16, "INT32": TensorProto.INT32, "INT64": TensorProto.INT64,
    "FP16": TensorProto.FLOAT16, "FP32": TensorProto.FLOAT, "FP64": TensorProto.DOUBLE,
}  # fmt: skip


def _save(graph: onnx.GraphProto, path: Path) -> Path:
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=9)
    onnx.checker.check_model(model)
    path.parent.mkdir(parents=True, exist_ok=True)
    onnx.save(model, str(path))
    return path


def classifier(path: Path, batch: int | None = None, seed: int = 0) -> Path:
    """Conv -> Relu -> global average pool -> Gemm: an image classifier [N,3,8,8] -> logits [N,5]."""
    rng = np.random.default_rng(seed)
    n: int | str = batch if batch is not None else "batch"
    weights = [
        numpy_helper.from_array(rng.normal(size=(4, 3, 3, 3)).astype(np.float32), "conv_w"),
        numpy_helper.from_array(rng.normal(size=4).astype(np.float32), "conv_b"),
        numpy_helper.from_array(rng.normal(size=(4, len(CLASSES))).astype(np.float32), "fc_w"),
        numpy_helper.from_array(rng.normal(size=len(CLASSES)).astype(np.float32), "fc_b"),
    ]
    nodes = [
        helper.make_node("Conv", ["input", "conv_w", "conv_b"], ["c"], pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["c"], ["r"]),
        helper.make_node("GlobalAveragePool", ["r"], ["p"]),
        helper.make_node("Flatten", ["p"], ["f"]),
        helper.make_node("Gemm", ["f", "fc_w", "fc_b"], ["logits"]),
    ]
    graph = helper.make_graph(
        nodes, "tiny-classifier",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, [n, 3, SIZE, SIZE])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, [n, len(CLASSES)])],
        initializer=weights,
    )  # fmt: skip
    return _save(graph, path)


def text_model(path: Path, width: int | None = None) -> Path:
    """Text in, numbers out (Cast string -> float), [N] or [N, width]: the warm-up must give it text it can read."""
    node = helper.make_node("Cast", ["text"], ["value"], to=TensorProto.FLOAT)
    shape: list[str | int] = ["batch"] if width is None else ["batch", width]
    graph = helper.make_graph([node], "text-to-number",
                              [helper.make_tensor_value_info("text", TensorProto.STRING, shape)],
                              [helper.make_tensor_value_info("value", TensorProto.FLOAT, shape)])  # fmt: skip
    return _save(graph, path)


def labelled(path: Path) -> Path:
    """Numbers in, two outputs: the numbers and the same as text (Cast float -> string), [N,3] each."""
    nodes = [
        helper.make_node("Identity", ["x"], ["value"]),
        helper.make_node("Cast", ["x"], ["label"], to=TensorProto.STRING),
    ]
    graph = helper.make_graph(nodes, "labelled", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 3])],
                              [helper.make_tensor_value_info("value", TensorProto.FLOAT, ["batch", 3]),
                               helper.make_tensor_value_info("label", TensorProto.STRING, ["batch", 3])])  # fmt: skip
    return _save(graph, path)


def shape_of(path: Path) -> Path:
    """Numbers [N,3] in, their shape out (Shape): an output that does not follow the input's rows."""
    graph = helper.make_graph([helper.make_node("Shape", ["x"], ["shape"])], "shape-of",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 3])],
                              [helper.make_tensor_value_info("shape", TensorProto.INT64, [2])])  # fmt: skip
    return _save(graph, path)


def all_datatypes(path: Path, datatypes: Sequence[str] = DATATYPES) -> Path:
    """One Identity per OIP datatype (of `datatypes`): input `in_<TYPE>` [N,3] -> output `out_<TYPE>`."""
    nodes = [helper.make_node("Identity", [f"in_{t}"], [f"out_{t}"]) for t in datatypes]
    graph = helper.make_graph(
        nodes, "all-datatypes",
        [helper.make_tensor_value_info(f"in_{t}", _ONNX_TYPES[t], ["batch", 3]) for t in datatypes],
        [helper.make_tensor_value_info(f"out_{t}", _ONNX_TYPES[t], ["batch", 3]) for t in datatypes],
    )  # fmt: skip
    return _save(graph, path)


def trained_folder(root: Path, name: str = "tiny") -> Path:
    """A trainer output folder: models/model.onnx (fp32), models/model.alt.onnx ("int8-static") and a card."""
    fp32 = classifier(root / constants.MODELS_DIR / constants.MODEL_FILE)
    alt = classifier(root / constants.MODELS_DIR / "model.alt.onnx", seed=1)
    optimized = root / constants.MODELS_DIR / constants.OPTIMIZED_MODEL_FILE
    shutil.copy(fp32, optimized)

    def variant(name: str, path: Path, optimized_path: str | None = None) -> api.VariantReport:
        return api.VariantReport(
            name=name,
            path=str(path.relative_to(root)),
            sha256=api.file_sha256(path),
            size_bytes=path.stat().st_size,
            optimized_path=optimized_path,
        )

    card = card_support.model_card(
        name=name,
        input=api.TensorSpec(name="input", shape=[-1, 3, SIZE, SIZE]),
        output=api.TensorSpec(name="logits", shape=[-1, len(CLASSES)]),
        class_names=CLASSES,
        preprocessing=api.Preprocessing(image_size=SIZE, mean=[0.5, 0.5, 0.5], std=[0.25, 0.25, 0.25]),
        opset=17,
        exporter="onnx.helper",
        variants=[variant("fp32", fp32, str(optimized.relative_to(root))), variant("int8-static", alt)],
        selection_reason="test",
    )
    card.write(root / constants.MODEL_CARD_FILE)
    return root


@functools.lru_cache(maxsize=16)
def _session(path: Path, digest: str) -> ort.InferenceSession:
    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])


def reference(path: Path, feed: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """What in-process onnxruntime says, to compare served outputs with."""
    session = _session(path, api.file_sha256(path))
    names = [o.name for o in session.get_outputs()]
    return dict(zip(names, session.run(names, feed), strict=True))


def config(model_dir: Path, **overrides: object) -> ServingConfig:
    settings: dict[str, object] = {
        "host": "127.0.0.1",
        "port": 0,
        "grpc_port": 0,
        "intra_op_threads": 1,
        "max_queue_delay_microseconds": 1000,
    }
    settings.update(overrides)
    return ServingConfig(model_dir=model_dir, **settings)  # type: ignore[arg-type]


@contextlib.contextmanager
def serving(cfg: ServingConfig, model: Model | None = None) -> Iterator[Server]:
    """A real uvicorn server in a thread on a free port, model loaded (ready or not) before the body runs."""
    server = start(cfg, model)
    try:
        if not server.wait_loaded(120):
            raise RuntimeError("model did not finish loading")
        yield server
    finally:
        server.stop()


def environment() -> dict[str, str]:
    """This process's environment with this checkout's packages first on PYTHONPATH, for child processes."""
    roots = [str(REPO), str(REPO / "serving"), str(REPO / "trainer"), str(REPO / "operator")]
    return {**os.environ, "PYTHONPATH": os.pathsep.join([*roots, os.environ.get("PYTHONPATH", "")])}


# `python -m kiln_serving` with a lower soft RLIMIT_NOFILE (argv[1]), set before anything is imported; unlike
# Popen(preexec_fn=...) this never runs Python between fork and exec of a process that has threads.
_FILE_LIMITED = (
    "import resource, runpy, sys; soft = int(sys.argv.pop(1)); "
    "resource.setrlimit(resource.RLIMIT_NOFILE, (soft, resource.getrlimit(resource.RLIMIT_NOFILE)[1])); "
    "runpy.run_module('kiln_serving', run_name='__main__', alter_sys=True)"
)


@dataclass
class ServeProcess:
    """`python -m kiln_serving` running as a child: its process, HTTP port, gRPC port (None: off), and stderr
    lines so far."""

    process: subprocess.Popen[str]
    port: int
    log: list[str]
    grpc_port: int | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"


@contextlib.contextmanager
def kiln_serve(
    model_dir: Path, *flags: str, open_files: int | None = None, grpc: bool = False
) -> Iterator[ServeProcess]:
    """The server as a child process on a free port (gRPC on another when `grpc`), its model ready before the
    body runs, killed after it unless the body ended it. open_files lowers the child's file-descriptor limit
    from its start."""
    grpc_port = free_port() if grpc else None
    args = ["--model-dir", str(model_dir), "--host", "127.0.0.1", "--port", "0", "--grpc-port", str(grpc_port or 0),
            "--intra-op-threads", "1", *flags]  # fmt: skip
    launch = ["-c", _FILE_LIMITED, str(open_files)] if open_files is not None else ["-m", "kiln_serving"]
    process = subprocess.Popen([sys.executable, *launch, *args], env=environment(), stderr=subprocess.PIPE, text=True)
    try:
        assert process.stderr is not None
        log: list[str] = []
        for line in process.stderr:  # the server logs its address, then whether the model is ready
            log.append(line)
            if " ready" in line:
                break
        found = re.search(r"on http://127\.0\.0\.1:(\d+)", "".join(log))
        if found is None or not re.search(r"model \S+ ready", log[-1]):
            raise RuntimeError("the server did not become ready:\n" + "".join(log))
        # Keep reading, so that a server logging a lot never blocks on a full pipe.
        threading.Thread(target=log.extend, args=(process.stderr,), daemon=True).start()
        yield ServeProcess(process, int(found.group(1)), log, grpc_port)
    finally:
        process.kill()
        process.wait()


def png(size: tuple[int, int] = (20, 12), seed: int = 0) -> bytes:
    pixels = np.random.default_rng(seed).integers(0, 256, size=(size[1], size[0], 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return buffer.getvalue()


def images_batch(n: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).normal(size=(n, 3, SIZE, SIZE)).astype(np.float32)


def binary_body(x: np.ndarray, name: str = "input", output: str = "logits") -> tuple[bytes, int]:
    """An infer body with the binary tensor extension as tritonclient sends it (the output asked for as binary
    too), and its Inference-Header-Content-Length."""
    raw = x.astype("<f4").tobytes()
    header = json.dumps({"inputs": [{"name": name, "shape": list(x.shape), "datatype": "FP32",
                                     "parameters": {"binary_data_size": len(raw)}}],
                         "outputs": [{"name": output, "parameters": {"binary_data": True}}]}).encode()  # fmt: skip
    return header + raw, len(header)


def binary_request(x: np.ndarray, model: str = "tiny", extra: str = "", version: str = "1.1") -> bytes:
    """A binary-extension inference request for the tiny model's input."""
    body, header_length = binary_body(x)
    return (f"POST /v2/models/{model}/infer HTTP/{version}\r\nHost: x\r\nContent-Type: application/octet-stream\r\n"
            f"Inference-Header-Content-Length: {header_length}\r\nContent-Length: {len(body)}\r\n{extra}\r\n"
            ).encode() + body  # fmt: skip


class Answers:
    """HTTP/1.1 answers read off one connection, one at a time, each framed by its Content-Length."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock, self.data = sock, b""

    def next(self) -> tuple[bytes, dict[str, str], bytes]:
        while b"\r\n\r\n" not in self.data:
            self.data += self._recv()
        head, _, self.data = self.data.partition(b"\r\n\r\n")
        status, *lines = head.decode().split("\r\n")
        headers = {k.lower(): v.strip() for k, v in (line.split(":", 1) for line in lines)}
        length = int(headers.get("content-length", 0))  # none: an interim answer (100 Continue)
        while len(self.data) < length:
            self.data += self._recv()
        body, self.data = self.data[:length], self.data[length:]
        return status.encode(), headers, body

    def closed(self) -> bool:
        """Whether the server closes the connection next (after what was already read)."""
        return self.data == b"" and self.sock.recv(1) == b""

    def _recv(self) -> bytes:
        chunk = self.sock.recv(1 << 16)
        assert chunk, "the server closed the connection"
        return chunk


def binary_output(body: bytes, header_length: int) -> np.ndarray:
    """The one FP32 output of a binary answer, in its shape."""
    header = json.loads(body[:header_length])
    (output,) = header["outputs"]
    assert output["datatype"] == "FP32" and output["parameters"]["binary_data_size"] == len(body) - header_length
    return np.frombuffer(body[header_length:], dtype="<f4").reshape(output["shape"])


# -- metrics and a model that waits ---------------------------------------------------------------------------

# How long GatedModel waits for its gate at most (so a failed test cannot hang the worker forever).
GATE_SECONDS = 60


def statuses(server: Server, model: str = "tiny") -> dict[str, float]:
    text = httpx.get(f"{server.url}/metrics").text
    return {s.labels["status"]: s.value for family in text_string_to_metric_families(text) for s in family.samples
            if s.name == "kiln_serving_requests_total" and s.labels["model"] == model}  # fmt: skip


def gauge(server: Server, name: str) -> float:
    text = httpx.get(f"{server.url}/metrics").text
    return next(s.value for family in text_string_to_metric_families(text) for s in family.samples
                if s.name == f"kiln_serving_{name}")  # fmt: skip


def queue_depth(server: Server) -> float:
    return gauge(server, "queue_depth")


class GatedModel(Model):
    """Identity on [N, 2] floats that runs only once the test opens its gate: a way to hold the worker busy."""

    def __init__(self) -> None:
        super().__init__(name="gated", inputs=[TensorInfo("x", "FP32", (-1, 2))],
                         outputs=[TensorInfo("y", "FP32", (-1, 2))])  # fmt: skip
        self.gate = threading.Event()

    def load(self) -> None:
        self.ready, self.reason = True, None

    def predict(self, inputs: Mapping[str, codec.Array]) -> dict[str, codec.Array]:
        self.gate.wait(GATE_SECONDS)
        return {"y": np.asarray(inputs["x"])}


def wait_until(
    condition: Callable[[], bool], what: str, limit: float = 60.0, pause: Callable[[float], object] = time.sleep
) -> None:
    """Wait for something the server does asynchronously; the limit only stops a hung test."""
    deadline = time.monotonic() + limit
    while not condition():
        if time.monotonic() > deadline:
            raise RuntimeError(f"gave up waiting: {what}")
        pause(0.01)


def longest_health_wait(url: str, work: Callable[[], object]) -> float:
    """The longest wait for /v2/health/live, probed back to back on a warm connection while work() runs on a
    thread, until work ends. This process's cyclic collector is off meanwhile: a full collection of a test process
    holding torch and hundreds of tests' objects pauses every thread for about as long as the stalls these tests
    look for."""
    ended: list[float] = []

    def run() -> None:
        try:
            work()
        finally:
            ended.append(time.perf_counter())

    gc.disable()
    try:
        with httpx.Client(base_url=url, timeout=60) as client:
            assert client.get("/v2/health/live").status_code == 200  # connected and warm before the clock starts
            thread = threading.Thread(target=run)
            thread.start()
            answered = [time.perf_counter()]
            while thread.is_alive():
                assert client.get("/v2/health/live").status_code == 200
                answered.append(time.perf_counter())
            thread.join()
    finally:
        gc.enable()
    during = [t for t in answered if t <= ended[0]] + ended
    return max(b - a for a, b in zip(during, during[1:], strict=False))
