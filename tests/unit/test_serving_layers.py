"""kiln_serving's imports flow one way (app and grpc_service -> dataplane -> batching -> protocol -> model;
grpc_service -> grpc_tensors -> grpc_wire, and grpc_service -> http2_server -> http2 -> http2_bodies ->
http2_answers -> http2_wire) and never reach torch or the other components."""

import ast
import os
import subprocess
import sys
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[2] / "serving" / "kiln_serving"

# Lower layers first; a module may import only modules listed before it.
LAYERS = ["errors", "config", "providers", "jsontext", "jsonwrite", "codec", "binary", "images", "metrics", "model",
          "protocol", "layouts", "batching", "admission", "dataplane", "direct", "transport_views", "http_heads",
          "connections", "http_body", "http2_wire", "http2_answers", "http2_bodies", "http2", "http2_server",
          "grpc_wire", "protobuf_walk", "grpc_tensors", "grpc_service", "app", "server", "serve_cli", "__main__",
          "__init__"]  # fmt: skip
FORBIDDEN = ("torch", "torchvision", "kiln_trainer", "kiln_operator", "kopf", "fastapi")


def imports_of(path: Path) -> set[str]:
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module)
            if node.module == "kiln_serving":
                names.update(f"kiln_serving.{a.name}" for a in node.names)
    return names


def test_every_serving_module_has_a_layer() -> None:
    assert sorted(p.stem for p in PACKAGE.glob("*.py")) == sorted(LAYERS)


def test_serving_modules_import_only_lower_layers_and_nothing_forbidden() -> None:
    for module in LAYERS:
        allowed = set(LAYERS[: LAYERS.index(module)])
        for name in imports_of(PACKAGE / f"{module}.py"):
            top = name.split(".")[0]
            assert top not in FORBIDDEN, f"{module}.py imports {name}"
            if top == "kiln_serving" and "." in name:
                assert name.split(".")[1] in allowed, f"{module}.py imports {name}, a layer above it"


def test_starting_the_server_code_never_loads_torch() -> None:
    probe = "import sys, kiln_serving, kiln_serving.serve_cli; assert 'torch' not in sys.modules, 'torch imported'"
    roots = os.pathsep.join([str(PACKAGE.parents[1]), str(PACKAGE.parent)])
    done = subprocess.run([sys.executable, "-c", probe], env={**os.environ, "PYTHONPATH": roots},
                          capture_output=True, text=True, timeout=120)  # fmt: skip
    assert done.returncode == 0, done.stderr
