"""The servers kiln is compared with, each serving the same onnxruntime model from its own virtualenv:

- KServe's ModelServer (kserve 0.21): a kserve.Model around an onnxruntime session, no batching (KServe's
  default: its batcher is a separate agent);
- NVIDIA Triton through PyTriton (nvidia-pytriton, which ships the Triton server): the session in a Python
  function behind Triton's HTTP front end and dynamic batcher, set up like kiln's (at most 32 items, 2000 µs).

Both speak the Open Inference Protocol with the binary tensor extension, so the bench sends them the very
bytes it sends kiln. `python bench/serving_peers.py` makes both virtualenvs (pip, a few minutes); without one,
its rows are left out.
"""

import argparse
import contextlib
import os
import shutil
import subprocess
from pathlib import Path

from serving_setup import Running, free_port, process

from kiln_serving.config import cpu_quota

KSERVE_PYTHON = Path(os.environ.get("KILN_BENCH_KSERVE_PYTHON", "/tmp/kserve-venv/bin/python"))
TRITON_PYTHON = Path(os.environ.get("KILN_BENCH_TRITON_PYTHON", "/tmp/pytriton-venv/bin/python"))
# peer -> (its virtualenv's python, the Python that makes the virtualenv, what pip installs there). Triton's
# Python-backend stub is built for Debian's own Python 3.11: a virtualenv of another 3.11 patch release fails at
# model load. onnxruntime is the version kiln's serving extra pins, so every server runs the same runtime.
PEERS = {
    "kserve": (KSERVE_PYTHON, "python3", ["kserve==0.21.0", "onnxruntime==1.31.1"]),
    "triton": (TRITON_PYTHON, "/usr/bin/python3.11", ["nvidia-pytriton==0.7.0", "onnxruntime==1.31.1"]),
}

# The session as kiln_serving.model builds it (the bench passes kiln's thread count), no spinning.
_SESSION = """
import sys, onnxruntime as ort
def session(path):
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.intra_op_num_threads, options.inter_op_num_threads = int(sys.argv[-1]), 1
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return ort.InferenceSession(path, options, providers=["CPUExecutionProvider"])
"""

KSERVE_SCRIPT = (
    _SESSION
    + """
import kserve
from kserve import InferOutput, InferResponse
class Onnx(kserve.Model):
    def __init__(self, name, path):
        super().__init__(name)
        self.session = session(path)
        self.ready = True
    def predict(self, payload, headers=None):
        y = self.session.run(None, {"input": payload.inputs[0].as_numpy()})[0]
        out = InferOutput(name="logits", shape=list(y.shape), datatype="FP32")
        out.set_data_from_numpy(y, binary_data=False)
        return InferResponse(model_name=self.name, infer_outputs=[out], response_id=payload.id or "0")
server = kserve.ModelServer(http_port=int(sys.argv[2]), enable_grpc=False, workers=1, enable_latency_logging=False)
server.start([Onnx("m", sys.argv[1])])
"""
)

TRITON_SCRIPT = (
    _SESSION
    + """
import numpy as np
from pytriton.decorators import batch
from pytriton.model_config import DynamicBatcher, ModelConfig, Tensor
from pytriton.triton import Triton, TritonConfig
onnx = session(sys.argv[1])
@batch
def infer(input):
    return {"logits": onnx.run(None, {"input": input})[0]}
http, grpc, metrics = (int(p) for p in sys.argv[2:5])
config = TritonConfig(http_address="127.0.0.1", http_port=http, grpc_address="127.0.0.1", grpc_port=grpc,
                      metrics_address="127.0.0.1", metrics_port=metrics, log_verbose=0)
with Triton(config=config) as triton:
    triton.bind(model_name="m", infer_func=infer,
                inputs=[Tensor(name="input", dtype=np.float32, shape=(3, 32, 32))],
                outputs=[Tensor(name="logits", dtype=np.float32, shape=(10,))],
                config=ModelConfig(max_batch_size=32, batcher=DynamicBatcher(max_queue_delay_microseconds=2000)))
    triton.serve()
"""
)


def kserve_server(model: Path, work: Path) -> contextlib.AbstractContextManager[Running]:
    script = work / "kserve_onnx.py"
    script.write_text(KSERVE_SCRIPT)
    port = free_port()
    server: contextlib.AbstractContextManager[Running] = process(
        [str(KSERVE_PYTHON), str(script), str(model), str(port), str(cpu_quota())], port, work / "kserve.log",
        "/v2/models/m/ready")  # fmt: skip
    return server


def triton_server(model: Path, work: Path) -> contextlib.AbstractContextManager[Running]:
    """PyTriton's process; tritonserver and the Python-backend stub run below it (their CPU is counted too)."""
    script = work / "pytriton_onnx.py"
    script.write_text(TRITON_SCRIPT)
    ports = [free_port() for _ in range(3)]
    server: contextlib.AbstractContextManager[Running] = process(
        [str(TRITON_PYTHON), str(script), str(model), *map(str, ports), str(cpu_quota())], ports[0],
        work / "pytriton.log", "/v2/models/m/ready")  # fmt: skip
    return server


def install(peer: str) -> None:
    """Make the peer's virtualenv (if missing) and install its server into it."""
    python, base, packages = PEERS[peer]
    if not python.exists() and shutil.which(base) is None:
        print(f"{peer}: skipped, its virtualenv needs {base} (the bench leaves its rows out)")
        return
    if not python.exists():
        subprocess.run([base, "-m", "venv", str(python.parents[1])], check=True)
    subprocess.run([str(python), "-m", "pip", "install", "--quiet", "--upgrade", "pip"], check=True)
    subprocess.run([str(python), "-m", "pip", "install", "--quiet", *packages], check=True)
    print(f"{peer}: {python}")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description="Install the serving bench's peers into their virtualenvs.")
    parser.add_argument("peers", nargs="*", metavar="PEER", help=f"of {', '.join(PEERS)} (default: all)")
    chosen = parser.parse_args().peers or list(PEERS)
    if unknown := set(chosen) - set(PEERS):
        parser.error(f"unknown peer(s) {', '.join(sorted(unknown))}; choose from {', '.join(PEERS)}")
    for name in chosen:
        install(name)
