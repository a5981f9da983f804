"""The Open Inference Protocol over gRPC: KServe v2's / Triton's `inference.GRPCInferenceService`.

Runs on the HTTP server's event loop and shares its data plane, so gRPC requests batch with HTTP ones and
land in the same metrics. The message classes are the ones tritonclient ships (generated from Triton's
grpc_service.proto, a superset of KServe's), so tritonclient.grpc and KServe's InferenceGRPCClient work
unchanged. Tensors come as raw_input_contents or typed contents and always go back as raw_output_contents.
The service's other RPCs (ModelConfig, RepositoryIndex, shared memory, ...) answer UNIMPLEMENTED, naming the ones
that are served.
"""

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, TypeVar

import grpc
import numpy as np
from google.protobuf import json_format
from tritonclient.grpc import service_pb2 as pb
from tritonclient.grpc import service_pb2_grpc as pb_grpc

from kiln_serving import codec, errors, metrics, protocol
from kiln_serving.dataplane import DataPlane, weight
from kiln_serving.model import Model

log = logging.getLogger(__name__)

T = TypeVar("T")

# Room for the message's own fields on top of the tensors (max_body_bytes) in the receive limit.
_ENVELOPE_BYTES = 64 * 1024

# OIP datatype -> the InferTensorContents field holding it (FP16 and BF16 only travel raw).
_CONTENTS = {
    "BOOL": "bool_contents", "INT8": "int_contents", "INT16": "int_contents", "INT32": "int_contents",
    "INT64": "int64_contents", "UINT8": "uint_contents", "UINT16": "uint_contents", "UINT32": "uint_contents",
    "UINT64": "uint64_contents", "FP32": "fp32_contents", "FP64": "fp64_contents", "BYTES": "bytes_contents",
}  # fmt: skip

# Every RPC of the service, as add_GRPCInferenceServiceServicer_to_server looks them up on the servicer.
_RPCS = frozenset(method.name for method in pb.DESCRIPTOR.services_by_name["GRPCInferenceService"].methods)


def _parameters(params: Any) -> dict[str, object]:
    """A protobuf map<string, InferParameter> as plain values."""
    out: dict[str, object] = {}
    for key, value in params.items():
        choice = value.WhichOneof("parameter_choice")
        out[key] = getattr(value, choice) if choice else None
    return out


def decode(model: Model, request: Any, raw: list[bytes], allow_non_finite: bool) -> protocol.Request:
    """A ModelInferRequest (and its raw_input_contents, read once) -> the protocol's Request (checked exactly
    like an HTTP one)."""
    if not request.inputs:
        raise errors.InvalidInput("request needs 'inputs': a non-empty list of tensors")
    if raw and len(raw) != len(request.inputs):
        raise errors.InvalidInput(f"{len(raw)} raw_input_contents for {len(request.inputs)} inputs")
    tensors: dict[str, codec.Array] = {}
    for i, tensor in enumerate(request.inputs):
        spec, shape = protocol.input_spec(model, tensor.name, tensor.datatype, list(tensor.shape))
        if spec.name in tensors:
            raise errors.InvalidInput(f"input '{spec.name}' is given twice")
        if raw:
            tensors[spec.name] = codec.from_bytes(spec.name, spec.datatype, shape, memoryview(raw[i]))
            continue
        field = _CONTENTS.get(spec.datatype)
        if field is None:
            raise errors.InvalidInput(f"input '{spec.name}': {spec.datatype} must be sent as raw_input_contents")
        values = getattr(tensor.contents, field)
        if spec.datatype == "BYTES":
            flat = np.array([codec.text(v) for v in values], dtype=np.object_)
        else:
            flat = np.asarray(values, dtype=codec.NUMPY_DTYPES[spec.datatype])
        tensors[spec.name] = codec.sized(spec.name, shape, flat)
    requested = [(o.name, _parameters(o.parameters)) for o in request.outputs]
    chosen = protocol.wanted(model, requested, binary_default=True)
    return protocol.Request(protocol.complete(model, tensors, allow_non_finite), chosen, request.id or None)


def encode(model: Model, request: protocol.Request, outputs: dict[str, codec.Array]) -> Any:
    """The ModelInferResponse, every output as raw_output_contents (what tritonclient.grpc reads)."""
    response = pb.ModelInferResponse(model_name=model.name, model_version=model.version, id=request.id or "")
    for want, array in protocol.results(model, request, outputs):
        response.outputs.add(name=want.name, datatype=codec.datatype_of(array), shape=list(array.shape))
        response.raw_output_contents.append(codec.to_bytes(array))
    return response


class Service:
    """The RPCs; errors end the call with the code errors.STATUS gives them."""

    def __init__(self, dataplane: DataPlane) -> None:
        self.dataplane = dataplane

    def __getattr__(self, name: str) -> Callable[[Any, Any], Awaitable[Any]]:
        """An RPC of the service that kiln does not serve: UNIMPLEMENTED with a message, not grpc's default (a
        NotImplementedError the server logs with its traceback on every call)."""
        if name not in _RPCS:
            raise AttributeError(name)
        served = ", ".join(sorted(rpc for rpc in _RPCS if rpc in type(self).__dict__))

        async def unimplemented(request: Any, context: Any) -> Any:
            await context.abort(grpc.StatusCode.UNIMPLEMENTED, f"kiln does not serve {name}; it serves {served}")

        return unimplemented

    async def _call(self, context: Any, work: Callable[[], Awaitable[T]]) -> T:
        try:
            return await work()
        except errors.ServingError as err:
            await context.abort(grpc.StatusCode[errors.status(err)[1]], str(err))
            raise  # abort raises; this line is for the type checker

    async def ServerLive(self, request: Any, context: Any) -> Any:  # noqa: N802 (the protocol's names)
        return pb.ServerLiveResponse(live=True)

    async def ServerReady(self, request: Any, context: Any) -> Any:  # noqa: N802
        return pb.ServerReadyResponse(ready=self.dataplane.ready())

    async def ModelReady(self, request: Any, context: Any) -> Any:  # noqa: N802
        async def work() -> Any:
            self.dataplane.check_model(request.name, request.version or None)
            return pb.ModelReadyResponse(ready=self.dataplane.ready())

        return await self._call(context, work)

    async def ServerMetadata(self, request: Any, context: Any) -> Any:  # noqa: N802
        meta = self.dataplane.server_metadata()
        return pb.ServerMetadataResponse(name=meta["name"], version=meta["version"], extensions=meta["extensions"])

    async def ModelMetadata(self, request: Any, context: Any) -> Any:  # noqa: N802
        async def work() -> Any:
            model = self.dataplane.require_ready(request.name, request.version or None)
            meta = pb.ModelMetadataResponse(name=model.name, versions=[model.version], platform=model.platform)
            for tensor in model.inputs:
                meta.inputs.add(name=tensor.name, datatype=tensor.datatype, shape=list(tensor.shape))
            for tensor in model.outputs:
                meta.outputs.add(name=tensor.name, datatype=tensor.datatype, shape=list(tensor.shape))
            return meta

        return await self._call(context, work)

    async def ModelStatistics(self, request: Any, context: Any) -> Any:  # noqa: N802
        # The HTTP statistics extension's JSON is the proto3 JSON form of this message: one source, two encodings.
        async def work() -> Any:
            stats = self.dataplane.statistics(request.name or None, request.version or None)
            return json_format.ParseDict(stats, pb.ModelStatisticsResponse())

        return await self._call(context, work)

    async def ModelInfer(self, request: Any, context: Any) -> Any:  # noqa: N802
        dataplane, model_metrics = self.dataplane, self.dataplane.model_metrics
        size = request.ByteSize()
        raw = list(request.raw_input_contents)  # each read of a bytes field copies it
        raw_bytes = sum(map(len, raw))
        started = time.perf_counter()
        status = 200
        model_metrics.in_flight.inc()
        try:
            async with dataplane.admit(size):
                with dataplane.batcher.arriving():
                    model = dataplane.require_ready(request.model_name, request.model_version or None)
                    heavy, allow = weight(size - raw_bytes, raw_bytes), dataplane.config.allow_non_finite
                    decoded = await dataplane.offload(heavy, decode, model, request, raw, allow)
                    outputs = await dataplane.run(decoded)
                    out_bytes = sum(a.nbytes for a in outputs.values())  # raw_output_contents: only copied
                    return await dataplane.offload(weight(0, out_bytes), encode, model, decoded, outputs)
        except errors.ServingError as err:
            status, code = errors.status(err)
            await context.abort(grpc.StatusCode[code], str(err))
        except asyncio.CancelledError:  # the client cancelled or went away: no error of ours
            status = metrics.CLIENT_CLOSED
            raise
        except Exception as err:
            log.exception("unexpected error in ModelInfer")
            status = 500
            await context.abort(grpc.StatusCode.INTERNAL, f"internal error: {err}")
        finally:
            model_metrics.in_flight.dec()
            known = request.model_name == dataplane.model.name and request.model_version in (
                "",
                dataplane.model.version,
            )
            model_metrics.request(status, time.perf_counter() - started, known)
        raise AssertionError("unreachable: abort raises")


@dataclass
class Running:
    server: grpc.aio.Server
    port: int

    async def stop(self, grace_seconds: float) -> None:
        await self.server.stop(grace_seconds)


async def start(dataplane: DataPlane, host: str, port: int) -> Running:
    """Listen on host:port (0 = any free) on the running event loop."""
    limit = dataplane.config.max_body_bytes + _ENVELOPE_BYTES
    server = grpc.aio.server(options=[("grpc.max_receive_message_length", limit),
                                      ("grpc.max_send_message_length", -1)])  # fmt: skip
    pb_grpc.add_GRPCInferenceServiceServicer_to_server(Service(dataplane), server)
    bound = server.add_insecure_port(f"[{host}]:{port}" if ":" in host else f"{host}:{port}")
    await server.start()
    log.info("gRPC inference service on %s:%d", host, bound)
    return Running(server, bound)
