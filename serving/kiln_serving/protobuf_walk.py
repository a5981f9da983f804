"""A protobuf message's top-level fields, walked by hand for a large gRPC message before protobuf sees it.

Why by hand: protobuf's parser holds the GIL for a whole parse, so a thread does not keep the event loop free,
and it copies every bytes field (a 60 MB raw tensor cost ~200 ms of stalled loop between the parse, the copy out
and ByteSize). Walking the top level costs what the count of fields costs, not what they weigh: it bounds how
many there are, and lifts a bytes field (ModelInferRequest's raw_input_contents) out as views of the message,
leaving protobuf only the small rest to parse.
"""

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


@dataclass(frozen=True)
class Split:
    """A message's `lifted` field (a repeated bytes field), in order, as views of the message, and the message's
    other fields re-joined as a message of their own; `fields` counts every top-level field."""

    rest: bytes
    lifted: list[memoryview]
    fields: int


def split(message: bytes | memoryview, lifted: int, limit: int) -> Split:
    """Walk the message's top level, lifting out field number `lifted` (length-delimited) and stopping once past
    `limit` fields (the result's `fields` is then limit + 1). Raises DecodeError where the wire format breaks
    (protobuf's own error for a message it cannot parse)."""
    data = memoryview(message)
    views: list[memoryview] = []
    kept: list[memoryview] = []
    pos = start = count = 0
    while pos < len(data) and count <= limit:
        field_start = pos
        tag, pos = _varint(data, pos)
        number, wire = tag >> 3, tag & 7
        if wire == _VARINT:
            pos = _varint(data, pos)[1]
        elif wire == _LEN:
            length, pos = _varint(data, pos)
            if pos + length > len(data):
                raise DecodeError(f"field {number} runs past the end of the message")
            if number == lifted:
                kept.append(data[start:field_start])
                views.append(data[pos : pos + length])
                start = pos + length
            pos += length
        elif wire in (_I64, _I32):
            pos += 8 if wire == _I64 else 4
        else:
            raise DecodeError(f"field {number} has wire type {wire}, which no field of this message has")
        count += 1
    if pos > len(data):
        raise DecodeError("the message is cut short")
    kept.append(data[start:pos])
    return Split(b"".join(kept), views, count)
