"""One inference request in Open Inference Protocol terms, wire format aside: check the tensors against the
model, pick the outputs, build the answer (classification extension included). The HTTP/JSON decoding here
and the gRPC one (grpc_tensors.py) both end in a `Request`, so both refuse the same requests the same way.
"""

import math
from collections.abc import Container, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from kiln_serving import binary, codec, errors
from kiln_serving.model import Model, TensorInfo

# The output datatypes Triton's classification extension ranks, and the most elements it ranks in one row.
CLASSIFIABLE = frozenset({"UINT8", "UINT16", "UINT32", "UINT64", "INT8", "INT16", "INT32", "INT64", "FP32", "FP64"})
MAX_CLASSIFIED = 1_000_000


@dataclass(frozen=True)
class Wanted:
    """One requested output: as binary data or JSON, and as top-k classes when classification > 0."""

    name: str
    binary: bool = False
    classification: int = 0


@dataclass
class Request:
    inputs: dict[str, codec.Array]
    outputs: list[Wanted]
    id: str | None = None
    items: int = field(init=False, default=0)

    def __post_init__(self) -> None:
        first = next(iter(self.inputs.values()), None)
        self.items = int(first.shape[0]) if first is not None and first.ndim else 1


def names(items: Sequence[TensorInfo] | Sequence[str]) -> str:
    return ", ".join(f"'{i.name if isinstance(i, TensorInfo) else i}'" for i in items)


def input_spec(model: Model, name: object, datatype: object, raw_shape: object) -> tuple[TensorInfo, tuple[int, ...]]:
    """The model's input `name` and the request's shape, after checking name, datatype and shape."""
    spec = next((t for t in model.inputs if t.name == name), None)
    if spec is None:
        raise errors.InvalidInput(f"unknown input '{name}'; model '{model.name}' takes {names(model.inputs)}")
    if datatype != spec.datatype:
        raise errors.InvalidInput(f"input '{spec.name}': expected datatype {spec.datatype}, got {datatype}")
    if datatype not in codec.NUMPY_DTYPES:
        raise errors.InvalidInput(f"input '{spec.name}': datatype {datatype} is not supported by this server")
    shape = codec.parse_shape(spec.name, raw_shape)
    codec.check_shape(spec.name, spec.shape, shape)
    return spec, shape


def no_shared_memory(what: str, parameters: Container[str]) -> None:
    """InvalidInput for a tensor placed in shared memory: Triton's shared-memory extension is not served, and a
    tensor answered in the response instead would leave the client reading a region nothing wrote."""
    if "shared_memory_region" in parameters:
        raise errors.InvalidInput(
            f"{what}: shared memory (parameters.shared_memory_region) is not supported by this server; without it "
            "the tensor travels in the request or its answer"
        )


def complete(model: Model, tensors: dict[str, codec.Array], allow_non_finite: bool) -> dict[str, codec.Array]:
    """Every input given (once, which the caller checked) and, unless allowed, finite."""
    missing = [t.name for t in model.inputs if t.name not in tensors]
    if missing:
        raise errors.InvalidInput(f"missing input{'s' if len(missing) > 1 else ''} {names(missing)}")
    if not allow_non_finite:
        for name, array in tensors.items():
            codec.check_finite(name, array)
    return tensors


def wanted(model: Model, requested: Sequence[tuple[object, Mapping[str, Any]]], binary_default: bool) -> list[Wanted]:
    """The outputs asked for, in order (all when none are); names must be known and unique."""
    if not requested:
        return [Wanted(t.name, binary_default) for t in model.outputs]
    datatypes = {t.name: t.datatype for t in model.outputs}
    chosen: list[Wanted] = []
    for name, parameters in requested:
        if not isinstance(name, str) or name not in datatypes:
            raise errors.InvalidInput(f"unknown output '{name}'; model '{model.name}' has {names(model.outputs)}")
        if any(w.name == name for w in chosen):
            raise errors.InvalidInput(f"output '{name}' is requested twice")
        no_shared_memory(f"output '{name}'", parameters)
        k = parameters.get("classification", 0)
        if not isinstance(k, int) or isinstance(k, bool) or k < 0:
            raise errors.InvalidInput(f"output '{name}': classification must be a non-negative integer, got {k!r}")
        datatype = datatypes[name]
        if k and datatype not in CLASSIFIABLE:
            raise errors.InvalidInput(f"output '{name}': class result not available for its type '{datatype}' "
                                      f"(classification ranks {', '.join(sorted(CLASSIFIABLE))})")  # fmt: skip
        binary_data = parameters.get("binary_data", binary_default)
        if not isinstance(binary_data, bool):
            raise errors.InvalidInput(f"output '{name}': binary_data must be true or false, got {binary_data!r}")
        chosen.append(Wanted(name, binary_data, k))
    return chosen


def from_json(model: Model, header: Mapping[str, Any], reader: binary.Reader, allow_non_finite: bool) -> Request:
    """The HTTP request: a JSON header, with binary tensors after it for the binary extension."""
    raw_inputs = header.get("inputs")
    if not isinstance(raw_inputs, list) or not raw_inputs:
        raise errors.InvalidInput("request needs 'inputs': a non-empty list of tensors")
    tensors: dict[str, codec.Array] = {}
    for raw in raw_inputs:
        if not isinstance(raw, dict) or not isinstance(raw.get("name"), str):
            raise errors.InvalidInput("each input must be an object with a 'name'")
        spec, shape = input_spec(model, raw["name"], raw.get("datatype"), raw.get("shape"))
        if spec.name in tensors:
            raise errors.InvalidInput(f"input '{spec.name}' is given twice")
        parameters = _parameters(raw, f"input '{spec.name}'")
        no_shared_memory(f"input '{spec.name}'", parameters)
        if "binary_data_size" in parameters:
            chunk = reader.take(spec.name, parameters["binary_data_size"])
            tensors[spec.name] = codec.from_bytes(spec.name, spec.datatype, shape, chunk)
        elif "data" in raw:
            tensors[spec.name] = codec.from_json(spec.name, spec.datatype, shape, raw["data"])
        else:
            raise errors.InvalidInput(f"input '{spec.name}' has neither 'data' nor parameters.binary_data_size")
    reader.finish()
    request_parameters = request_options(_parameters(header, "request"))
    raw_outputs = header.get("outputs")
    if raw_outputs is not None and not isinstance(raw_outputs, list):
        raise errors.InvalidInput("'outputs' must be a list of {\"name\": ...} objects")
    requested = []
    for raw in raw_outputs or []:
        if not isinstance(raw, dict) or not isinstance(raw.get("name"), str):
            raise errors.InvalidInput("each requested output must be an object with a 'name'")
        requested.append((raw["name"], _parameters(raw, f"output '{raw['name']}'")))
    chosen = wanted(model, requested, request_parameters.get("binary_data_output", False))
    return Request(complete(model, tensors, allow_non_finite), chosen, _request_id(header.get("id")))


def _request_id(value: object) -> str | None:
    """The id the answer echoes: a string, as Triton takes it, and Unicode text (a lone surrogate cannot be
    written back)."""
    if value is None:
        return None
    if not isinstance(value, str):
        raise errors.InvalidInput(f"'id' must be a string, got {codec.json_name(value)}")
    try:
        return codec.text(value)  # as BYTES data is checked
    except ValueError as err:
        raise errors.InvalidInput(f"'id' is {err}") from None


def request_options(parameters: Mapping[str, Any]) -> Mapping[str, Any]:
    """A request's parameters, checked as Triton checks them (HTTP and gRPC alike): each a string, number or
    boolean; priority and timeout non-negative integers, binary_data_output true or false; none named triton_*
    (reserved). kiln reads only binary_data_output; the others are checked so a typo is not silently ignored."""
    for key, value in parameters.items():
        if key.startswith("triton_"):
            raise errors.InvalidInput(f"request parameter '{key}': names starting with 'triton_' are reserved")
        if key in ("priority", "timeout"):
            if not isinstance(value, int) or isinstance(value, bool) or value < 0:
                raise errors.InvalidInput(f"request parameter '{key}' must be a non-negative integer, got {value!r}")
        elif key == "binary_data_output":
            if not isinstance(value, bool):
                raise errors.InvalidInput(
                    f"request parameter 'binary_data_output' must be true or false, got {value!r}"
                )
        elif not isinstance(value, str | int | float):  # bool is an int
            raise errors.InvalidInput(f"request parameter '{key}' must be a string, number or boolean, "
                                      f"got {codec.json_name(value)}")  # fmt: skip
    return parameters


def from_raw(model: Model, body: memoryview, allow_non_finite: bool) -> Request:
    """A raw binary request (Inference-Header-Content-Length: 0), as Triton takes one: the body is the only input's
    tensor, a dynamic first dimension what the byte count makes it; for a BYTES input of one element (a dynamic
    first dimension taken as 1) the body is that element. Outputs are answered binary, as Triton answers them."""
    if len(model.inputs) != 1:
        raise errors.InvalidInput(f"raw binary requests need a model with one input; '{model.name}' has "
                                  f"{len(model.inputs)}: send a JSON header")  # fmt: skip
    spec = model.inputs[0]
    described = f"'{spec.name}' is {spec.datatype} {codec.format_shape(spec.shape)}: send a JSON header"
    if spec.datatype == "BYTES":
        shape = tuple(1 if d < 0 and i == 0 else d for i, d in enumerate(spec.shape))
        if any(d < 0 for d in shape) or math.prod(shape) != 1 or len(body) >= 1 << 32:
            raise errors.InvalidInput(f"a raw binary request for a BYTES input is its one element (under 4 GiB); "
                                      f"{described}")  # fmt: skip
        body = memoryview(len(body).to_bytes(4, "little") + body)  # framed as the binary extension frames one
    else:
        dtype = codec.NUMPY_DTYPES.get(spec.datatype)
        if dtype is None or dtype.kind == "O" or any(d < 0 for d in spec.shape[1:]):
            raise errors.InvalidInput(f"raw binary requests need a fixed-size numeric or one-element BYTES input; "
                                      f"{described}")  # fmt: skip
        row = math.prod(spec.shape[1:]) * dtype.itemsize
        first = spec.shape[0] if spec.shape else 1
        if first < 0:
            first = len(body) // row if row and len(body) % row == 0 else -1
        if first < 0:
            raise errors.InvalidInput(f"raw binary request of {len(body)} bytes is not a whole number of "
                                      f"'{spec.name}' rows of {row} bytes")  # fmt: skip
        shape = (first, *spec.shape[1:]) if spec.shape else ()
    tensor = codec.from_bytes(spec.name, spec.datatype, shape, body)
    return Request(complete(model, {spec.name: tensor}, allow_non_finite), wanted(model, [], True))


def classification(name: str, array: codec.Array, k: int, labels: Sequence[str], batched: bool) -> codec.Array:
    """Triton's classification extension: the top k as "score:index[:label]" BYTES (a float score as %f, an integer
    one as itself), per row for a model that batches (shape [rows, k]), else over the whole tensor (shape [k])."""
    by_row = batched and array.ndim > 0
    rows = array.reshape(array.shape[0] if by_row else 1, math.prod(array.shape[1:] if by_row else array.shape))
    if rows.shape[1] > MAX_CLASSIFIED:
        raise errors.InvalidInput(f"output '{name}': classification ranks at most {MAX_CLASSIFIED:,} elements a "
                                  f"row; its rows have {rows.shape[1]:,}")  # fmt: skip
    k = min(k, rows.shape[1])
    order = np.argsort(-rows.astype(np.float64), axis=1, kind="stable")[:, :k]
    score = "{:f}" if array.dtype.kind == "f" else "{:d}"
    texts = [[f"{score.format(rows[r, i])}:{i}" + (f":{labels[i]}" if i < len(labels) else "") for i in order[r]]
             for r in range(rows.shape[0])]  # fmt: skip
    result = np.array(texts, dtype=np.object_).reshape(rows.shape[0], k)
    return result if by_row else result.reshape(k)


def results(model: Model, request: Request, outputs: Mapping[str, codec.Array]) -> list[tuple[Wanted, codec.Array]]:
    """The outputs asked for, in order, as they are to be sent (classification applied)."""
    labels = model.card.class_names if model.card is not None else []
    chosen = []
    for want in request.outputs:
        array = outputs[want.name]
        if want.classification:
            array = classification(want.name, array, want.classification, labels, model.batchable)
        chosen.append((want, array))
    return chosen


def answer(model: Model, request: Request, outputs: Mapping[str, codec.Array]) -> tuple[dict[str, Any], list[bytes]]:
    """The HTTP response header (as a dict) and, for outputs asked for as binary, their bytes in order."""
    response: dict[str, Any] = {"model_name": model.name, "model_version": model.version}
    if request.id is not None:
        response["id"] = request.id
    encoded, chunks = [], []
    for want, array in results(model, request, outputs):
        entry: dict[str, Any] = {"name": want.name, "datatype": codec.datatype_of(array), "shape": list(array.shape)}
        if want.binary:
            raw = codec.to_bytes(array)
            entry["parameters"] = {"binary_data_size": len(raw)}
            chunks.append(raw)
        else:
            entry["data"] = codec.to_json(array)
        encoded.append(entry)
    response["outputs"] = encoded
    return response, chunks


def _parameters(raw: Mapping[str, Any], what: str) -> Mapping[str, Any]:
    parameters = raw.get("parameters")
    if parameters is None:
        return {}
    if not isinstance(parameters, dict):
        raise errors.InvalidInput(f"{what}: 'parameters' must be an object")
    return parameters
