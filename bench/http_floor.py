"""What kiln's HTTP layers cost at batch 32, against the thinnest Python server around the same session.

Goal 3b (HTTP overhead ≤ 10% at batch 32) compares `kiln serve` with onnxruntime called in-process. This script
adds a third column: a floor server of ~40 lines (uvloop, one asyncio Protocol, the Open Inference Protocol's
binary request parsed by hand, the session run on one thread, no limits, metrics or error handling), so the
overhead splits into what any Python HTTP server on these cores pays (kernel, client, hand-off) and what kiln's
own layers (uvicorn/ASGI, Starlette, the data plane, the batcher, metrics) add. Not a server to ship. A fourth
column runs the same floor server with onnxruntime on its event-loop thread (no hand-off to a worker thread and
back, as kiln runs a full batch): the least any Python server on these cores can add to a batch-32 run, with no
parsing beyond the two lengths, no checks, limits or metrics.

    python bench/http_floor.py [--seconds 3] [--rounds 3]
"""

import argparse
import asyncio
import contextlib
import json
import sys
import tempfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
from serving_setup import (
    IMAGE,
    Result,
    Running,
    build_models,
    closed_loop,
    free_port,
    in_process,
    infer_request,
    kiln_server,
    pooled,
    process,
)

from kiln.api import constants
from kiln_serving import binary
from kiln_serving.config import cpu_quota


def serve_floor(model: Path, port: int, inline: bool) -> None:
    """The floor server: blocking, until killed; `inline` runs the session on the event-loop thread."""
    import onnxruntime as ort
    import uvloop

    options = ort.SessionOptions()
    options.intra_op_num_threads, options.inter_op_num_threads = cpu_quota(), 1
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    session = ort.InferenceSession(str(model), options, providers=["CPUExecutionProvider"])
    worker = ThreadPoolExecutor(1)

    def field(head: bytes, name: bytes) -> int:
        return int(head.split(b"\r\n" + name + b":")[1].split(b"\r\n")[0])

    class Floor(asyncio.Protocol):
        def connection_made(self, transport: asyncio.BaseTransport) -> None:
            # uvloop's TCP transports are not asyncio.Transport subclasses, but have its methods.
            self.transport: asyncio.Transport = transport  # type: ignore[assignment]
            self.buffer, self.end = bytearray(), 0

        def data_received(self, data: bytes) -> None:
            if data.startswith(b"GET "):  # the bench's readiness check
                self.transport.write(b"HTTP/1.1 200 OK\r\ncontent-length: 0\r\nconnection: close\r\n\r\n")
                self.transport.close()
                return
            self.buffer += data
            if not self.end:
                split = self.buffer.find(b"\r\n\r\n")
                if split < 0:
                    return
                head = bytes(self.buffer[:split]).lower()
                self.start, self.json = split + 4, field(head, binary.HEADER.lower().encode())
                self.end = self.start + field(head, b"content-length")
            if len(self.buffer) < self.end:
                return
            body = memoryview(self.buffer)[self.start : self.end]
            shape = json.loads(bytes(body[: self.json]))["inputs"][0]["shape"]
            x = np.frombuffer(body[self.json :], np.float32).reshape(shape)
            self.buffer, self.end = bytearray(), 0
            if inline:
                self.answer(session.run(None, {"input": x})[0])
                return
            run = asyncio.get_running_loop().run_in_executor(worker, session.run, None, {"input": x})
            run.add_done_callback(lambda done: self.answer(done.result()[0]))

        def answer(self, y: np.ndarray) -> None:
            raw = y.tobytes()
            output = {"name": "logits", "datatype": "FP32", "shape": list(y.shape),
                      "parameters": {"binary_data_size": len(raw)}}  # fmt: skip
            header = json.dumps({"model_name": "m", "outputs": [output]}).encode()
            head = (f"HTTP/1.1 200 OK\r\ncontent-type: application/octet-stream\r\n{binary.HEADER}: {len(header)}\r\n"
                    f"content-length: {len(header) + len(raw)}\r\n\r\n").encode()  # fmt: skip
            self.transport.write(head + header + raw)

    async def main() -> None:
        server = await asyncio.get_running_loop().create_server(Floor, "127.0.0.1", port)
        await server.serve_forever()

    uvloop.run(main())


def floor_server(model: Path, log: Path, inline: bool = False) -> contextlib.AbstractContextManager[Running]:
    port = free_port()
    command = [sys.executable, __file__, "--serve-floor", str(model), "--port", str(port), *(["--inline"] * inline)]
    floor: contextlib.AbstractContextManager[Running] = process(command, port, log, "/")
    return floor


def main(seconds: float, rounds: int) -> str:
    rows: list[Result] = []
    lines: list[str] = []
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        fp32, _, _ = build_models(work)
        x = np.random.default_rng(2).normal(size=(32, 3, IMAGE, IMAGE)).astype(np.float32)
        request = infer_request(x, True)
        with (floor_server(fp32 / constants.MODEL_FILE, work / "floor.log") as floor,
              floor_server(fp32 / constants.MODEL_FILE, work / "inline.log", inline=True) as inline,
              kiln_server(fp32, False, work / "kiln.log") as kiln):  # fmt: skip
            for _ in range(rounds):
                for concurrency in (1, 4):
                    local = [in_process("in-process onnxruntime", fp32, 32, seconds / 2)]
                    served = [closed_loop(name, running, request, concurrency, 32, seconds)
                              for name, running in (("kiln serve", kiln), ("floor server", floor),
                                                    ("floor server, run inline", inline))]  # fmt: skip
                    local.append(in_process("in-process onnxruntime", fp32, 32, seconds / 2))
                    baseline = pooled(local)
                    rows += [baseline, *served]
                    for result in served:
                        lines.append(f"| {result.name} | {concurrency} | "
                                     f"{1 - result.items_per_second / baseline.items_per_second:+.0%} | "
                                     f"{result.cpu_ms_per_item / baseline.cpu_ms_per_item - 1:+.0%} |")  # fmt: skip
    return "\n".join([
        "## HTTP overhead at batch 32: kiln serve vs the floor of a Python server",
        "",
        f"{rounds} round(s), {seconds:g} s per cell, in-process onnxruntime measured around each pair (pooled).",
        "",
        "| server | concurrency | batch | requests/s | items/s | p50 ms | p99 ms | server CPU ms/item | errors |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
        *[r.row() for r in rows],
        "",
        "| server | concurrency | throughput overhead vs in-process | server CPU per item vs in-process |",
        "|---|---:|---:|---:|",
        *lines,
    ]) + "\n"  # fmt: skip


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=3.0, help="per served cell")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--serve-floor", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--port", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--inline", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve_floor is not None:
        serve_floor(args.serve_floor, args.port, args.inline)
    else:
        print(main(args.seconds, args.rounds))
