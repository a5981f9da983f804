"""HTTP/2's wire format as kiln's gRPC transport uses it (RFC 9113 frames, RFC 7541 literal header blocks), the
fields a well-formed request may carry (RFC 9113 §8), and the request and reply a stream carries.

Why a module of its own: both halves of a connection spell frames the same way (http2.py reads them in,
http2_answers.py writes answers out), and grpc_wire.py builds replies without needing a connection at all. What
they share holds no state, so it sits below all three and each fact here has this one owner.
"""

import re
import struct
from collections.abc import Awaitable, Callable, Iterable, Mapping
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass

PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
DATA, HEADERS, PRIORITY, RST_STREAM, SETTINGS, PUSH_PROMISE, PING, GOAWAY, WINDOW_UPDATE, CONTINUATION = range(10)
END_STREAM = ACK = 0x1
END_HEADERS, PADDED, PRIORITY_FLAG = 0x4, 0x8, 0x20
NO_ERROR, PROTOCOL_ERROR, INTERNAL_ERROR, FLOW_CONTROL_ERROR, STREAM_CLOSED = 0x0, 0x1, 0x2, 0x3, 0x5
FRAME_SIZE_ERROR, REFUSED_STREAM, CANCEL, COMPRESSION_ERROR, ENHANCE_YOUR_CALM = 0x6, 0x7, 0x8, 0x9, 0xB
# SETTINGS identifiers.
(SETTINGS_HEADER_TABLE_SIZE, SETTINGS_ENABLE_PUSH, SETTINGS_MAX_CONCURRENT_STREAMS, SETTINGS_INITIAL_WINDOW_SIZE,
 SETTINGS_MAX_FRAME_SIZE, SETTINGS_MAX_HEADER_LIST_SIZE) = (0x1, 0x2, 0x3, 0x4, 0x5, 0x6)  # fmt: skip

# Every window and the largest frame a peer takes until its SETTINGS say otherwise, and the largest window.
DEFAULT_WINDOW, DEFAULT_FRAME, MAX_WINDOW = 65_535, 16_384, (1 << 31) - 1
# The most streams a client may have open on one connection (kiln's SETTINGS say so; more are refused).
MAX_STREAMS = 256
HEAD = struct.Struct(">IBI")  # a frame's 9 bytes before its payload: length (24 bits) + type, flags, stream id
# RFC 9113 §8.2.1: a field name is not empty and holds no control, space, upper case, DEL or byte above it, nor a
# colon past a pseudo-header's first; a value holds no NUL, CR or LF and neither starts nor ends with SP or HTAB.
_BAD_NAME = re.compile(rb"\A\Z|[^\x21-\x40\x5b-\x7e]|(?!\A):")
_BAD_VALUE = re.compile(rb"[\0\r\n]|\A[ \t]|[ \t]\Z")
# Headers of HTTP/1.1 connections that HTTP/2 forbids (RFC 9113 §8.2.2); `te` may only say "trailers".
_CONNECTION_SPECIFIC = frozenset({"connection", "keep-alive", "proxy-connection", "transfer-encoding", "upgrade"})
_REQUIRED = (":method", ":scheme", ":path")
# The pseudo-headers a request may carry (RFC 9113 §8.3.1), each at most once and before every regular field.
_PSEUDO = frozenset({b":method", b":scheme", b":authority", b":path"})


class ConnectionError_(Exception):
    """The peer broke the protocol: the connection ends with GOAWAY(code)."""

    def __init__(self, code: int, message: str) -> None:
        super().__init__(message)
        self.code = code


def frame(kind: int, flags: int, stream_id: int, payload: bytes = b"") -> bytes:
    return HEAD.pack(len(payload) << 8 | kind, flags, stream_id) + payload


def header_frames(stream_id: int, block: bytes, end_stream: bool, max_frame: int) -> list[bytes]:
    """A header block as HEADERS and, past the peer's SETTINGS_MAX_FRAME_SIZE, CONTINUATION frames: a frame over
    its limit is a connection error for the peer (RFC 9113 4.2), and an error answer's text comes from clients."""
    first = END_STREAM if end_stream else 0
    if len(block) <= max_frame:
        return [frame(HEADERS, first | END_HEADERS, stream_id, block)]
    pieces = [block[i : i + max_frame] for i in range(0, len(block), max_frame)]
    out = [frame(HEADERS, first, stream_id, pieces[0])]
    out += [frame(CONTINUATION, 0, stream_id, piece) for piece in pieces[1:-1]]
    out.append(frame(CONTINUATION, END_HEADERS, stream_id, pieces[-1]))
    return out


def _integer(value: int, prefix_bits: int, first: int) -> bytes:
    """An HPACK integer (RFC 7541 5.1) whose first byte carries `first` in the bits above the prefix."""
    limit = (1 << prefix_bits) - 1
    if value < limit:
        return bytes([first | value])
    out, value = bytearray([first | limit]), value - limit
    while value >= 128:
        out.append(value % 128 + 128)
        value //= 128
    out.append(value)
    return bytes(out)


def encode_headers(headers: list[tuple[bytes, bytes]]) -> bytes:
    """A header block of literals never added to the peer's table and not Huffman-coded: it needs no state,
    so blocks can be built once and sent on every connection."""
    out = bytearray()
    for name, value in headers:
        out += b"\x00" + _integer(len(name), 7, 0) + name + _integer(len(value), 7, 0) + value
    return bytes(out)


def fields(block: Iterable[tuple[bytes, bytes]]) -> dict[str, str] | None:
    """A decoded header block's fields as text, or None if one is malformed (RFC 9113 §8.2.1): that makes its
    request malformed, a stream error, while the block decoded and HPACK's table stays in step. A value may hold
    obs-text (0x80-0xFF, which HTTP allows): bytes that are not UTF-8 are kept as surrogate escapes, so a header
    kiln reads as text (grpc-timeout, :path) fails that header's own check and is answered as any bad one."""
    headers: dict[str, str] = {}
    regular = False
    for name, value in block:
        if _BAD_NAME.search(name) or _BAD_VALUE.search(value):
            return None
        text = name.decode()
        if name[:1] != b":":
            regular = True
        elif regular or name not in _PSEUDO or text in headers:  # §8.3: a request's own, once each, first
            return None
        headers[text] = value.decode(errors="surrogateescape")
    return headers


def malformed(headers: dict[str, str]) -> bool:
    """Whether a request's well-formed fields still make a malformed request (RFC 9113 §8.2.2, §8.3.1): a
    connection-specific header, te other than "trailers", a content-length that is not a number, or a pseudo-header
    missing or (:path) empty."""
    for name, value in headers.items():
        if name in _CONNECTION_SPECIFIC or (name == "te" and value != "trailers"):
            return True
    length = headers.get("content-length", "0")
    if not (length.isascii() and length.isdigit()):
        return True
    return any(not headers.get(name) for name in _REQUIRED)


def declared_length(headers: dict[str, str] | None) -> int | None:
    """A request's content-length (checked a number by `malformed`), which its DATA must add up to (§8.1.1)."""
    value = headers.get("content-length") if headers else None
    return None if value is None else int(value)


def self_dependent(fields: bytes, stream_id: int) -> bool:
    """Whether priority fields (a PRIORITY frame's, HEADERS' first five bytes with PRIORITY_FLAG) make the stream
    depend on itself: a stream error (RFC 9113 §5.3.1). kiln does not prioritise, but checks them."""
    return int.from_bytes(fields[:4], "big") & 0x7FFFFFFF == stream_id


@dataclass
class Request:
    """A stream's request: its decoded headers and the whole body."""

    headers: dict[str, str]
    body: bytes


@dataclass
class Reply:
    """An answer: an encoded header block, a body, and a trailer block (None: the headers end the stream)."""

    head: bytes
    body: bytes = b""
    trailers: bytes | None = None


Handler = Callable[[Request], Awaitable[Reply]]


@dataclass
class Settings:
    """What a connection serves and within which limits (the HTTP/1.1 server's settings, for HTTP/2)."""

    handler: Handler
    # The answer to a request its headers alone refuse (an RPC not served, say), sent before its body: a client
    # streaming a body it will not end would otherwise wait out the body timeout. None: read on.
    refuse: Callable[[Mapping[str, str]], Reply | None]
    # The answer to a request whose body is over max_body bytes (sent before the rest of it arrives).
    oversize: Reply
    max_body: int
    # The whole body's size from the request's headers and its first bytes (gRPC's length prefix), None while too
    # few have come or where they do not tell.
    body_size: Callable[[Mapping[str, str], bytes], int | None]
    # Held while a body larger than a stream's first window is read and answered: bodies are read only once
    # admitted, as the HTTP/1.1 server reads large ones (DataPlane.admit).
    admit: Callable[[int], AbstractAsyncContextManager[None]]
    max_header_bytes: int
    header_timeout: float
    body_timeout: float
    keep_alive_timeout: float
    max_connections: int
