"""A protobuf message's top-level fields, walked by hand for a large gRPC message before protobuf sees it.

Why by hand: protobuf's parser holds the GIL for a whole parse, so a thread does not keep the event loop free,
and it copies every bytes field (a 60 MB raw tensor stalled the loop up to ~100 ms at a time between the join,
the parse, the copy out and ByteSize). Walking the top level (and one level down where asked) costs what the
count of fields costs, not what they weigh: it bounds how many there are, and lifts a bytes field
(ModelInferRequest's raw_input_contents) out as views of the message, leaving protobuf only the small rest.
"""

from collections.abc import Collection, Iterator
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


@dataclass(frozen=True)
class Split:
    """A message's `lifted` field (a repeated bytes field), in order, as views of the message, and the message's
    other fields re-joined as a message of their own; `fields` counts the fields walked."""

    rest: bytes
    lifted: list[memoryview]
    fields: int


def split(message: bytes | memoryview, lifted: int, limit: int, nested: Collection[int] = ()) -> Split:
    """Walk the message's top level, lifting out field number `lifted` (length-delimited), and counting its fields
    and those of the sub-messages numbered in `nested` (their own top level): past `limit` the walk stops (the
    result's `fields` is then limit + 1)."""
    data = memoryview(message)
    views: list[memoryview] = []
    kept: list[memoryview] = []
    start = walked = count = 0
    for number, wire, field, value, end in _fields(data):
        count += 1
        if wire == _LEN and number in nested:
            for _ in _fields(data[value:end]):
                count += 1
                if count > limit:
                    break
        if count > limit:
            break
        if wire == _LEN and number == lifted:
            kept.append(data[start:field])
            views.append(data[value:end])
            start = end
        walked = end
    kept.append(data[start:walked])
    return Split(b"".join(kept), views, min(count, limit + 1))
