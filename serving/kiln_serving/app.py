"""HTTP routes of the server (Open Inference Protocol v2, KServe v1, classify, metrics) on Starlette.

Routes only: the data plane does the protocol work. Domain errors become HTTP statuses in `_error_response`,
the one place that knows the mapping, and every error body is the protocol's {"error": "..."}.
"""

import asyncio
import contextlib
import logging
import time
import zlib
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine
from typing import Any, TypeVar

import numpy as np
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
from starlette.applications import Starlette
from starlette.datastructures import UploadFile
from starlette.exceptions import HTTPException
from starlette.requests import ClientDisconnect, Request
from starlette.responses import Response
from starlette.routing import Route

from kiln_serving import binary, connections, errors, grpc_service, jsontext, metrics
from kiln_serving.config import ServingConfig
from kiln_serving.dataplane import DataPlane
from kiln_serving.model import Model

log = logging.getLogger(__name__)

T = TypeVar("T")


# Binary tensors in a request body start on this boundary (a cache line; numpy and SIMD kernels need less).
_ALIGNMENT = 64


def _json(content: object, status: int = 200, headers: dict[str, str] | None = None) -> Response:
    body = jsontext.dumps(content)
    return Response(body, status_code=status, media_type="application/json", headers=headers)


def _error_response(err: errors.ServingError) -> Response:
    status = errors.status(err)[0]
    headers = {"Retry-After": str(err.retry_after_seconds)} if isinstance(err, errors.ServerBusy) else None
    return _json({"error": str(err)}, status, headers)


def declared_length(request: Request) -> int | None:
    """The Content-Length, if it is a plain number."""
    declared = request.headers.get("content-length")
    return int(declared) if declared is not None and declared.isascii() and declared.isdigit() else None


def _inflate(body: bytes, encoding: str, limit: int) -> bytes:
    """tritonclient's request_compression_algorithm; decompress no further than the limit (zip bombs)."""
    inflater = zlib.decompressobj(wbits=31 if encoding == "gzip" else 15)
    try:
        body = inflater.decompress(body, limit + 1)
    except zlib.error as err:
        raise errors.InvalidInput(f"body is not valid {encoding} data: {err}") from None
    if len(body) > limit:
        raise errors.PayloadTooLarge(f"decompressed request body is over the limit of {limit} bytes")
    return body


async def read_body(request: Request, dataplane: DataPlane) -> bytes:
    """The whole body, refused with errors.PayloadTooLarge as soon as it (or its decompressed form) passes the
    limit; a large compressed body is inflated on a codec thread."""
    limit = dataplane.config.max_body_bytes
    declared = declared_length(request)
    if declared is not None and declared > limit:
        raise errors.PayloadTooLarge(f"request body of {declared} bytes is over the limit of {limit} bytes")
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise errors.PayloadTooLarge(f"request body is over the limit of {limit} bytes")
        chunks.append(chunk)
    body = b"".join(chunks)
    del chunks
    encoding = request.headers.get("content-encoding", "identity").lower()
    if encoding in ("gzip", "deflate"):
        body = await dataplane.offload(len(body) * 8, _inflate, body, encoding, limit)
    elif encoding != "identity":
        raise errors.InvalidInput(f"unsupported Content-Encoding {encoding!r} (use gzip, deflate or none)")
    return body


async def read_tensor_body(request: Request, dataplane: DataPlane, align_at: int) -> bytes | memoryview:
    """Like read_body, but a plain body with a Content-Length is copied once, chunk by chunk, into a writable
    buffer placed so that its byte `align_at` (where binary tensors start) lands on a 64-byte boundary: the
    tensors are then used where they lie (codec.from_bytes) instead of being joined and copied again."""
    length = declared_length(request)
    encoding = request.headers.get("content-encoding", "identity").lower()
    if length is None or length > dataplane.config.max_body_bytes or encoding != "identity":
        return await read_body(request, dataplane)
    storage = np.empty(length + _ALIGNMENT, dtype=np.uint8)
    pad = -(storage.ctypes.data + align_at) % _ALIGNMENT
    buffer = storage.data[pad : pad + length]
    size = 0
    async for chunk in request.stream():
        # The HTTP parser frames the body by its Content-Length, so the chunks never run past it.
        buffer[size : size + len(chunk)] = chunk
        size += len(chunk)
    return buffer[:size]


async def _disconnect(request: Request) -> None:
    """Returns when the client of a request whose body was read goes away."""
    while (await request.receive())["type"] != "http.disconnect":
        pass


async def unless_disconnected(request: Request, work: Coroutine[Any, Any, T]) -> T:
    """Await `work` (the body already read), cancelling it when the client hangs up meanwhile: a request still
    queued leaves the batcher's queue (its place freed) and is counted as ClientClosed.

    Under kiln's own HTTP protocol the connection says when it is lost (connections.HANG_UP), and the request's
    task is cancelled from that callback: no watcher task per request. Other ASGI servers get one."""
    hang_up: asyncio.Future[None] | None = request.scope.get("extensions", {}).get(connections.HANG_UP)
    if hang_up is None:
        return await _watched(request, work)
    if hang_up.done():
        work.close()
        raise errors.ClientClosed("the client went away")
    task = asyncio.current_task()
    assert task is not None
    # Callbacks of a done future are already scheduled when it completes, so removing ours in `finally` may be too
    # late: `waiting` keeps a cancel that runs after the work ended from hitting whatever the task does next.
    waiting, cancelled = True, False

    def cancel(_: object) -> None:
        nonlocal cancelled
        if waiting:
            cancelled = task.cancel()

    hang_up.add_done_callback(cancel)
    try:
        return await work
    except asyncio.CancelledError:
        if not cancelled:  # a cancellation of someone else's (shutdown): not ours to swallow
            raise
        task.uncancel()
        raise errors.ClientClosed("the client went away") from None
    finally:
        waiting = False
        hang_up.remove_done_callback(cancel)


async def _watched(request: Request, work: Coroutine[Any, Any, T]) -> T:
    """unless_disconnected under another ASGI server: a task watching receive() for the disconnect."""
    task = asyncio.ensure_future(work)
    watch = asyncio.ensure_future(_disconnect(request))
    try:
        await asyncio.wait({task, watch}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        watch.cancel()
    if not task.done():
        task.cancel()
        raise errors.ClientClosed("the client went away")
    return task.result()


class Routes:
    """The HTTP face of a DataPlane: one method per route, errors turned into responses in `instrumented`."""

    def __init__(self, dataplane: DataPlane) -> None:
        self.dataplane = dataplane
        self.config = dataplane.config
        self.model = dataplane.model
        self.model_metrics = dataplane.model_metrics

    async def instrumented(self, request: Request, handle: Callable[[], Awaitable[Response]]) -> Response:
        """Count, time and gauge one inference request, and turn errors into responses."""
        name = request.path_params.get("name", "")
        known = name == self.model.name and request.path_params.get("version", self.model.version) == self.model.version
        started = time.perf_counter()
        self.model_metrics.in_flight.inc()
        try:
            async with self.dataplane.admit(declared_length(request)):
                with self.dataplane.batcher.arriving():
                    response = await handle()
        except (errors.ClientClosed, ClientDisconnect):
            # Nobody to answer; the status is recorded so that error-rate alerts do not count it.
            response = Response(status_code=metrics.CLIENT_CLOSED)
        except errors.ServingError as err:
            response = _error_response(err)
        except Exception as err:
            log.exception("unexpected error in %s", request.url.path)
            response = _error_response(errors.InferenceFailed(f"internal error: {err}"))
        finally:
            self.model_metrics.in_flight.dec()
        self.model_metrics.request(response.status_code, time.perf_counter() - started, known)
        return response

    # -- routes ---------------------------------------------------------------------------------------------

    async def server_metadata(self, _: Request) -> Response:
        return _json(self.dataplane.server_metadata())

    async def live(self, _: Request) -> Response:
        return _json({"live": True})

    async def root(self, _: Request) -> Response:
        """KServe's liveness at GET /."""
        return _json({"status": "alive"})

    async def statistics(self, request: Request) -> Response:
        p = request.path_params
        return _json(self.dataplane.statistics(p.get("name"), p.get("version")))

    async def server_ready(self, _: Request) -> Response:
        if self.dataplane.ready():
            return _json({"ready": True})
        return _json({"ready": False, "error": self.dataplane.not_ready_reason()}, 503)

    async def model_metadata(self, request: Request) -> Response:
        p = request.path_params
        return _json(self.dataplane.model_metadata(p["name"], p.get("version")))

    async def model_ready(self, request: Request) -> Response:
        p = request.path_params
        self.dataplane.check_model(p["name"], p.get("version"))
        if self.dataplane.ready():
            return _json({"name": p["name"], "ready": True})
        return _json({"name": p["name"], "ready": False, "error": self.dataplane.not_ready_reason()}, 503)

    async def infer(self, request: Request) -> Response:
        async def handle() -> Response:
            p = request.path_params
            self.dataplane.require_ready(p["name"], p.get("version"))
            header_length = binary.header_length(request.headers.get(binary.HEADER))
            if header_length is not None:  # binary tensors follow the JSON header (or, for 0, are all of it)
                body: bytes | memoryview = await read_tensor_body(request, self.dataplane, header_length)
            else:
                body = await read_body(request, self.dataplane)
            result = await unless_disconnected(
                request, self.dataplane.infer(p["name"], p.get("version"), body, header_length)
            )
            if result.header_length is None:
                return Response(result.body, media_type="application/json")
            return Response(
                result.body, media_type="application/octet-stream", headers={binary.HEADER: str(result.header_length)}
            )

        return await self.instrumented(request, handle)

    async def classify(self, request: Request) -> Response:
        async def handle() -> Response:
            p = request.path_params
            self.dataplane.require_ready(p["name"], p.get("version"))
            image = await self._image(request)
            top_k = request.query_params.get("top_k")
            return _json(
                await unless_disconnected(request, self.dataplane.classify(p["name"], p.get("version"), image, top_k))
            )

        return await self.instrumented(request, handle)

    async def _image(self, request: Request) -> bytes:
        """Raw image bytes, or the `file` field (else the first file) of a multipart upload."""
        if not request.headers.get("content-type", "").startswith("multipart/form-data"):
            return await read_body(request, self.dataplane)
        declared = declared_length(request)
        if declared is not None and declared > self.config.max_body_bytes:
            raise errors.PayloadTooLarge(
                f"request body of {declared} bytes is over the limit of {self.config.max_body_bytes} bytes"
            )
        try:
            async with request.form(max_part_size=self.config.max_body_bytes) as form:
                files = [v for _, v in form.multi_items() if isinstance(v, UploadFile)]
                chosen = form.get("file") if isinstance(form.get("file"), UploadFile) else None
                upload = chosen or (files[0] if files else None)
                if upload is None:
                    raise errors.InvalidInput("multipart upload has no file; send the image in a field named 'file'")
                assert isinstance(upload, UploadFile)
                return await upload.read()
        except HTTPException as err:  # starlette's multipart parser rejects malformed or oversized forms
            raise errors.InvalidInput(f"malformed multipart upload: {err.detail}") from None

    async def predict_v1(self, request: Request) -> Response:
        async def handle() -> Response:
            name = request.path_params["name"]
            self.dataplane.require_ready(name, None)
            body = await read_body(request, self.dataplane)
            return _json(await self.dataplane.predict_v1(name, body))

        return await self.instrumented(request, handle)

    async def models_v1(self, _: Request) -> Response:
        return _json({"models": [self.model.name]})

    async def model_v1(self, request: Request) -> Response:
        name = request.path_params["name"]
        self.dataplane.check_model(name, None)
        ready = self.dataplane.ready()
        return _json({"name": name, "ready": ready}, 200 if ready else 503)

    async def metrics_text(self, _: Request) -> Response:
        return Response(generate_latest(self.dataplane.metrics.registry), media_type=CONTENT_TYPE_LATEST)

    def routes(self) -> list[Route]:
        v = "/v2/models/{name}"
        vv = "/v2/models/{name}/versions/{version}"
        # Starlette tries the routes in order: inference first, as nearly every request is one.
        return [
            Route(f"{v}/infer", self.infer, methods=["POST"]),
            Route(f"{vv}/infer", self.infer, methods=["POST"]),
            Route("/v2/models/stats", self.statistics, methods=["GET"]),
            Route("/v2", self.server_metadata, methods=["GET"]),
            Route("/v2/health/live", self.live, methods=["GET"]),
            Route("/v2/health/ready", self.server_ready, methods=["GET"]),
            Route(v, self.model_metadata, methods=["GET"]),
            Route(vv, self.model_metadata, methods=["GET"]),
            Route(f"{v}/ready", self.model_ready, methods=["GET"]),
            Route(f"{vv}/ready", self.model_ready, methods=["GET"]),
            Route(f"{v}/classify", self.classify, methods=["POST"]),
            Route(f"{vv}/classify", self.classify, methods=["POST"]),
            Route("/v1/models", self.models_v1, methods=["GET"]),
            Route("/v1/models/{name}:predict", self.predict_v1, methods=["POST"]),
            Route("/v1/models/{name}", self.model_v1, methods=["GET"]),
            Route("/metrics", self.metrics_text, methods=["GET"]),
            Route(f"{v}/stats", self.statistics, methods=["GET"]),
            Route(f"{vv}/stats", self.statistics, methods=["GET"]),
            Route("/", self.root, methods=["GET"]),
        ]


async def _serving_error(_: Request, err: Exception) -> Response:
    assert isinstance(err, errors.ServingError)
    return _error_response(err)


async def _http_error(_: Request, err: Exception) -> Response:
    """Unknown paths and wrong methods answer in the protocol's error shape too."""
    assert isinstance(err, HTTPException)
    return _json({"error": f"{err.detail}"}, err.status_code, dict(err.headers or {}))


class App(Starlette):
    """Starlette, but an inference request goes straight to its handler.

    Nearly every request is one, and Starlette's middleware stack and router are a dozen coroutine layers that
    each request pays for on every resumption; Routes.instrumented already turns every error into a response,
    which is all those layers would add. Everything else takes Starlette's way."""

    def __init__(self, routes: Routes, **kwargs: Any) -> None:
        super().__init__(routes=routes.routes(), **kwargs)
        self.infer = routes.infer
        # The inference routes' own patterns (their parameters are plain strings): one place says the paths.
        self.infer_paths = [r.path_regex for r in self.routes if isinstance(r, Route) and r.endpoint == routes.infer]

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] == "http" and scope["method"] == "POST":
            for path in self.infer_paths:
                match = path.match(scope["path"])
                if match is not None:
                    scope["app"] = self
                    scope["path_params"] = match.groupdict()
                    response = await self.infer(Request(scope, receive, send))
                    await response(scope, receive, send)
                    return
        await super().__call__(scope, receive, send)


def build_app(
    config: ServingConfig, model: Model | None = None, registry: CollectorRegistry | None = None
) -> Starlette:
    """The ASGI app for one model (`model` defaults to the ONNX model config points at); its lifespan also
    runs the gRPC service on config.grpc_port, on the same event loop and data plane."""
    dataplane = DataPlane(config, model, registry)
    routes = Routes(dataplane)

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        grpc = await grpc_service.start(dataplane, config.host, config.grpc_port) if config.grpc_port else None
        app.state.grpc_port = grpc.port if grpc is not None else None
        dataplane.start()
        try:
            yield
        finally:
            # Reached after uvicorn stopped accepting and in-flight requests finished: drain the queue.
            if grpc is not None:
                await grpc.stop(config.graceful_shutdown_seconds)
            await dataplane.stop()
            log.info("server stopped")

    handlers: dict[Any, Callable[[Request, Exception], Awaitable[Response]]] = {
        errors.ServingError: _serving_error,
        HTTPException: _http_error,
    }
    app = App(routes, exception_handlers=handlers, lifespan=lifespan)
    app.state.dataplane = dataplane
    app.state.grpc_port = None
    return app
