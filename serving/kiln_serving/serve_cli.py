"""The `kiln serve` command (also `python -m kiln_serving`): flags -> ServingConfig -> a blocking server."""

import argparse
import logging
import sys
from pathlib import Path

from kiln import api
from kiln.api import constants
from kiln_serving import providers, server
from kiln_serving.config import ServingConfig

# ServingConfig fields set by a flag of the same name that takes a number, and what the flag says.
SETTINGS = {
    "port": "HTTP port, 0 = any free",
    "grpc_port": "gRPC port (KServe v2 / Triton GRPCInferenceService), 0 = off",
    "max_batch_size": "most items merged into one runtime call",
    "max_queue_delay_microseconds": "longest the oldest request waits for others to batch with; 0 turns batching off",
    "max_queue_size": "requests waiting for the runtime before new ones get 503 + Retry-After",
    "max_body_bytes": "largest request body accepted, else 413",
    "max_concurrent_large_requests": "large bodies decoded at once; more wait, bounding memory",
    "max_header_bytes": "largest request head (request line and headers), else 431",
    "header_timeout_seconds": "how long a request head may take (the first from connecting), else 408 and close",
    "body_timeout_seconds": "longest pause inside a request body, else 408 and close",
    "keep_alive_timeout_seconds": "how long an idle keep-alive connection stays open",
    "max_connections": "open connections beyond which new ones get 503 at once",
    "graceful_shutdown_seconds": "how long shutdown waits for in-flight requests",
}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The serving flags; defaults match the TrainingJob's ServingSpec."""
    defaults = ServingConfig(model_dir=Path("."))
    add = parser.add_argument
    add(
        "--model-dir",
        type=Path,
        required=True,
        help="trainer output folder (model-card.json) or a folder holding a plain model.onnx",
    )
    add("--variant", help="variant from the model card to serve (default: the card's selected one)")
    add("--model-name", help="name clients use (default: the card's name, else the folder's)")
    add("--host", default=defaults.host, help="address to listen on (default: %(default)s)")
    for field, help_text in SETTINGS.items():
        flag = "--" + field.replace("_", "-")
        default = getattr(defaults, field)
        add(flag, type=type(default), default=default, help=f"{help_text} (default: %(default)s)")
    add("--allow-non-finite", action="store_true", help="accept NaN and infinities in float inputs (else 400)")
    add(
        "--intra-op-threads",
        type=int,
        default=None,
        help="onnxruntime threads (default: the container's CPU quota from cgroups)",
    )
    add(
        "--ort-spinning",
        action="store_true",
        help="let idle onnxruntime threads spin (faster on dedicated cores, wasteful on shared ones)",
    )
    add(
        "--providers",
        default="auto",
        help="execution providers in order, e.g. tensorrt,cuda,cpu (default: auto = best available)",
    )
    add(
        "--allow-cpu-fallback",
        action="store_true",
        help="be ready on CPU when the requested accelerator is not really active",
    )
    add("--trt-cache-dir", type=Path, default=None, help="folder where TensorRT caches its engines")
    add("--use-optimized", action="store_true", help="serve the card's offline-optimised graph when it has one")
    add("--access-log", action="store_true", help="log every request")
    add("--log-level", default="info", choices=["debug", "info", "warning", "error"], help="(default: %(default)s)")


def config_from_args(args: argparse.Namespace) -> ServingConfig:
    """ServingConfig from parsed flags; ValueError names the bad flag."""
    return ServingConfig(
        model_dir=args.model_dir,
        variant=args.variant,
        model_name=args.model_name,
        host=args.host,
        allow_non_finite=args.allow_non_finite,
        intra_op_threads=args.intra_op_threads,
        ort_spinning=args.ort_spinning,
        providers=providers.parse(args.providers),
        allow_cpu_fallback=args.allow_cpu_fallback,
        trt_cache_dir=args.trt_cache_dir,
        use_optimized=args.use_optimized,
        access_log=args.access_log,
        **{field: getattr(args, field) for field in SETTINGS},
    )


def run(args: argparse.Namespace) -> int:
    """Serve until SIGTERM; exit 78 (EX_CONFIG) for flags that can never work."""
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        config = config_from_args(args)
    except ValueError as err:
        sys.stderr.write(f"kiln serve: {err}\n")
        return constants.EXIT_CONFIG_ERROR
    if not config.model_dir.exists():
        sys.stderr.write(f"kiln serve: --model-dir {config.model_dir} does not exist\n")
        return constants.EXIT_CONFIG_ERROR
    return server.serve(config)


def serve_local(
    model_dir: Path,
    name: str,
    *,
    host: str,
    port: int,
    serving: api.ServingSpec,
    grpc_port: int = constants.SERVING_GRPC_PORT,
) -> int:
    """`kiln run --serve`: serve a freshly trained folder in this process with the job's serving settings."""
    if not logging.getLogger().handlers:
        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    config = ServingConfig.from_spec(
        model_dir,
        serving,
        model_name=name,
        host=host,
        port=port,
        grpc_port=grpc_port,
        allow_cpu_fallback=True,  # a laptop without a GPU still serves a job that asked for one
    )
    return server.serve(config)
