"""A protobuf message's top-level fields, walked by hand for a large gRPC message before protobuf sees it.

Why by hand: protobuf's parser holds the GIL for a whole parse, so a thread does not keep the event loop free,
and it copies every bytes field (a 60 MB raw tensor stalled the loop up to ~100 ms at a time between the join,
the parse, the copy out and ByteSize). Walking the top level (and one level down where asked) costs what the
count of fields costs, not what they weigh: it bounds how many there are, and lifts fields out as views of the
message, leaving protobuf only the small rest: a bytes field (ModelInferRequest's raw_input_contents), and
fields of a sub-message (each input's contents, left unparsed until the input is known to take them, and a shape
too long to be one).
"""

from collections.abc import Collection, Iterator, Mapping
from dataclasses import dataclass

from google.protobuf.message import DecodeError

_VARINT, _I64, _LEN, _I32 = 0, 1, 2, 5


def _varint(data: memoryview, pos: int) -> tuple[int, int]:
    value = shift = 0
    while pos < len(data) and shift < 64:
        byte = data[pos]
        value |= (byte & 0x7F) << shift
        pos, shift = pos + 1, shift + 7
        if byte < 0x80:
            return value, pos
    raise DecodeError("truncated or overlong varint")


def _fields(data: memoryview) -> Iterator[tuple[int, int, int, int, int]]:
    """(number, wire type, the field's start, its value's start and end) of each top-level field in data;
    DecodeError where the wire format breaks (protobuf's own error for a message it cannot parse)."""
    pos = 0
    while pos < len(data):
        start = pos
        tag, pos = _varint(data, pos)
        number, wire = tag >> 3, tag & 7
        value = pos
        if wire == _VARINT:
            pos = _varint(data, pos)[1]
        elif wire == _LEN:
            length, value = _varint(data, pos)
            pos = value + length
        elif wire in (_I64, _I32):
            pos += 8 if wire == _I64 else 4
        else:
            raise DecodeError(f"field {number} has wire type {wire}, which no field of this message has")
        if pos > len(data):
            raise DecodeError(f"field {number} runs past the end of the message")
        yield number, wire, start, value, pos


def numbers(data: memoryview, limit: int) -> Iterator[int]:
    """The field numbers of data's top level, the first `limit` of them at most."""
    for count, (number, *_) in enumerate(_fields(data)):
        if count == limit:
            return
        yield number


def pieces(data: memoryview, fields: int) -> list[memoryview]:
    """data (a message's fields) cut at field boundaries into pieces of at most `fields` fields, which protobuf
    merges one after another into what it parses from data whole; each merge is one call holding the GIL, where
    data whole may hold millions of fields (a repeated bytes field's elements). DecodeError where the wire format
    breaks. A field of a one-byte tag and length, as short strings are, is stepped over here without _fields."""
    cuts, pos, count, size = [0], 0, 0, len(data)
    while pos < size:
        if count == fields:
            cuts.append(pos)
            count = 0
        tag = data[pos]
        if tag < 0x80 and tag & 7 == _LEN and pos + 1 < size and data[pos + 1] < 0x80:
            pos += 2 + data[pos + 1]
        else:
            pos += next(_fields(data[pos:]))[4]
        count += 1
    if pos > size:
        raise DecodeError("a field runs past the end of the message")
    return [data[start:end] for start, end in zip(cuts, [*cuts[1:], size], strict=True)]


def encode_varint(value: int) -> bytes:
    """value as a protobuf varint (a length, a field's tag)."""
    out = bytearray()
    while value >= 0x80:
        out.append(value & 0x7F | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


@dataclass(frozen=True)
class Split:
    """A message's `lifted` field (a repeated bytes field), in order, as views of the message, and the message's
    other fields re-joined as a message of their own; `fields` counts the fields walked. `inner`: for each
    occurrence of the parent field named in split's `inner`, in order, its lifted child fields as (number, view of
    the value), in order (the parent re-encoded without them in `rest`)."""

    rest: bytes
    lifted: list[memoryview]
    fields: int
    inner: list[list[tuple[int, memoryview]]]


def split(
    message: bytes | memoryview, lifted: int, limit: int, nested: Collection[int] = (),
    inner: tuple[int, Mapping[int, int]] | None = None,
) -> Split:  # fmt: skip
    """Walk the message's top level, lifting out field number `lifted` (length-delimited), and counting its fields
    and those of the sub-messages numbered in `nested` (their own top level): past `limit` the walk stops (the
    result's `fields` is then limit + 1). `inner` = (parent, {child: smallest size}): a length-delimited child
    field of a parent sub-message (a number in `nested`) is lifted out too when its value has at least that many
    bytes."""
    data = memoryview(message)
    views: list[memoryview] = []
    children: list[list[tuple[int, memoryview]]] = []
    kept: list[bytes | memoryview] = []
    parent, smallest = inner if inner is not None else (None, {})
    start = walked = count = 0
    for number, wire, field, value, end in _fields(data):
        count += 1
        cut: list[tuple[int, int, int, int]] = []  # (number, start, value, end) of each child field to lift
        if wire == _LEN and number in nested:
            for child, child_wire, child_start, child_value, child_end in _fields(data[value:end]):
                count += 1
                if count > limit:
                    break
                lift = number == parent and child_wire == _LEN and child in smallest
                if lift and child_end - child_value >= smallest[child]:
                    cut.append((child, value + child_start, value + child_value, value + child_end))
        if count > limit:
            break
        if wire == _LEN and number == lifted:
            kept.append(data[start:field])
            views.append(data[value:end])
            start = end
        elif number == parent and wire == _LEN:
            children.append([(child, data[at:to]) for child, _, at, to in cut])
            if cut:  # the parent again, without its lifted children, under its own tag and a new length
                pieces, at = [], value
                for _, child_start, _, child_end in cut:
                    pieces.append(data[at:child_start])
                    at = child_end
                pieces.append(data[at:end])
                body = b"".join(pieces)
                kept += [data[start:field], data[field : _varint(data, field)[1]], encode_varint(len(body)), body]
                start = end
        walked = end
    kept.append(data[start:walked])
    return Split(b"".join(kept), views, min(count, limit + 1), children)
