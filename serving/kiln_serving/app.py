"""HTTP routes of the server (Open Inference Protocol v2, KServe v1, classify, metrics) on Starlette.

Routes only: the data plane does the protocol work. Domain errors become HTTP statuses in `_error_answer`,
the one place that knows the mapping, and every error body is the protocol's {"error": "..."}.
"""

import asyncio
import contextlib
import logging
import re
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine, Mapping
from typing import Any

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
from starlette.applications import Starlette
from starlette.datastructures import UploadFile
from starlette.exceptions import HTTPException
from starlette.requests import ClientDisconnect, Request
from starlette.responses import Response
from starlette.routing import Route

from kiln_serving import binary, direct, errors, grpc_service, jsonwrite, metrics
from kiln_serving.config import ServingConfig
from kiln_serving.dataplane import DataPlane, InferResponse
from kiln_serving.direct import Answer
from kiln_serving.http_body import (
    check_declared,
    declared_length,
    hang_up_of,
    read_body,
    read_tensor_body,
    unless_disconnected,
    unless_gone,
)
from kiln_serving.model import Model

log = logging.getLogger(__name__)


def _answer(content: object, status: int = 200, headers: Mapping[str, str] | None = None) -> Answer:
    return Answer(status, jsonwrite.dumps(content), headers=headers)


def _json(content: object, status: int = 200, headers: Mapping[str, str] | None = None) -> Response:
    return respond(_answer(content, status, headers))


def respond(answer: Answer) -> Response:
    """An Answer as the ASGI path sends it."""
    return Response(answer.body, answer.status, dict(answer.headers or {}), answer.content_type)


def _error_answer(err: errors.ServingError) -> Answer:
    status = errors.status(err)[0]
    headers = {"Retry-After": str(err.retry_after_seconds)} if isinstance(err, errors.ServerBusy) else None
    return _answer({"error": str(err)}, status, headers)


class Routes:
    """The HTTP face of a DataPlane: one method per route, errors turned into responses in `instrumented`."""

    def __init__(self, dataplane: DataPlane) -> None:
        self.dataplane = dataplane
        self.config = dataplane.config
        self.model = dataplane.model
        self.model_metrics = dataplane.model_metrics

    async def instrumented(
        self, path: str, name: str, version: str | None, declared: int | None,
        handle: Callable[[], Awaitable[Answer]], hang_up: asyncio.Future[int | None] | None, admitted: bool = False,
    ) -> Answer:  # fmt: skip
        """Count, time and gauge one inference request, and turn errors into answers. `hang_up` is the
        connection's (connections.py), whose result is the status the server answered if it, not the client, ended
        the request (a body timeout's 408)."""
        known = name == self.model.name and (version or self.model.version) == self.model.version
        started = time.perf_counter()
        self.model_metrics.in_flight.inc()
        try:
            async with self.dataplane.admit(declared, admitted):
                with self.dataplane.batcher.arriving():
                    answer = await handle()
        except (errors.ClientClosed, ClientDisconnect):
            # Nobody to answer; the status is recorded so that error-rate alerts do not count it.
            ended_by = hang_up.result() if hang_up is not None and hang_up.done() else None
            answer = Answer(ended_by or metrics.CLIENT_CLOSED, b"")
        except errors.ServingError as err:
            answer = _error_answer(err)
        except Exception as err:
            log.exception("unexpected error in %s", path)
            answer = _error_answer(errors.InferenceFailed(f"internal error: {err}"))
        finally:
            self.model_metrics.in_flight.dec()
        self.model_metrics.request(answer.status, time.perf_counter() - started, known)
        return answer

    async def _instrumented(self, request: Request, handle: Callable[[], Awaitable[Answer]]) -> Response:
        p = request.path_params
        return respond(await self.instrumented(request.url.path, p.get("name", ""), p.get("version"),
                                               declared_length(request), handle, hang_up_of(request)))  # fmt: skip

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
        async def read() -> tuple[bytes | memoryview, int | None]:
            header_length = binary.header_length(request.headers.getlist(binary.HEADER))
            if header_length is not None:  # binary tensors follow the JSON header (or, for 0, are all of it)
                return await read_tensor_body(request, self.dataplane, header_length), header_length
            return await read_body(request, self.dataplane), None

        def handle() -> Awaitable[Answer]:
            p = request.path_params
            return self._infer(p["name"], p.get("version"), read, lambda work: unless_disconnected(request, work))

        return await self._instrumented(request, handle)

    async def infer_direct(self, call: direct.InferCall) -> Answer:
        """An inference request that skipped ASGI (direct.py): the same work, the same answers."""

        async def read() -> tuple[memoryview, int]:
            return await call.body(), call.header_length

        def handle() -> Awaitable[Answer]:
            return self._infer(call.name, call.version, read, lambda work: unless_gone(call.hang_up, work))

        return await self.instrumented(call.path, call.name, call.version, call.length, handle, call.hang_up,
                                       call.admitted)  # fmt: skip

    async def _infer(
        self, name: str, version: str | None,
        read: Callable[[], Awaitable[tuple[bytes | memoryview, int | None]]],
        unless_gone: Callable[[Coroutine[Any, Any, InferResponse]], Awaitable[InferResponse]],
    ) -> Answer:  # fmt: skip
        """Refuse before reading the body when the model is not there; `read` gives the body and its
        Inference-Header-Content-Length."""
        self.dataplane.require_ready(name, version)
        body, header_length = await read()
        result = await unless_gone(self.dataplane.infer(name, version, body, header_length))
        if result.header_length is None:
            return Answer(200, result.body)
        return Answer(200, result.body, "application/octet-stream", {binary.HEADER: str(result.header_length)})

    async def classify(self, request: Request) -> Response:
        async def handle() -> Answer:
            p = request.path_params
            self.dataplane.require_ready(p["name"], p.get("version"))
            image = await self._image(request)
            top_k = request.query_params.get("top_k")
            return _answer(
                await unless_disconnected(request, self.dataplane.classify(p["name"], p.get("version"), image, top_k))
            )

        return await self._instrumented(request, handle)

    async def _image(self, request: Request) -> bytes:
        """Raw image bytes, or the `file` field (else the first file) of a multipart upload."""
        if not request.headers.get("content-type", "").startswith("multipart/form-data"):
            return await read_body(request, self.dataplane)
        check_declared(declared_length(request), self.config.max_body_bytes)
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
        async def handle() -> Answer:
            name = request.path_params["name"]
            self.dataplane.require_ready(name, None)
            body = await read_body(request, self.dataplane)
            return Answer(200, await self.dataplane.predict_v1(name, body))

        return await self._instrumented(request, handle)

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
    return respond(_error_answer(err))


# Triton's HTTP extensions kiln does not serve, by path: their 404 names the extension, as gRPC's UNIMPLEMENTED
# names the RPC, instead of a bare "Not Found" that reads like a typo in the URL.
_MODEL = r"/v2/models/[^/]+(?:/versions/[^/]+)?"
_UNSERVED = [
    (re.compile(r"/v2/repository(?:/.*)?"), "model repository"),
    (re.compile(r"/v2/(?:system|cuda)sharedmemory(?:/.*)?"), "shared memory"),
    (re.compile(_MODEL + "/config"), "model configuration"),
    (re.compile(f"(?:{_MODEL}|/v2)/trace/setting"), "trace"),
    (re.compile(r"/v2/logging"), "logging"),
    (re.compile(_MODEL + "/generate(?:_stream)?"), "generate"),
]


async def _http_error(request: Request, err: Exception) -> Response:
    """Unknown paths and wrong methods answer in the protocol's error shape too."""
    assert isinstance(err, HTTPException)
    message = f"{err.detail}"
    if err.status_code == 404:
        unserved = next((name for path, name in _UNSERVED if path.fullmatch(request.url.path)), None)
        if unserved is not None:
            message = f"kiln does not serve Triton's {unserved} extension; GET /v2 lists the extensions it serves"
    return _json({"error": message}, err.status_code, dict(err.headers or {}))


class App(Starlette):
    """Starlette, but an inference request goes straight to its handler.

    Nearly every request is one, and Starlette's middleware stack and router are a dozen coroutine layers that
    each request pays for on every resumption; Routes.instrumented already turns every error into a response,
    which is all those layers would add. Everything else takes Starlette's way."""

    def __init__(self, routes: Routes, **kwargs: Any) -> None:
        super().__init__(routes=routes.routes(), **kwargs)
        self.router.redirect_slashes = False  # a path with a trailing slash is unknown (404 in JSON), as in Triton
        self.infer = routes.infer
        # The inference routes' own patterns (their parameters are plain strings): one place says the paths.
        self.infer_paths = [r.path_regex for r in self.routes if isinstance(r, Route) and r.endpoint == routes.infer]
        # What kiln's HTTP protocol answers without ASGI at all (direct.py; other ASGI servers never use it).
        self.direct = direct.Route(
            self.infer_paths, routes.infer_direct, routes.config.max_body_bytes, routes.dataplane.admit_now
        )

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


def build_app(config: ServingConfig, model: Model | None = None, registry: CollectorRegistry | None = None) -> App:
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
