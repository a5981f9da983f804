"""The Open Inference Protocol over gRPC: KServe v2's / Triton's `inference.GRPCInferenceService`.

Runs on the HTTP server's event loop (over kiln's own HTTP/2 server: http2_server.py and http2.py, with
http2_answers.py and http2_wire.py under it, then grpc_wire.py) and shares its data plane, so gRPC requests batch
with HTTP ones and land in the same metrics. The message classes are the ones tritonclient ships (generated from
Triton's grpc_service.proto, a superset of KServe's), so tritonclient.grpc and KServe's InferenceGRPCClient work
unchanged. Tensors come as raw_input_contents or typed contents and always go back as raw_output_contents. The service's
other RPCs (ModelConfig, RepositoryIndex, shared memory, ...) answer UNIMPLEMENTED, naming the ones that are served.
gRPC's standard health Check (grpc.health.v1) is served beside it, as Triton serves it.
"""

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import AbstractAsyncContextManager
from contextvars import ContextVar
from dataclasses import dataclass
from typing import Any, TypeVar

from google.protobuf import json_format
from grpc_health.v1 import health_pb2
from tritonclient.grpc import service_pb2 as pb

from kiln_serving import connections, errors, grpc_tensors, grpc_wire, http2_server, http2_wire, metrics
from kiln_serving.config import ServingConfig
from kiln_serving.dataplane import DataPlane, large, weight
from kiln_serving.http_body import ENCODINGS, inflate

log = logging.getLogger(__name__)

T = TypeVar("T")

# Room for the message's own fields on top of the tensors (max_body_bytes) in the receive limit.
_ENVELOPE_BYTES = 64 * 1024

_SERVICE = pb.DESCRIPTOR.services_by_name["GRPCInferenceService"]
# gRPC's standard health service, served beside the inference one (as Triton serves it) for Kubernetes' grpc probes
# and grpc-health-probe: its Check only (Watch streams, and kiln's gRPC calls are unary).
_HEALTH_CHECK = f"/{health_pb2.DESCRIPTOR.services_by_name['Health'].full_name}/Check"
# Set while a call holds its admission: the transport admits a call by its length prefix before reading its body,
# and the Dispatcher admits by the (inflated) message's size; one call takes one place, never two.
_ADMITTED: ContextVar[bool] = ContextVar("kiln_grpc_admitted", default=False)


class Service:
    """The RPCs; errors end the call with the code errors.STATUS gives them."""

    def __init__(self, dataplane: DataPlane) -> None:
        self.dataplane = dataplane

    def methods(self) -> dict[str, grpc_wire.Method]:
        """The served RPCs by path, each parsing its own request message."""
        served = {}
        for rpc in _SERVICE.methods:
            call = getattr(self, rpc.name, None)
            if call is None:
                continue
            parse = self._parse_infer if rpc.name == "ModelInfer" else self._parser(getattr(pb, rpc.input_type.name))
            served[f"/{_SERVICE.full_name}/{rpc.name}"] = grpc_wire.Method(parse, call)
        served[_HEALTH_CHECK] = grpc_wire.Method(self._parser(health_pb2.HealthCheckRequest), self.health_check)
        return served

    def _parser(self, message_class: Any) -> Callable[[bytes | memoryview], Awaitable[Any]]:
        """A message parsed on a codec thread when large (as HTTP bodies are decoded), here when small."""

        async def parsed(message: bytes | memoryview) -> Any:
            return await self.dataplane.offload(len(message), message_class.FromString, message)

        return parsed

    async def _parse_infer(self, message: bytes | memoryview) -> grpc_tensors.InferCall:
        """A small ModelInferRequest is parsed here, whatever it holds (milliseconds at most; the common call is
        not walked twice). A large one is walked first (protobuf_walk): refused unparsed past MAX_INFER_FIELDS
        fields, its raw_input_contents lifted out uncopied, and only the rest left to protobuf (grpc_tensors.walk)."""
        if not large(len(message)):
            request = pb.ModelInferRequest.FromString(message)
            raw = list(request.raw_input_contents)  # a read copies: once
            return grpc_tensors.InferCall(request, raw, len(message), key=grpc_tensors.layout_key(message, raw))
        walked = grpc_tensors.walk(message)
        request = await self.dataplane.offload(len(walked.rest), pb.ModelInferRequest.FromString, walked.rest)
        return grpc_tensors.InferCall(request, walked.lifted, len(message), walked.inner)

    def admit(self, size: int) -> AbstractAsyncContextManager[None]:
        """DataPlane.admit for a call of `size` bytes, unless the call already holds its admission or is small
        (nothing to wait for: the common call pays for no context managers)."""
        if not large(size) or _ADMITTED.get():
            return contextlib.nullcontext()
        return self._admitted(size)

    @contextlib.asynccontextmanager
    async def _admitted(self, size: int) -> AsyncIterator[None]:
        async with self.dataplane.admit(size):
            token = _ADMITTED.set(True)
            try:
                yield
            finally:
                _ADMITTED.reset(token)

    def unknown(self, path: str) -> grpc_wire.Abort:
        """UNIMPLEMENTED for a path kiln does not serve, naming the RPCs it does."""
        served = ", ".join(sorted(rpc.name for rpc in _SERVICE.methods if hasattr(self, rpc.name)))
        name = path.rsplit("/", 1)[-1] if path.startswith(f"/{_SERVICE.full_name}/") else path
        return grpc_wire.Abort("UNIMPLEMENTED", f"kiln does not serve {name}; it serves {served} and {_HEALTH_CHECK}")

    async def inflate(self, message: memoryview, encoding: str) -> bytes:
        """A compressed request message, decompressed within max_body_bytes (on a codec thread when large)."""
        limit = self.dataplane.config.max_body_bytes
        return await self._call(lambda: self.dataplane.offload(len(message) * 8, inflate, message, encoding, limit))

    async def _call(self, work: Callable[[], Awaitable[T]]) -> T:
        try:
            return await work()
        except errors.ServingError as err:
            raise grpc_wire.Abort(errors.status(err)[1], str(err)) from None

    async def health_check(self, request: Any) -> Any:
        """SERVING once the model is ready (Triton's answer: its server readiness), else NOT_SERVING. The service
        asked about is the server ("") or the inference service; the health protocol answers NOT_FOUND to others."""
        if request.service not in ("", _SERVICE.full_name):
            raise grpc_wire.Abort("NOT_FOUND", f"no service {request.service!r} here; ask about \"\" (the server) or "
                                               f"{_SERVICE.full_name}")  # fmt: skip
        ready = self.dataplane.ready()
        return health_pb2.HealthCheckResponse(status="SERVING" if ready else "NOT_SERVING")

    async def ServerLive(self, request: Any) -> Any:  # noqa: N802 (the protocol's names)
        return pb.ServerLiveResponse(live=True)

    async def ServerReady(self, request: Any) -> Any:  # noqa: N802
        return pb.ServerReadyResponse(ready=self.dataplane.ready())

    async def ModelReady(self, request: Any) -> Any:  # noqa: N802
        async def work() -> Any:
            self.dataplane.check_model(request.name, request.version or None)
            return pb.ModelReadyResponse(ready=self.dataplane.ready())

        return await self._call(work)

    async def ServerMetadata(self, request: Any) -> Any:  # noqa: N802
        meta = self.dataplane.server_metadata()
        return pb.ServerMetadataResponse(name=meta["name"], version=meta["version"], extensions=meta["extensions"])

    async def ModelMetadata(self, request: Any) -> Any:  # noqa: N802
        async def work() -> Any:
            model = self.dataplane.require_ready(request.name, request.version or None)
            meta = pb.ModelMetadataResponse(name=model.name, versions=[model.version], platform=model.platform)
            for tensor in model.inputs:
                meta.inputs.add(name=tensor.name, datatype=tensor.datatype, shape=list(tensor.shape))
            for tensor in model.outputs:
                meta.outputs.add(name=tensor.name, datatype=tensor.datatype, shape=list(tensor.shape))
            return meta

        return await self._call(work)

    async def ModelStatistics(self, request: Any) -> Any:  # noqa: N802
        # The HTTP statistics extension's JSON is the proto3 JSON form of this message: one source, two encodings.
        async def work() -> Any:
            stats = self.dataplane.statistics(request.name or None, request.version or None)
            return json_format.ParseDict(stats, pb.ModelStatisticsResponse())

        return await self._call(work)

    async def ModelInfer(self, call: grpc_tensors.InferCall) -> Any:  # noqa: N802
        dataplane, model_metrics = self.dataplane, self.dataplane.model_metrics
        request, raw = call.request, call.raw
        raw_bytes = sum(map(len, raw))
        started = time.perf_counter()
        status = 200
        model_metrics.in_flight.inc()
        try:  # admitted by its size already (Service.admit, by the transport or the Dispatcher)
            with dataplane.batcher.arriving():
                model = dataplane.require_ready(request.model_name, request.model_version or None)
                heavy, allow = weight(call.size - raw_bytes, raw_bytes), dataplane.config.allow_non_finite
                seen = dataplane.layouts  # requests' descriptions seen before
                decoded = await dataplane.offload(heavy, grpc_tensors.decode_known, model, call, allow, seen)
                outputs = await dataplane.run(decoded)
                out_bytes = sum(a.nbytes for a in outputs.values())  # raw_output_contents: only copied
                return await dataplane.offload(weight(0, out_bytes), grpc_tensors.framed, model, decoded, outputs)
        except errors.ServingError as err:
            status, code = errors.status(err)
            raise grpc_wire.Abort(code, str(err)) from None
        except asyncio.CancelledError:  # the client cancelled or went away (no error of ours), or its deadline passed
            status = metrics.DEADLINE_EXCEEDED if grpc_wire.past_deadline() else metrics.CLIENT_CLOSED
            raise
        except Exception as err:
            log.exception("unexpected error in ModelInfer")
            status = 500
            raise grpc_wire.Abort("INTERNAL", f"internal error: {err}") from None
        finally:
            model_metrics.in_flight.dec()
            known = request.model_name == dataplane.model.name and request.model_version in (
                "",
                dataplane.model.version,
            )
            model_metrics.request(status, time.perf_counter() - started, known)


@dataclass
class Running:
    server: http2_server.Server
    port: int

    async def stop(self, grace_seconds: float) -> None:
        await self.server.stop(grace_seconds)


def settings(dataplane: DataPlane) -> http2_wire.Settings:
    """The HTTP/2 connections' handler and limits, from the same settings as the HTTP/1.1 server's."""
    config: ServingConfig = dataplane.config
    service = Service(dataplane)
    too_large = f"request over the {config.max_body_bytes}-byte limit (max_body_bytes)"
    dispatcher = grpc_wire.Dispatcher(service.methods(), service.unknown, ENCODINGS, service.inflate, service.admit)
    return http2_wire.Settings(
        handler=dispatcher,
        refuse=dispatcher.refusal,
        oversize=grpc_wire.error("RESOURCE_EXHAUSTED", too_large, ENCODINGS),
        max_body=config.max_body_bytes + _ENVELOPE_BYTES,
        body_size=grpc_wire.call_size,
        admit=service.admit,
        max_header_bytes=config.max_header_bytes,
        header_timeout=config.header_timeout_seconds,
        body_timeout=config.body_timeout_seconds,
        keep_alive_timeout=config.keep_alive_timeout_seconds,
        max_connections=connections.connection_cap(config.max_connections),
    )


async def start(dataplane: DataPlane, host: str, port: int) -> Running:
    """Listen on host:port (0 = any free) on the running event loop."""
    sock = connections.bind(host, port)
    server = http2_server.Server(settings(dataplane))
    await server.start(sock)
    bound: int = sock.getsockname()[1]
    log.info("gRPC inference service on %s:%d", host, bound)
    return Running(server, bound)
