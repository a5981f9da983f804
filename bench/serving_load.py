"""Closed-loop load test of `kiln serve`: batching on/off, JSON vs binary tensors, fp32 vs int8-static, against
in-process onnxruntime and PyTorch eager behind the same HTTP stack (and KServe's server when it is installed).

Each client keeps one request in flight on its own keep-alive connection (closed loop) for a fixed time;
throughput counts items (images), latency is per request. Servers run as separate processes so the client
does not share their interpreter. The bench may import torch; kiln_serving never does.

    python bench/serving_load.py --quick            # ~2 s per cell
    python bench/serving_load.py --model-dir DIR    # a trainer output folder instead of the built-in CNN
"""

import argparse
import contextlib
import importlib.util
import os
import tempfile
from pathlib import Path

import numpy as np
from serving_peers import KSERVE_PYTHON, TRITON_PYTHON, kserve_server, triton_server
from serving_setup import (
    IMAGE,
    Result,
    Running,
    build_models,
    card_models,
    closed_loop,
    grpc_closed_loop,
    in_process,
    infer_request,
    kiln_server,
    pooled,
    serve_torch,
    torch_server,
)

from kiln.api import constants
from kiln_serving.config import cpu_quota

REPO = Path(__file__).resolve().parents[1]

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
        peers = [("KServe 0.21 ModelServer", "no batching", KSERVE_PYTHON, kserve_server),
                 ("Triton (PyTriton 0.7)", "batching on", TRITON_PYTHON, triton_server)]  # fmt: skip
        for peer, batching, python, peer_server in peers:
            if python.exists():
                cells.append((f"{peer} + onnxruntime fp32, binary, {batching}",
                              peer_server(fp32 / constants.MODEL_FILE, work), True))  # fmt: skip
            else:
                notes.append(f"{peer} not run: no virtualenv at {python} (python bench/serving_peers.py makes it).")
        for name, server, binary in cells:
            try:
                with server as running:
                    for c in levels:
                        results.append(closed_loop(name, running, infer_request(one, binary), c, 1, seconds))
                    if name == "kiln fp32, binary, batching on":
                        grpc_name = "kiln fp32, gRPC raw contents, batching on"
                        results += [grpc_closed_loop(grpc_name, running, one, c, seconds) for c in levels]
                    if name == "kiln fp32, binary, batching off":
                        # In-process right before and after the served batch-32 cells (the same moment's machine),
                        # reported as one row: the two halves pooled.
                        before = in_process("in-process onnxruntime fp32", fp32, 32, seconds / 2)
                        served = [closed_loop(name, running, infer_request(many, True), c, 32, seconds) for c in (1, 4)]
                        after = in_process("in-process onnxruntime fp32", fp32, 32, seconds / 2)
                        results += [pooled([before, after]), *served]
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
        return pooled(hits) if hits else None

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
    goal("gRPC vs HTTP binary, concurrency 32", find("kiln fp32, gRPC", 32),
         find("kiln fp32, binary, batching on", 32), 1.0)  # fmt: skip
    goal("binary vs JSON tensors, concurrency 32 (no goal)", find("kiln fp32, binary, batching on", 32),
         find("kiln fp32, JSON, batching on", 32), 0.0)  # fmt: skip
    goal("kiln (binary, batching on) vs KServe ModelServer, concurrency 32", find("kiln fp32, binary, batching on", 32),
         find("KServe", 32), 5.0)  # fmt: skip
    goal("kiln (binary, batching on) vs Triton through PyTriton (batching on), concurrency 32",
         find("kiln fp32, binary, batching on", 32), find("Triton", 32), 1.0)  # fmt: skip
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
