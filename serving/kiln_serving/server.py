"""Run the app under uvicorn: blocking for `kiln serve`, or in a background thread for local mode and tests.

Shutdown is uvicorn's graceful one: on SIGTERM (or stop()) it closes the listening socket, lets in-flight
requests finish (up to graceful_shutdown_seconds), then the app's lifespan drains the batcher.
"""

import ctypes
import gc
import logging
import platform
import signal
import socket
import threading
from dataclasses import dataclass, field

import uvicorn
from numpy._core.multiarray import _set_madvise_hugepage  # type: ignore[attr-defined]  # not in the stubs
from prometheus_client import CollectorRegistry

from kiln_serving import connections
from kiln_serving.app import App, build_app
from kiln_serving.config import ServingConfig
from kiln_serving.dataplane import DataPlane
from kiln_serving.model import Model

log = logging.getLogger(__name__)


def _uvicorn(app: App, config: ServingConfig) -> uvicorn.Server:
    return uvicorn.Server(
        uvicorn.Config(
            app,
            lifespan="on",
            log_config=None,  # keep the process's logging setup
            access_log=config.access_log,
            proxy_headers=False,  # nothing in front of the server forwards client addresses kiln would use
            timeout_graceful_shutdown=int(config.graceful_shutdown_seconds),
            http=connections.protocol(config, app.direct),
            timeout_keep_alive=config.keep_alive_timeout_seconds,  # type: ignore[arg-type]
        )
    )


# glibc mallopt() parameters and the values serve() gives them (see keep_large_blocks).
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3
_TRIM_BYTES, _MMAP_BYTES = 64 << 20, 16 << 20


def keep_large_blocks() -> None:
    """Make glibc keep freed request-sized blocks in the heap instead of handing them back to the kernel.

    A binary request allocates a few blocks the size of its body (uvicorn's body buffers, the tensor buffer).
    Above glibc's mmap threshold each is fresh memory from mmap, and heap trimming returns what the next request
    needs, so a 400 KB batch paid ~100 page faults per copy: a fifth of the event loop's CPU. Fixed thresholds
    reuse the memory instead, at the cost of up to _TRIM_BYTES of free heap kept. A no-op off glibc.
    """
    if platform.libc_ver()[0] != "glibc":
        return
    try:
        libc = ctypes.CDLL(None)
        libc.mallopt(_M_MMAP_THRESHOLD, _MMAP_BYTES)
        libc.mallopt(_M_TRIM_THRESHOLD, _TRIM_BYTES)
    except (OSError, AttributeError) as err:
        log.debug("mallopt not available: %s", err)


def no_huge_pages() -> None:
    """Stop numpy asking for transparent huge pages (madvise) for its large arrays.

    Where the kernel's THP defrag setting is `madvise` (a common default), the first touch of such an array waits
    for memory to be compacted into 2 MB pages, and the thread touching it holds the GIL meanwhile: gathering 10 M
    strings into their 80 MB array kept health probes waiting 170-215 ms here, and 45 ms without huge pages. A
    server whose probes answer in milliseconds takes 4 KB pages instead."""
    _set_madvise_hugepage(False)


def freeze_startup_objects() -> None:
    """Move every object alive now (modules, classes, the app) out of the cyclic collector's sight.

    A full collection walks all tracked objects with the interpreter lock held; after the imports a serving
    process holds ~60,000 of them, ~40 ms a walk here: most of a health probe's 50 ms, at any moment. They live
    as long as the process, so walking them finds nothing; frozen, a full walk only sees what requests made."""
    gc.collect()
    gc.freeze()


def serve(config: ServingConfig, model: Model | None = None) -> int:
    """Serve until SIGINT/SIGTERM, then shut down gracefully; returns the exit status.

    Owns the process, so it also tunes the allocator for request-sized buffers (keep_large_blocks), numpy's
    for large ones (no_huge_pages) and the collector for a long-lived heap (freeze_startup_objects)."""
    keep_large_blocks()
    no_huge_pages()
    app = build_app(config, model)
    freeze_startup_objects()
    sock = connections.bind(config.host, config.port)
    host, port = sock.getsockname()[:2]
    log.info(
        "serving %s on http://%s:%d (Open Inference Protocol v2, metrics at /metrics)",
        app.state.dataplane.model.name,
        host,
        port,
    )
    # uvicorn re-raises the signal that stopped it once it has shut down gracefully; answer that one with a
    # no-op so that a SIGTERM from Kubernetes ends in exit status 0 rather than death by signal.
    if threading.current_thread() is threading.main_thread():
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, lambda *_: None)
    _uvicorn(app, config).run(sockets=[sock])
    return 0


@dataclass
class Server:
    """The server running in a thread of this process (`kiln run --serve`, tests, benchmarks): HTTP on
    `port`, gRPC on `grpc_port` (None when off)."""

    app: App
    sock: socket.socket
    uvicorn_server: uvicorn.Server
    thread: threading.Thread = field(init=False)

    def __post_init__(self) -> None:
        self.thread = threading.Thread(
            target=self.uvicorn_server.run, kwargs={"sockets": [self.sock]}, name="kiln-serving", daemon=True
        )

    @property
    def port(self) -> int:
        port: int = self.sock.getsockname()[1]
        return port

    def _address(self, port: int | None) -> str:
        host = self.sock.getsockname()[0]
        return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"

    @property
    def address(self) -> str:
        """host:port, the form tritonclient wants."""
        return self._address(self.port)

    @property
    def url(self) -> str:
        return f"http://{self.address}"

    @property
    def grpc_port(self) -> int | None:
        port: int | None = self.app.state.grpc_port
        return port

    @property
    def grpc_address(self) -> str:
        """host:port of the gRPC service, the form tritonclient.grpc wants."""
        return self._address(self.grpc_port)

    @property
    def dataplane(self) -> DataPlane:
        dataplane: DataPlane = self.app.state.dataplane
        return dataplane

    def wait_loaded(self, timeout: float | None = None) -> bool:
        """Block until the model finished loading (ready or not); True when it did within timeout."""
        return self.dataplane.loaded.wait(timeout)

    def stop(self) -> None:
        """Graceful stop: in-flight requests finish, then the batcher drains."""
        self.uvicorn_server.should_exit = True
        self.thread.join()
        self.sock.close()

    def __enter__(self) -> "Server":
        return self

    def __exit__(self, *_: object) -> None:
        self.stop()


def start(config: ServingConfig, model: Model | None = None, registry: CollectorRegistry | None = None) -> Server:
    """Start serving in a background thread and return at once; use wait_loaded() before sending requests."""
    app = build_app(config, model, registry)
    running = Server(app=app, sock=connections.bind(config.host, config.port), uvicorn_server=_uvicorn(app, config))
    running.thread.start()
    return running
