"""The Open Inference Protocol over gRPC: KServe v2's / Triton's `inference.GRPCInferenceService`.

Runs on the HTTP server's event loop (over kiln's own HTTP/2 connections: http2.py, with http2_answers.py and
http2_wire.py under it, then grpc_wire.py) and shares its data plane, so gRPC requests batch with HTTP ones and land
in the same metrics. The message classes are the ones tritonclient ships (generated from Triton's
grpc_service.proto, a superset of KServe's), so tritonclient.grpc and KServe's InferenceGRPCClient work unchanged.
Tensors come as raw_input_contents or typed contents and always go back as raw_output_contents. The service's
other RPCs (ModelConfig, RepositoryIndex, shared memory, ...) answer UNIMPLEMENTED, naming the ones that are served.
"""

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from contextlib import AbstractAsyncContextManager
from contextvars import ContextVar
from dataclasses import dataclass
from typing import Any, TypeVar

import numpy as np
from google.protobuf import json_format
from google.protobuf.message import DecodeError
from tritonclient.grpc import service_pb2 as pb

from kiln_serving import codec, connections, errors, grpc_wire, http2, http2_wire, metrics, protobuf_walk, protocol
from kiln_serving.config import ServingConfig
from kiln_serving.dataplane import DataPlane, large, weight
from kiln_serving.http_body import ENCODINGS, inflate
from kiln_serving.model import Model, TensorInfo

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

_SERVICE = pb.DESCRIPTOR.services_by_name["GRPCInferenceService"]
# The most fields a large ModelInferRequest may have, at its top level (inputs, outputs, parameters, raw contents,
# ...) and in its inputs and outputs (name, shape, parameters, ...): past it the message is refused unparsed.
# protobuf's parser holds the GIL (a thread does not keep the loop free), and an empty entry costs 2 bytes on the
# wire but ~100 in memory: 60 MB of them took 2.9 GB and stalled the server; 5 MB of an input's parameters, 70 ms.
MAX_INFER_FIELDS = 4096
_INFER_FIELDS = pb.ModelInferRequest.DESCRIPTOR.fields_by_name
_RAW_INPUT_CONTENTS = _INFER_FIELDS["raw_input_contents"].number
_TENSORS = {_INFER_FIELDS["inputs"].number, _INFER_FIELDS["outputs"].number}
# What a large message's inputs have lifted out unparsed: their contents (see _contents), and a packed shape of
# more bytes than MAX_DIMS dimensions can take (10 bytes a varint at most): refused by its length alone.
_INPUT_FIELDS = pb.ModelInferRequest.InferInputTensor.DESCRIPTOR.fields_by_name
_CONTENTS_FIELD, _SHAPE_FIELD = _INPUT_FIELDS["contents"].number, _INPUT_FIELDS["shape"].number
_LIFTED = (_INFER_FIELDS["inputs"].number, {_CONTENTS_FIELD: 0, _SHAPE_FIELD: codec.MAX_DIMS * 10 + 1})
_CONTENTS_FIELDS = pb.InferTensorContents.DESCRIPTOR.fields_by_number
# Set while a call holds its admission: the transport admits a call by its length prefix before reading its body,
# and the Dispatcher admits by the (inflated) message's size; one call takes one place, never two.
_ADMITTED: ContextVar[bool] = ContextVar("kiln_grpc_admitted", default=False)


def _parameters(params: Any) -> dict[str, object]:
    """A protobuf map<string, InferParameter> as plain values."""
    out: dict[str, object] = {}
    for key, value in params.items():
        choice = value.WhichOneof("parameter_choice")
        out[key] = getattr(value, choice) if choice else None
    return out


def _typed(name: str, datatype: str, values: Any) -> np.ndarray:
    """Typed contents as an array, converted codec.SLICE_VALUES values at a time: numpy converts a protobuf
    repeated field holding the GIL throughout (a second for 15 M floats, on a codec thread yet stalling the event
    loop), and between slices the loop gets its turn. Slices are also twice as fast as one np.asarray. A value the
    datatype cannot hold (an INT8 of 300: the field is an int32) is the client's error."""
    dtype = codec.NUMPY_DTYPES[datatype]
    try:
        if len(values) <= codec.SLICE_VALUES:
            return np.asarray(values, dtype=dtype)
        out = np.empty(len(values), dtype=dtype)
        for start in range(0, len(values), codec.SLICE_VALUES):
            out[start : start + codec.SLICE_VALUES] = values[start : start + codec.SLICE_VALUES]
        return out
    except OverflowError as err:
        raise errors.InvalidInput(f"input '{name}': contents are not {datatype} values ({err})") from None


def _check_contents(spec: TensorInfo, field: str, present: list[str]) -> None:
    """InvalidInput for contents in a field other than the datatype's (else the count would be 0 and the error a
    puzzling "needs 6 elements, got 0")."""
    elsewhere = [name for name in present if name != field]
    if elsewhere:
        raise errors.InvalidInput(f"input '{spec.name}': {spec.datatype} values go in contents.{field}, "
                                  f"not contents.{elsewhere[0]}")  # fmt: skip


def _contents(spec: TensorInfo, field: str, pieces: list[memoryview]) -> Any:
    """A large message's input contents, parsed only once known to be in the field the input's datatype uses.

    BYTES elements are a field each, and protobuf parses them holding the GIL: 60 MB of empty strings sent for an
    FP32 input were parsed whole before the datatype was checked (probes waited 0.65 s; 1.2 GB). A numeric
    datatype's values come packed in one field or a few, so its contents are walked (up to MAX_INFER_FIELDS
    fields, stopping at the first in another field) before protobuf sees them; only an input that takes BYTES gets
    its elements parsed."""
    limit = 1 if spec.datatype == "BYTES" else MAX_INFER_FIELDS + 1
    try:
        walked = 0
        for piece in pieces:
            for number in protobuf_walk.numbers(piece, limit - walked):
                walked += 1
                if number in _CONTENTS_FIELDS:  # an unknown field is kept aside by protobuf, as here
                    _check_contents(spec, field, [_CONTENTS_FIELDS[number].name])
        if walked > MAX_INFER_FIELDS:
            raise errors.InvalidInput(f"input '{spec.name}': contents of more than {MAX_INFER_FIELDS} fields")
        contents = pb.InferTensorContents()
        for piece in pieces:
            contents.MergeFromString(piece)
    except DecodeError as err:
        raise errors.InvalidInput(f"input '{spec.name}': cannot parse its contents: {err}") from None
    return contents


class _LongShape(Sequence[int]):
    """A shape lifted out of a large message unparsed: more dimensions than MAX_DIMS for sure, which
    codec.parse_shape refuses by its length alone (a 7 MB shape held the GIL 88 ms in protobuf's parse)."""

    def __init__(self, dims: int) -> None:
        self.dims = dims

    def __len__(self) -> int:
        return self.dims

    def __getitem__(self, index: Any) -> Any:
        raise AssertionError("a shape this long is refused by its length")


def _varints(view: memoryview) -> int:
    """How many varints packed data holds: its bytes that end one (high bit clear), counted 1 MiB at a time."""
    data = np.frombuffer(view, np.uint8)
    return sum(int(np.count_nonzero(data[at : at + (1 << 20)] < 0x80)) for at in range(0, len(data), 1 << 20))


@dataclass(frozen=True)
class InferCall:
    """A ModelInferRequest as parsed: the message less its raw_input_contents, which travel beside it (read
    once, or for a large message never copied: see protobuf_walk), and the message's size on the wire. For a
    large message `inner` holds what its inputs had lifted out, not parsed yet (see _LIFTED)."""

    request: Any
    raw: list[bytes] | list[memoryview]
    size: int
    inner: list[list[tuple[int, memoryview]]] | None = None


def decode(model: Model, call: InferCall, allow_non_finite: bool) -> protocol.Request:
    """A ModelInferRequest (and its raw_input_contents) -> the protocol's Request (checked exactly like an HTTP
    one)."""
    request, raw = call.request, call.raw
    if not request.inputs:
        raise errors.InvalidInput("request needs 'inputs': a non-empty list of tensors")
    if raw and len(raw) != len(request.inputs):
        raise errors.InvalidInput(f"{len(raw)} raw_input_contents for {len(request.inputs)} inputs")
    tensors: dict[str, codec.Array] = {}
    for i, tensor in enumerate(request.inputs):
        lifted = call.inner[i] if call.inner is not None else []
        long_shape = [view for number, view in lifted if number == _SHAPE_FIELD]
        dims = _LongShape(len(tensor.shape) + sum(map(_varints, long_shape))) if long_shape else tensor.shape
        if long_shape and len(dims) <= codec.MAX_DIMS:  # so many bytes, so few varints: not protobuf's encoding
            raise errors.InvalidInput(f"input '{tensor.name}': cannot parse its shape")
        spec, shape = protocol.input_spec(model, tensor.name, tensor.datatype, dims)
        if spec.name in tensors:
            raise errors.InvalidInput(f"input '{spec.name}' is given twice")
        protocol.no_shared_memory(f"input '{spec.name}'", tensor.parameters)
        if raw:
            tensors[spec.name] = codec.from_bytes(spec.name, spec.datatype, shape, memoryview(raw[i]))
            continue
        field = _CONTENTS.get(spec.datatype)
        if field is None:
            raise errors.InvalidInput(f"input '{spec.name}': {spec.datatype} must be sent as raw_input_contents")
        if call.inner is None:
            contents = tensor.contents
            _check_contents(spec, field, [f.name for f, _ in contents.ListFields()])
        else:
            contents = _contents(spec, field, [view for number, view in lifted if number == _CONTENTS_FIELD])
        values = getattr(contents, field)
        if spec.datatype == "BYTES":
            flat = np.array([codec.text(v) for v in values], dtype=np.object_)
        else:
            flat = _typed(spec.name, spec.datatype, values)
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

    def methods(self) -> dict[str, grpc_wire.Method]:
        """The served RPCs by path, each parsing its own request message."""
        served = {}
        for rpc in _SERVICE.methods:
            call = getattr(self, rpc.name, None)
            if call is None:
                continue
            parse = self._parse_infer if rpc.name == "ModelInfer" else self._parser(getattr(pb, rpc.input_type.name))
            served[f"/{_SERVICE.full_name}/{rpc.name}"] = grpc_wire.Method(parse, call)
        return served

    def _parser(self, message_class: Any) -> Callable[[bytes | memoryview], Awaitable[Any]]:
        """A message parsed on a codec thread when large (as HTTP bodies are decoded), here when small."""

        async def parsed(message: bytes | memoryview) -> Any:
            return await self.dataplane.offload(len(message), message_class.FromString, message)

        return parsed

    async def _parse_infer(self, message: bytes | memoryview) -> InferCall:
        """A small ModelInferRequest is parsed here, whatever it holds (milliseconds at most; the common call is
        not walked twice). A large one is walked first (protobuf_walk): refused unparsed past MAX_INFER_FIELDS
        fields, its raw_input_contents lifted out uncopied, and only the rest left to protobuf."""
        if not large(len(message)):
            request = pb.ModelInferRequest.FromString(message)
            return InferCall(request, list(request.raw_input_contents), len(message))  # a read copies: once
        walked = protobuf_walk.split(message, _RAW_INPUT_CONTENTS, MAX_INFER_FIELDS, _TENSORS, _LIFTED)
        if walked.fields > MAX_INFER_FIELDS:
            raise grpc_wire.Abort("INVALID_ARGUMENT", f"a ModelInferRequest of more than {MAX_INFER_FIELDS} fields "
                                  "(inputs, outputs, parameters, and theirs) is refused unparsed")  # fmt: skip
        request = await self.dataplane.offload(len(walked.rest), pb.ModelInferRequest.FromString, walked.rest)
        return InferCall(request, walked.lifted, len(message), walked.inner)

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
        return grpc_wire.Abort("UNIMPLEMENTED", f"kiln does not serve {name}; it serves {served}")

    async def inflate(self, message: memoryview, encoding: str) -> bytes:
        """A compressed request message, decompressed within max_body_bytes (on a codec thread when large)."""
        limit = self.dataplane.config.max_body_bytes
        return await self._call(lambda: self.dataplane.offload(len(message) * 8, inflate, message, encoding, limit))

    async def _call(self, work: Callable[[], Awaitable[T]]) -> T:
        try:
            return await work()
        except errors.ServingError as err:
            raise grpc_wire.Abort(errors.status(err)[1], str(err)) from None

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

    async def ModelInfer(self, call: InferCall) -> Any:  # noqa: N802
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
                decoded = await dataplane.offload(heavy, decode, model, call, allow)
                outputs = await dataplane.run(decoded)
                out_bytes = sum(a.nbytes for a in outputs.values())  # raw_output_contents: only copied
                return await dataplane.offload(weight(0, out_bytes), encode, model, decoded, outputs)
        except errors.ServingError as err:
            status, code = errors.status(err)
            raise grpc_wire.Abort(code, str(err)) from None
        except asyncio.CancelledError:  # the client cancelled, went away or its deadline passed: no error of ours
            status = metrics.CLIENT_CLOSED
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
    server: http2.Server
    port: int

    async def stop(self, grace_seconds: float) -> None:
        await self.server.stop(grace_seconds)


def settings(dataplane: DataPlane) -> http2_wire.Settings:
    """The HTTP/2 connections' handler and limits, from the same settings as the HTTP/1.1 server's."""
    config: ServingConfig = dataplane.config
    service = Service(dataplane)
    too_large = f"request over the {config.max_body_bytes}-byte limit (max_body_bytes)"
    return http2_wire.Settings(
        handler=grpc_wire.Dispatcher(service.methods(), service.unknown, ENCODINGS, service.inflate, service.admit),
        oversize=grpc_wire.error("RESOURCE_EXHAUSTED", too_large, ENCODINGS),
        max_body=config.max_body_bytes + _ENVELOPE_BYTES,
        body_size=grpc_wire.body_size,
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
    server = http2.Server(settings(dataplane))
    await server.start(sock)
    bound: int = sock.getsockname()[1]
    log.info("gRPC inference service on %s:%d", host, bound)
    return Running(server, bound)
