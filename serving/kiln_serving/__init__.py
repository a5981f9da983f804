"""kiln's model server: an ONNX model behind the Open Inference Protocol (KServe v2 / Triton HTTP).

`build_app(config)` gives the ASGI app, `serve(config)` runs it until SIGTERM, `start(config)` runs it in a
background thread (local mode, tests) and returns the running `Server`. gRPC runs beside HTTP. Never imports torch.
"""

from kiln_serving.app import build_app
from kiln_serving.config import ServingConfig
from kiln_serving.server import Server, serve, start

__all__ = ["Server", "ServingConfig", "build_app", "serve", "start"]
