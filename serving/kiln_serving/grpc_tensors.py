"""ModelInfer's messages and the protocol's tensors: a ModelInferRequest (a large one walked before protobuf
parses it: protobuf_walk) checked into the protocol's Request exactly as an HTTP request is, and outputs into a
ModelInferResponse, serialized and framed where it is built (on a codec thread when large)."""

from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from google.protobuf.message import DecodeError
from tritonclient.grpc import service_pb2 as pb

from kiln_serving import codec, errors, grpc_wire, layouts, protobuf_walk, protocol
from kiln_serving.model import Model, TensorInfo

# OIP datatype -> the InferTensorContents field holding it (FP16 and BF16 only travel raw).
_CONTENTS = {
    "BOOL": "bool_contents", "INT8": "int_contents", "INT16": "int_contents", "INT32": "int_contents",
    "INT64": "int64_contents", "UINT8": "uint_contents", "UINT16": "uint_contents", "UINT32": "uint_contents",
    "UINT64": "uint64_contents", "FP32": "fp32_contents", "FP64": "fp64_contents", "BYTES": "bytes_contents",
}  # fmt: skip

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
# BYTES contents up to this size are parsed at once: at most 512 K fields (elements of two bytes or more), ~15 ms
# holding the GIL. Larger ones are cut first (protobuf_walk.pieces), which costs a step in Python per field.
_MERGE_WHOLE = 1 << 20


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


def _contents(spec: TensorInfo, field: str, pieces: list[memoryview]) -> list[Any]:
    """A large message's input contents, parsed only once known to be in the field the input's datatype uses:
    one InferTensorContents, or for BYTES many, each of a slice of the elements, in order.

    BYTES elements are a field each, and protobuf parses them holding the GIL: 60 MB of empty strings sent for an
    FP32 input were parsed whole before the datatype was checked (probes waited 0.65 s; 1.2 GB). A numeric
    datatype's values come packed in one field or a few, so its contents are walked (up to MAX_INFER_FIELDS
    fields, stopping at the first in another field) before protobuf sees them. Only an input that takes BYTES gets
    its elements parsed, and where they may be many (past _MERGE_WHOLE) a slice at a time, each into a message of
    its own: 5 M of them in one parse held the GIL 0.13 s, and merged into one message, its growing array was
    copied (0.03 s at a time)."""
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
        if spec.datatype == "BYTES" and sum(map(len, pieces)) > _MERGE_WHOLE:
            return [pb.InferTensorContents.FromString(part)
                    for piece in pieces for part in protobuf_walk.pieces(piece, codec.SLICE_VALUES)]  # fmt: skip
        contents = pb.InferTensorContents()
        for piece in pieces:
            contents.MergeFromString(piece)
    except DecodeError as err:
        raise errors.InvalidInput(f"input '{spec.name}': cannot parse its contents: {err}") from None
    return [contents]


def _values(parts: list[Any], field: str) -> Iterator[Any]:
    """The values of the parts (_contents) in order; each part is let go once read."""
    parts.reverse()
    while parts:
        part = parts.pop()
        yield from getattr(part, field)


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
    key: bytes | None = None  # the message up to its raw_input_contents, which describes them (see layout_key)


def layout_key(message: bytes | memoryview, raw: list[bytes]) -> bytes | None:
    """The message less its raw_input_contents, if it ends with them (protobuf writes fields in their numbers'
    order, and theirs is the last), as the key of its layout (layouts.py); None where it cannot be one. That the
    rest before them is whole fields, none of them raw contents, is checked once, when a layout is remembered
    (_describes): then the same bytes before the same count of contents' bytes describe the same request."""
    tail = sum(1 + _varint_size(len(r)) + len(r) for r in raw)
    if not raw or len(message) - tail > layouts.MAX_KEY_BYTES:
        return None
    return layouts.GRPC + message[: len(message) - tail]


def _varint_size(value: int) -> int:
    return max(1, (value.bit_length() + 6) // 7)


def _describes(key: bytes, request: Any) -> bool:
    """Whether the key's message bytes parse to the request less its raw_input_contents (whole fields, none of
    them those)."""
    described = pb.ModelInferRequest()
    described.CopyFrom(request)
    described.ClearField("raw_input_contents")
    try:
        return bool(pb.ModelInferRequest.FromString(key[len(layouts.GRPC) :]) == described)
    except DecodeError:
        return False


def decode_known(model: Model, call: InferCall, allow_non_finite: bool, known: layouts.Layouts) -> protocol.Request:
    """decode, for a small message whose description (`call.key`) was seen before straight from its layout: only
    its raw contents are checked again."""
    request = known.request(call.key, lambda _: [memoryview(r) for r in call.raw], model, allow_non_finite)
    if request is not None:
        return request
    decoded = decode(model, call, allow_non_finite)
    if call.key is not None and _describes(call.key, call.request):
        names = [(tensor.name, tensor.datatype) for tensor in call.request.inputs]
        known.remember(call.key, layouts.layout(names, [len(r) for r in call.raw], decoded))
    return decoded


def walk(message: bytes | memoryview) -> protobuf_walk.Split:
    """A large ModelInferRequest walked before protobuf parses it (protobuf_walk): refused past MAX_INFER_FIELDS
    fields, its raw_input_contents lifted out uncopied, and its inputs' contents and long shapes (_LIFTED)."""
    walked = protobuf_walk.split(message, _RAW_INPUT_CONTENTS, MAX_INFER_FIELDS, _TENSORS, _LIFTED)
    if walked.fields > MAX_INFER_FIELDS:
        raise grpc_wire.Abort("INVALID_ARGUMENT", f"a ModelInferRequest of more than {MAX_INFER_FIELDS} fields "
                              "(inputs, outputs, parameters, and theirs) is refused unparsed")  # fmt: skip
    return walked


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
            if tensor.HasField("contents") or any(number == _CONTENTS_FIELD for number, _ in lifted):
                raise errors.InvalidInput(f"input '{spec.name}': contents must not be given with raw_input_contents")
            tensors[spec.name] = codec.from_bytes(spec.name, spec.datatype, shape, memoryview(raw[i]))
            continue
        field = _CONTENTS.get(spec.datatype)
        if field is None:
            raise errors.InvalidInput(f"input '{spec.name}': {spec.datatype} must be sent as raw_input_contents")
        if call.inner is None:
            parts = [tensor.contents]
            _check_contents(spec, field, [f.name for f, _ in tensor.contents.ListFields()])
        else:
            parts = _contents(spec, field, [view for number, view in lifted if number == _CONTENTS_FIELD])
        if spec.datatype == "BYTES":
            tensors[spec.name] = codec.strings(spec.name, shape, codec.texts(spec.name, _values(parts, field)))
        else:
            flat = _typed(spec.name, spec.datatype, getattr(parts[0], field))
            tensors[spec.name] = codec.sized(spec.name, shape, flat)
    protocol.request_options(_parameters(request.parameters))
    requested = [(o.name, _parameters(o.parameters)) for o in request.outputs]
    chosen = protocol.wanted(model, requested, binary_default=True)
    return protocol.Request(protocol.complete(model, tensors, allow_non_finite), chosen, request.id or None)


def encode(model: Model, request: protocol.Request, outputs: dict[str, codec.Array]) -> Any:
    """The ModelInferResponse, every output as raw_output_contents (what tritonclient.grpc reads); large string
    outputs are let go here, a slice at a time, not on the loop."""
    response = pb.ModelInferResponse(model_name=model.name, model_version=model.version, id=request.id or "")
    for want, array in protocol.results(model, request, outputs):
        response.outputs.add(name=want.name, datatype=codec.datatype_of(array), shape=list(array.shape))
        response.raw_output_contents.append(codec.to_bytes(array))
    codec.release(outputs.values())
    return response


def framed(model: Model, request: protocol.Request, outputs: dict[str, codec.Array]) -> grpc_wire.Framed:
    """encode, serialized and framed where it runs: on a codec thread when large."""
    return grpc_wire.Framed(grpc_wire.framed(encode(model, request, outputs).SerializeToString()))
