"""The binary tensor data extension: a JSON header followed by raw tensors, its length in a HTTP header.

Request: `Inference-Header-Content-Length: N`; the first N bytes are the JSON header, the rest are the
tensors of the inputs whose `parameters.binary_data_size` is set, in input order. Responses use the same
layout for outputs asked for as binary (tritonclient does that by default).
"""

from collections.abc import Sequence
from typing import Any

import numpy as np

from kiln_serving import errors, jsontext, jsonwrite

HEADER = "Inference-Header-Content-Length"
# Longer numbers are past any body limit (and int() refuses over 4300 digits).
MAX_DIGITS = 18

# Binary tensors in a request body start on this boundary (a cache line; numpy and SIMD kernels need less).
_ALIGNMENT = 64


def aligned_buffer(length: int, header_length: int) -> memoryview:
    """A writable buffer for a body of `length` bytes, placed so that its byte `header_length` (where binary
    tensors start) lands on a 64-byte boundary: the body is copied into it once, as it arrives, and the tensors
    are then used where they lie (codec.from_bytes) instead of being joined and copied again."""
    storage = np.empty(length + _ALIGNMENT, dtype=np.uint8)
    pad = -(storage.ctypes.data + header_length) % _ALIGNMENT
    return storage.data[pad : pad + length]


def header_length(values: Sequence[str]) -> int | None:
    """The header's value (all its values as received) as a byte count; only ASCII digits count (int() would also
    take '٣' or ' 3'), and only once (two values leave which one is meant unknown)."""
    if not values:
        return None
    if len(values) > 1:
        raise errors.InvalidInput(f"{HEADER} is given {len(values)} times; send it once")
    value = values[0]
    number = digits(value)
    if number is None:
        raise errors.InvalidInput(f"{HEADER} must be a non-negative integer of at most {MAX_DIGITS} digits, "
                                  f"got {value[:40]!r}")  # fmt: skip
    return number


def digits(value: str | bytes) -> int | None:
    """A header value that is only ASCII digits, at most MAX_DIGITS of them, as an int; else None (int() would
    also take '٣' or ' 3', and refuses over 4300 digits)."""
    return int(value) if value.isascii() and value.isdigit() and len(value) <= MAX_DIGITS else None


def split(body: bytes | memoryview, length: int | None) -> tuple[dict[str, Any], memoryview]:
    """The JSON header as a dict and the binary rest (empty without the extension), which is not copied.
    A length of 0 (a raw binary request) is the caller's to handle."""
    if length is not None and not 0 < length <= len(body):
        raise errors.InvalidInput(f"{HEADER} is {length} but the body has only {len(body)} bytes")
    text = bytes(body[:length]) if length is not None or not isinstance(body, bytes) else body
    try:
        header = jsontext.loads_request(text)
    except errors.InvalidInput as err:
        hint = f" (binary body without the {HEADER} header?)" if length is None and b"\0" in text else ""
        raise errors.InvalidInput(f"{err}{hint}") from None
    if not isinstance(header, dict):
        raise errors.InvalidInput(f"request body must be a JSON object, got {type(header).__name__}")
    return header, memoryview(body)[len(text) :]


class Reader:
    """Hands out the binary section tensor by tensor and checks that all of it was used."""

    def __init__(self, rest: memoryview) -> None:
        self._rest = rest
        self._offset = 0

    def take(self, name: str, size: object) -> memoryview:
        if not isinstance(size, int) or isinstance(size, bool) or size < 0:
            raise errors.InvalidInput(f"input '{name}': binary_data_size must be a non-negative integer, got {size!r}")
        if self._offset + size > len(self._rest):
            raise errors.InvalidInput(
                f"input '{name}': binary_data_size {size} runs past the end of the body "
                f"({len(self._rest) - self._offset} bytes left)"
            )
        chunk = self._rest[self._offset : self._offset + size]
        self._offset += size
        return chunk

    def finish(self) -> None:
        if self._offset != len(self._rest):
            raise errors.InvalidInput(
                f"{len(self._rest) - self._offset} bytes of binary data after the last input's binary_data_size"
            )


def join(header: dict[str, Any], chunks: Sequence[bytes]) -> tuple[bytes, int | None]:
    """The response body and the value of its Inference-Header-Content-Length (None: plain JSON)."""
    head = jsonwrite.dumps(header)
    if not chunks:
        return head, None
    return b"".join([head, *chunks]), len(head)
