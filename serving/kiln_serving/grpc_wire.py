"""gRPC over HTTP/2 (gRPC's PROTOCOL-HTTP2 document) for unary calls: a path names the method, the body is one
length-prefixed protobuf message, the answer is that message plus a grpc-status trailer, and an error is a
Trailers-Only answer. Deadlines (grpc-timeout) are kept: a call past its deadline ends DEADLINE_EXCEEDED. A request
message may be compressed with what the Dispatcher's `inflate` takes (named by grpc-encoding, advertised in
grpc-accept-encoding); answers are not. A message is parsed and answered within the Dispatcher's `admit` for its
size (the transport may have admitted the call already by the length prefix, body_size, before reading its body).
"""

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from contextlib import AbstractAsyncContextManager
from contextvars import ContextVar
from dataclasses import dataclass
from typing import Any

from google.protobuf.message import DecodeError

from kiln_serving import http2_wire

log = logging.getLogger(__name__)

# The status codes, by the names errors.STATUS uses.
CODES = {
    "OK": 0, "CANCELLED": 1, "UNKNOWN": 2, "INVALID_ARGUMENT": 3, "DEADLINE_EXCEEDED": 4, "NOT_FOUND": 5,
    "ALREADY_EXISTS": 6, "PERMISSION_DENIED": 7, "RESOURCE_EXHAUSTED": 8, "FAILED_PRECONDITION": 9, "ABORTED": 10,
    "OUT_OF_RANGE": 11, "UNIMPLEMENTED": 12, "INTERNAL": 13, "UNAVAILABLE": 14, "DATA_LOSS": 15,
    "UNAUTHENTICATED": 16,
}  # fmt: skip
_UNITS = {"H": 3600.0, "M": 60.0, "S": 1.0, "m": 1e-3, "u": 1e-6, "n": 1e-9}
# The most bytes of grpc-message once percent-encoded: an error's text may come from a client (a model name).
_MESSAGE_BYTES = 4096
# A message's 5-byte prefix: flags, then its length.
_PREFIX = 5
_OK_TRAILERS = http2_wire.encode_headers([(b"grpc-status", b"0")])


class Abort(Exception):
    """End the call with a status code (a name of CODES) and a message for the client."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code


def _head(encodings: Sequence[str]) -> list[tuple[bytes, bytes]]:
    """An answer's headers; grpc-accept-encoding names the compressions a request message may use."""
    accepted = ",".join(("identity", *encodings)).encode()
    return [(b":status", b"200"), (b"content-type", b"application/grpc"), (b"grpc-accept-encoding", accepted)]


def _percent(text: str) -> bytes:
    """grpc-message's encoding: bytes outside printable ASCII, and '%', as %XX; cut at a whole character once
    _MESSAGE_BYTES are used (a character takes up to 12 bytes)."""
    out, size = [], 0
    for char in text[:_MESSAGE_BYTES]:
        raw = char.encode(errors="replace")
        piece = (
            raw if len(raw) == 1 and 0x20 <= raw[0] <= 0x7E and raw != b"%" else b"".join(b"%%%02X" % b for b in raw)
        )
        size += len(piece)
        if size > _MESSAGE_BYTES:
            break
        out.append(piece)
    return b"".join(out)


def error(code: str, message: str, encodings: Sequence[str] = ()) -> http2_wire.Reply:
    """A Trailers-Only answer: the status travels in the only header block."""
    status = [(b"grpc-status", str(CODES[code]).encode()), (b"grpc-message", _percent(message))]
    return http2_wire.Reply(http2_wire.encode_headers(_head(encodings) + status))


def not_grpc(status: int, message: str) -> http2_wire.Reply:
    """A plain HTTP answer to a request that is not a gRPC call at all."""
    head = http2_wire.encode_headers([(b":status", str(status).encode()), (b"content-type", b"text/plain")])
    return http2_wire.Reply(head, message.encode())


def timeout_seconds(value: str) -> float:
    """grpc-timeout ("100m", "5S", ...: at most 8 digits and a unit) in seconds."""
    digits, unit = value[:-1], value[-1:]
    if not (digits.isascii() and digits.isdigit() and len(digits) <= 8 and unit in _UNITS):
        raise Abort("INTERNAL", f"malformed grpc-timeout {value!r}")
    return int(digits) * _UNITS[unit]


def body_size(first: bytes) -> int | None:
    """A unary request body's whole size from its first bytes (the message's length prefix); None before 5."""
    return None if len(first) < _PREFIX else _PREFIX + int.from_bytes(first[1:_PREFIX], "big")


def grpc_content(headers: Mapping[str, str]) -> bool:
    """Whether a request's content-type says it carries gRPC (application/grpc, +proto or others after it)."""
    return headers.get("content-type", "").startswith("application/grpc")


def call_size(headers: Mapping[str, str], first: bytes) -> int | None:
    """body_size for a gRPC call; None for a request that is not one (its body has no length prefix to read)."""
    return body_size(first) if grpc_content(headers) else None


def message(body: bytes) -> tuple[bool, memoryview]:
    """The one message of a unary request body, and whether it is compressed."""
    if len(body) < _PREFIX:
        raise Abort("INTERNAL", "the request carries no message")
    if body[0] not in (0, 1):
        raise Abort("INTERNAL", f"unknown message flags {body[0]:#04x}")
    if len(body) != body_size(body):
        raise Abort("INTERNAL", "a unary request carries exactly one whole message")
    return body[0] == 1, memoryview(body)[_PREFIX:]


def framed(message: bytes) -> bytes:
    """A message as a unary body: not compressed, its length, then the message."""
    return b"".join((b"\x00", len(message).to_bytes(4, "big"), message))


@dataclass(frozen=True)
class Framed:
    """An answer serialized and framed already (`framed`), by a method that does that off the event loop when the
    answer is large: a 60 MB answer took ~90 ms to serialize and frame."""

    body: bytes


@dataclass(frozen=True)
class Method:
    """One RPC: how to parse its request message (a coroutine: a large one may be parsed off the event loop), and
    the coroutine answering it."""

    parse: Callable[[bytes | memoryview], Awaitable[Any]]
    call: Callable[[Any], Awaitable[Any]]


def _anyway(size: int) -> AbstractAsyncContextManager[None]:
    return contextlib.nullcontext()


async def _parsed(method: Method, payload: bytes | memoryview) -> Any:
    try:
        return await method.parse(payload)
    except DecodeError as err:
        raise Abort("INTERNAL", f"cannot parse the request message: {err}") from err


# The deadline's timer of the call being answered, for a method that tells a call its deadline ended from one its
# client cancelled (both cancel the method's task).
_DEADLINE: ContextVar[asyncio.Timeout | None] = ContextVar("kiln_grpc_deadline", default=None)


def past_deadline() -> bool:
    """Whether the call being answered was cancelled by its deadline."""
    timer = _DEADLINE.get()
    return timer is not None and timer.expired()


class Dispatcher:
    """The http2 handler: checks the call, finds the method by path, inflates its message, and parses and runs it
    within `admit(size)` and the deadline. `inflate(message, encoding)` decompresses a message compressed with one
    of `encodings` (raising Abort when it cannot)."""

    def __init__(
        self,
        methods: Mapping[str, Method],
        unknown: Callable[[str], Abort],
        encodings: Sequence[str] = (),
        inflate: Callable[[memoryview, str], Awaitable[bytes | memoryview]] | None = None,
        admit: Callable[[int], AbstractAsyncContextManager[None]] = _anyway,
    ) -> None:
        self.methods = methods
        self.unknown = unknown
        self.encodings = tuple(encodings) if inflate is not None else ()
        self.inflate = inflate
        self.admit = admit
        self._ok_head = http2_wire.encode_headers(_head(self.encodings))

    async def _message(self, body: bytes, encoding: str) -> bytes | memoryview:
        compressed, payload = message(body)
        if not compressed:
            return payload
        if encoding == "identity":
            raise Abort("INTERNAL", "the message is flagged compressed but grpc-encoding names no compression")
        if encoding not in self.encodings or self.inflate is None:
            accepted = ", ".join(("identity", *self.encodings))
            raise Abort("UNIMPLEMENTED", f"message compressed with {encoding!r}, which kiln does not take "
                                         f"(grpc-accept-encoding: {accepted})")  # fmt: skip
        return await self.inflate(payload, encoding)

    def refusal(self, headers: Mapping[str, str]) -> http2_wire.Reply | None:
        """The answer a gRPC call gets from its headers alone, sent before its body (http2_wire.Settings.refuse):
        UNIMPLEMENTED for an RPC not served, whose client may stream a body it never ends. None for a served one,
        and for a request that is not gRPC at all: that one is read whole, as any HTTP/2 request, then answered."""
        path = headers.get(":path", "")
        if headers.get(":method") != "POST" or not grpc_content(headers) or path in self.methods:
            return None
        unknown = self.unknown(path)
        return error(unknown.code, str(unknown), self.encodings)

    async def __call__(self, request: http2_wire.Request) -> http2_wire.Reply:
        headers = request.headers
        if headers.get(":method") != "POST":
            return not_grpc(405, "gRPC calls are POST requests")
        if not grpc_content(headers):
            return not_grpc(415, "not a gRPC request: content-type must be application/grpc")
        refused = self.refusal(headers)
        if refused is not None:
            return refused
        method = self.methods[headers[":path"]]
        try:
            payload = await self._message(request.body, headers.get("grpc-encoding", "identity"))
            async with self.admit(len(payload)):
                answer = await self._answer(method, payload, headers.get("grpc-timeout"))
        except Abort as err:
            return error(err.code, str(err), self.encodings)
        body = answer.body if isinstance(answer, Framed) else framed(answer.SerializeToString())
        return http2_wire.Reply(self._ok_head, body, _OK_TRAILERS)

    @staticmethod
    async def _answer(method: Method, payload: bytes | memoryview, timeout: str | None) -> Any:
        """The method's answer; once the call's deadline has passed, DEADLINE_EXCEEDED, as grpc's servers end it:
        at once for a timeout of 0, and for an answer ready only past the deadline (the client gave up on it)."""
        if timeout is None:
            return await method.call(await _parsed(method, payload))
        seconds = timeout_seconds(timeout)
        deadline = time.monotonic() + seconds
        if seconds > 0:
            parsed = await _parsed(method, payload)
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(deadline - time.monotonic()) as timer:
                    _DEADLINE.set(timer)
                    answer = await method.call(parsed)
                if time.monotonic() < deadline:
                    return answer
        raise Abort("DEADLINE_EXCEEDED", "deadline exceeded")
