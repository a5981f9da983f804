"""Tensors in Open Inference Protocol terms: datatypes, JSON `data` and raw little-endian bytes <-> numpy."""

import contextlib
import itertools
import math
import reprlib
import struct
from collections.abc import Iterable, Iterator, Sequence

import numpy as np
import numpy.typing as npt

from kiln_serving import errors, jsontext, jsonwrite

Array = npt.NDArray[np.generic]

# OIP datatype -> numpy dtype (explicitly little-endian: the binary extension's byte order).
NUMPY_DTYPES: dict[str, np.dtype[np.generic]] = {
    "BOOL": np.dtype("?"),
    "UINT8": np.dtype("<u1"),
    "UINT16": np.dtype("<u2"),
    "UINT32": np.dtype("<u4"),
    "UINT64": np.dtype("<u8"),
    "INT8": np.dtype("<i1"),
    "INT16": np.dtype("<i2"),
    "INT32": np.dtype("<i4"),
    "INT64": np.dtype("<i8"),
    "FP16": np.dtype("<f2"),
    "FP32": np.dtype("<f4"),
    "FP64": np.dtype("<f8"),
    "BYTES": np.dtype(object),
}

# onnxruntime's type strings -> OIP datatype.
ONNX_DATATYPES: dict[str, str] = {
    "tensor(bool)": "BOOL",
    "tensor(uint8)": "UINT8",
    "tensor(uint16)": "UINT16",
    "tensor(uint32)": "UINT32",
    "tensor(uint64)": "UINT64",
    "tensor(int8)": "INT8",
    "tensor(int16)": "INT16",
    "tensor(int32)": "INT32",
    "tensor(int64)": "INT64",
    "tensor(float16)": "FP16",
    "tensor(float)": "FP32",
    "tensor(double)": "FP64",
    "tensor(string)": "BYTES",
    "tensor(bfloat16)": "BF16",
}


# Native-order numpy dtype -> OIP datatype, for encoding outputs.
_DATATYPES: dict[np.dtype[np.generic], str] = {
    dtype.newbyteorder("="): name for name, dtype in NUMPY_DTYPES.items() if dtype.kind != "O"
}


def datatype_of(array: Array) -> str:
    """The OIP datatype of a numpy array."""
    if array.dtype.kind in "OSU":
        return "BYTES"
    name = _DATATYPES.get(array.dtype)
    if name is None:
        raise ValueError(f"no Open Inference Protocol datatype for numpy dtype {array.dtype}")
    return name


# Most dimensions a tensor may have (numpy's own limit).
MAX_DIMS = 64


def format_shape(shape: Sequence[int]) -> str:
    """[-1,3,32,32]: the compact form used in error messages (a client's absurd shape cut short)."""
    if len(shape) > MAX_DIMS:
        return "[" + ",".join(str(d) for d in shape[:8]) + f",... ({len(shape)} dimensions)]"
    return "[" + ",".join(str(d) for d in shape) + "]"


def check_shape(name: str, expected: Sequence[int], got: Sequence[int]) -> None:
    """Rank and every fixed dimension must match; -1 accepts any size."""
    if len(expected) != len(got) or any(e >= 0 and e != g for e, g in zip(expected, got, strict=True)):
        raise errors.InvalidInput(f"input '{name}': expected shape {format_shape(expected)}, got {format_shape(got)}")


# Largest element count a shape may describe: every byte count derived from it stays inside int64.
_MAX_ELEMENTS = (1 << 63) // 16


def parse_shape(name: str, raw: object) -> tuple[int, ...]:
    """A request's `shape` (a JSON list, or gRPC's repeated field): at most MAX_DIMS non-negative integers whose
    product fits in int64. Its length is checked first: a shape of millions of dimensions costs nothing more."""
    if isinstance(raw, Sequence) and not isinstance(raw, str | bytes):
        if len(raw) > MAX_DIMS:
            raise errors.InvalidInput(f"input '{name}': shape has {len(raw)} dimensions; at most {MAX_DIMS}")
        raw = list(raw)
    if not isinstance(raw, list) or not all(isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in raw):
        shown = reprlib.repr(raw)
        raise errors.InvalidInput(f"input '{name}': 'shape' must be a list of non-negative integers, got {shown}")
    if math.prod(raw) > _MAX_ELEMENTS:
        raise errors.InvalidInput(f"input '{name}': shape {format_shape(raw)} has more elements than int64 holds")
    return tuple(raw)


def _count(shape: Sequence[int]) -> int:
    return math.prod(shape)


def check_finite(name: str, array: Array) -> None:
    """InvalidInput for NaN or infinities in a float tensor (ServingConfig.allow_non_finite turns this off)."""
    if array.dtype.kind == "f" and not np.isfinite(array).all():
        raise errors.InvalidInput(
            f"input '{name}' contains NaN or infinite values (start the server with --allow-non-finite to accept them)"
        )


def from_json(name: str, datatype: str, shape: Sequence[int], raw: object) -> Array:
    """A tensor from JSON `data` (flat or nested, row-major); jsontext may have left it for numpy to parse."""
    with in_range(name, datatype):
        return sized(name, shape, _from_json(name, datatype, raw))


@contextlib.contextmanager
def in_range(name: str, datatype: str) -> Iterator[None]:
    """InvalidInput for a JSON number past the float datatype's range (1e6 as FP16: numpy would give infinity)."""
    try:
        with np.errstate(over="raise"):
            yield
    except FloatingPointError:
        raise errors.InvalidInput(f"input '{name}': 'data' holds a value out of {datatype}'s range") from None


def _from_json(name: str, datatype: str, raw: object) -> Array:
    if isinstance(raw, jsontext.Deferred):
        parsed = raw.to_numpy(NUMPY_DTYPES[datatype]) if datatype in NUMPY_DTYPES else None
        if parsed is not None:
            return parsed
        raw = raw.value()
    if not isinstance(raw, list | int | float | str):
        raise errors.InvalidInput(
            f"input '{name}': 'data' is not a list of {datatype} values (got {type(raw).__name__})"
        )
    return json_values(name, datatype, raw if isinstance(raw, list) else [raw])


# The JSON values each datatype takes, as Triton reads them: BOOL only true and false, the integer types only
# integers (no fraction, exponent or boolean), the float types any number but no boolean, BYTES strings. numpy
# alone would cast 1.5 to 1, "7" to 7, "no" to True and null to NaN.
_JSON_TYPES: dict[str, tuple[tuple[type, ...], str]] = {
    datatype: ((bool,), "true or false") if datatype == "BOOL" else ((str,), "strings") if datatype == "BYTES"
    else ((int, float), "numbers") if dtype.kind == "f" else ((int,), "integers")
    for datatype, dtype in NUMPY_DTYPES.items()
}  # fmt: skip
# Values checked and converted at a time (JSON data here, gRPC's typed contents in grpc_tensors): each step is
# one C call holding the GIL (10 M values at once held it ~0.3 s), and between steps other threads get their turn.
SLICE_VALUES = 1 << 16


def json_values(name: str, datatype: str, data: list[object]) -> Array:
    """JSON values (flat or nested, row-major) as a flat array of the datatype, every value checked to be one the
    datatype takes, SLICE_VALUES values at a time. Nesting is flattened whatever its shape: the tensor's shape
    decides, as Triton reads JSON data and as the fast path (jsontext) reads numbers of any size, so the same data
    is taken or refused alike, small or large."""
    allowed, wanted = _JSON_TYPES[datatype]
    parts: list[Array] = []
    try:
        for rows in _slices(data):
            values = rows
            kinds = set(map(type, rows))
            if list in kinds:
                values = np.asarray(rows, dtype=np.object_).reshape(-1).tolist()
                kinds = set(map(type, values))
                if list in kinds:  # irregular nesting: read in document order, as Triton and the fast path read it
                    values = list(_scalars(values))
                    kinds = set(map(type, values))
            for kind in kinds - set(allowed):
                value = next(v for v in values if type(v) is kind)
                raise errors.InvalidInput(
                    f"input '{name}': {datatype} data holds {json_name(value)}; it takes {wanted}"
                )
            if datatype == "BYTES":
                parts.append(np.array([text(v) for v in values], dtype=np.object_))
            else:
                parts.append(np.asarray(values, dtype=NUMPY_DTYPES[datatype]))
    except (ValueError, TypeError, OverflowError) as err:
        raise errors.InvalidInput(f"input '{name}': 'data' is not a list of {datatype} values ({err})") from None
    if not parts:
        return np.empty(0, dtype=NUMPY_DTYPES[datatype])
    return joined(parts)


# BYTES tensors are numpy arrays of str objects, and numpy builds, joins and frees one in one call holding the GIL
# (5 M strings: ~0.1 s to build from a list, ~0.05 s to free); the three below do it SLICE_VALUES at a time.


def strings(name: str, shape: Sequence[int], values: Iterable[str]) -> Array:
    """A BYTES tensor of `shape` from its elements, gathered a slice at a time: never one list of them all, which
    the cyclic collector walks whole at every collection any thread makes (15 M strings: 0.26 s, holding the GIL).
    Refused (InvalidInput) when they are not what the shape needs, or values raises it: what was gathered is let go
    here first, a slice at a time (the error's traceback would keep it until the event loop dropped it)."""
    parts: list[Array] = []
    try:
        iterator = iter(values)
        while chunk := list(itertools.islice(iterator, SLICE_VALUES)):
            part = np.empty(len(chunk), dtype=np.object_)
            part[:] = chunk
            parts.append(part)
        parts = [joined(parts)] if parts else [np.empty(0, dtype=np.object_)]
        return sized(name, shape, parts[0])
    except errors.ServingError:
        release(parts)
        while parts:
            parts.pop()
        raise


def joined(parts: list[Array]) -> Array:
    """parts joined along their first axis (np.concatenate), and the list emptied; object parts are copied in
    and let go one at a time. ValueError when the parts differ past their first axis."""
    if len(parts) == 1 or parts[0].dtype.kind != "O":
        array = parts[0] if len(parts) == 1 else np.concatenate(parts)
        parts.clear()
        return array
    inner = parts[0].shape[1:]
    if any(p.ndim == 0 or p.shape[1:] != inner for p in parts):
        raise ValueError("the parts differ past their first axis")
    array = np.empty((sum(len(p) for p in parts), *inner), dtype=np.object_)
    at = 0
    parts.reverse()
    while parts:
        part = parts.pop()
        array[at : at + len(part)] = part
        at += len(part)
    return array


def release(arrays: Iterable[Array]) -> None:
    """Let go of what large object arrays hold, a slice at a time, before they are dropped (the arrays keep their
    shape and hold None)."""
    for array in arrays:
        if array.dtype.kind == "O" and array.size > SLICE_VALUES and array.flags.c_contiguous:
            flat = array.reshape(-1)
            for end in range(flat.size, 0, -SLICE_VALUES):
                flat[max(end - SLICE_VALUES, 0) : end] = None  # type: ignore[assignment]  # an object array holds None


def _slices(data: list[object]) -> Iterator[list[object]]:
    """data's items in runs of about SLICE_VALUES values: whole items when they are small, an item's own items
    when one holds more (its size read down its first elements)."""
    size = math.prod(nested_shape(data[0])) if data else 1
    if size <= SLICE_VALUES:
        step = SLICE_VALUES // max(size, 1)  # an empty item: size 0
        for at in range(0, len(data), step):
            yield data[at : at + step]
        return
    for item in data:
        yield from _slices(item) if isinstance(item, list) else [[item]]


def _scalars(values: list[object]) -> Iterator[object]:
    """The values of nested lists, in document order (their depth is bounded by jsontext's nesting limit)."""
    for value in values:
        if type(value) is list:
            yield from _scalars(value)
        else:
            yield value


def nested_shape(value: object) -> tuple[int, ...]:
    """The shape nested lists have, read down their first elements (regular or not)."""
    shape: list[int] = []
    while isinstance(value, list):
        shape.append(len(value))
        value = value[0] if value else None
    return tuple(shape)


def json_name(value: object) -> str:
    """How the value was written in JSON, or what it was."""
    if value is None or isinstance(value, bool):
        return "null" if value is None else str(value).lower()
    if isinstance(value, int | float):
        return repr(value)
    return "a string" if isinstance(value, str) else "a list" if isinstance(value, list) else "an object"


def sized(name: str, shape: Sequence[int], flat: Array) -> Array:
    if flat.size != _count(shape):
        raise errors.InvalidInput(
            f"input '{name}': shape {format_shape(shape)} needs {_count(shape)} elements, got {flat.size}"
        )
    return flat.reshape(shape)


def text(value: object) -> str:
    """onnxruntime string tensors hold str; the protocol carries UTF-8 bytes. JSON text may hold a lone surrogate
    (an escape such as \\ud800), which no UTF-8 can carry: refused as binary data that is not UTF-8 is."""
    if isinstance(value, bytes):
        try:
            return value.decode("utf-8")
        except UnicodeDecodeError:
            raise ValueError("not valid UTF-8") from None
    if isinstance(value, str) and not value.isascii():  # isascii is a flag: the common element costs nothing
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:
            raise ValueError("not valid Unicode text (a lone surrogate)") from None
    return str(value)


def texts(name: str, values: Iterable[object]) -> Iterator[str]:
    """BYTES elements as str (text), an element that is not UTF-8 named by its index."""
    for index, value in enumerate(values):
        try:
            yield text(value)
        except ValueError as err:
            raise errors.InvalidInput(f"input '{name}': BYTES element {index}: {err}") from None


def _elements(name: str, raw: memoryview) -> Iterator[bytes]:
    """The BYTES elements of raw binary data, each a 4-byte length and its bytes."""
    offset = index = 0
    while offset < len(raw):
        if offset + 4 > len(raw):
            raise errors.InvalidInput(f"input '{name}': truncated BYTES element length at byte {offset}")
        (length,) = struct.unpack_from("<I", raw, offset)
        offset += 4
        if offset + length > len(raw):
            raise errors.InvalidInput(f"input '{name}': BYTES element {index} runs past the end of the data")
        yield bytes(raw[offset : offset + length])
        offset += length
        index += 1


def from_bytes(name: str, datatype: str, shape: Sequence[int], raw: memoryview) -> Array:
    """A tensor from the binary extension's raw bytes (BYTES: each element is a 4-byte length + bytes)."""
    if datatype == "BYTES":
        return strings(name, shape, texts(name, _elements(name, raw)))
    count = _count(shape)
    dtype = NUMPY_DTYPES[datatype]
    if len(raw) != count * dtype.itemsize:
        raise errors.InvalidInput(
            f"input '{name}': shape {format_shape(shape)} as {datatype} needs {count * dtype.itemsize} bytes, "
            f"got {len(raw)}"
        )
    array = np.frombuffer(raw, dtype=dtype)
    if not (array.flags.writeable and array.flags.aligned and dtype.isnative):
        # A read-only body (bytes) or a tensor at an odd offset: copy into a writable, aligned, native array.
        array = array.astype(dtype.newbyteorder("="), copy=True)
    # Otherwise the tensor stays in the request's own buffer (app.read_tensor_body), which it keeps alive.
    return array.reshape(shape)


def to_json(array: Array) -> object:
    """A tensor as flat row-major JSON `data`, for jsonwrite.dumps (orjson writes numpy arrays itself, NaN as null);
    written here a slice at a time when it holds more than SLICE_VALUES values (jsonwrite.dumps_sliced)."""
    values: Array | list[str]
    if datatype_of(array) == "BYTES":
        values = [_text_of(v) for v in array.reshape(-1)]
    else:
        values = _json_numbers(np.ascontiguousarray(array.reshape(-1)))
    if len(values) <= SLICE_VALUES:
        return values
    return jsonwrite.dumps_sliced(len(values), SLICE_VALUES, lambda start, stop: values[start:stop])


def rows_json(array: Array, start: int, stop: int) -> object:
    """Rows start:stop of a tensor for jsonwrite.dumps, nested as the tensor is (KServe v1's predictions)."""
    rows = array[start:stop]
    if datatype_of(array) == "BYTES":
        texts = np.array([_text_of(v) for v in rows.reshape(-1)], dtype=np.object_)
        return texts.reshape(rows.shape).tolist()
    return _json_numbers(np.ascontiguousarray(rows))


def _text_of(value: object) -> str:
    """A BYTES value as JSON text: UTF-8, what is not UTF-8 replaced (JSON strings are Unicode)."""
    return value.decode("utf-8", "replace") if isinstance(value, bytes) else str(value)


def _json_numbers(values: Array) -> Array:
    """Numbers as orjson writes them: it takes float32/64, not float16."""
    return values.astype(np.float32) if values.dtype == np.float16 else values


def to_bytes(array: Array) -> bytes:
    """A tensor as the binary extension's raw little-endian bytes."""
    datatype = datatype_of(array)
    if datatype == "BYTES":
        parts = []
        for v in array.reshape(-1):
            b = v if isinstance(v, bytes) else str(v).encode()
            parts.append(struct.pack("<I", len(b)) + b)
        return b"".join(parts)
    return np.ascontiguousarray(array, dtype=NUMPY_DTYPES[datatype]).tobytes()
