"""The binary tensor data extension: a JSON header followed by raw tensors, its length in a HTTP header.

Request: `Inference-Header-Content-Length: N`; the first N bytes are the JSON header, the rest are the
tensors of the inputs whose `parameters.binary_data_size` is set, in input order. Responses use the same
layout for outputs asked for as binary (tritonclient does that by default).
"""

import json
from collections.abc import Sequence
from typing import Any

from kiln_serving import errors

HEADER = "Inference-Header-Content-Length"


def split(body: bytes | memoryview, header_length: str | None) -> tuple[dict[str, Any], memoryview]:
    """The JSON header as a dict and the binary rest (empty without the extension), which is not copied."""
    if header_length is None:
        length = len(body)
    else:
        try:
            length = int(header_length)
        except ValueError:
            raise errors.InvalidInput(f"{HEADER} must be an integer, got {header_length!r}") from None
        if length == 0:
            raise errors.InvalidInput(f"raw binary requests ({HEADER}: 0) are not supported; send a JSON header first")
        if not 0 < length <= len(body):
            raise errors.InvalidInput(f"{HEADER} is {length} but the body has only {len(body)} bytes")
    try:
        header = json.loads(bytes(body[:length]))
    except (ValueError, UnicodeDecodeError) as err:
        hint = f" (binary body without the {HEADER} header?)" if header_length is None else ""
        raise errors.InvalidInput(f"request body is not valid JSON{hint}: {err}") from None
    if not isinstance(header, dict):
        raise errors.InvalidInput(f"request body must be a JSON object, got {type(header).__name__}")
    return header, memoryview(body)[length:]


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
    head = json.dumps(header, separators=(",", ":")).encode()
    if not chunks:
        return head, None
    return b"".join([head, *chunks]), len(head)
