"""The closed-loop gRPC client of the serving bench: the HTTP/2 counterpart of loadclient.py.

Like the HTTP/1.1 client it sends the same pre-encoded call again and again on its own connection (one call in
flight, closed loop) and reads only what it must: frames up to its stream's end, and the grpc-status of the
trailers. A gRPC library's client costs the two shared cores several times what the server spends per call,
which would measure the client rather than the server; this one costs about what loadclient does.
"""

import asyncio
import struct
import time

import hpack

_PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
_HEAD = struct.Struct(">IBI")
_DATA, _HEADERS, _SETTINGS, _PING, _GOAWAY, _WINDOW_UPDATE = 0, 1, 4, 6, 7, 8
_END_STREAM, _ACK, _END_HEADERS = 0x1, 0x1, 0x4
_WINDOW = (1 << 31) - 1


def _frame(kind: int, flags: int, stream_id: int, payload: bytes = b"") -> bytes:
    return _HEAD.pack(len(payload) << 8 | kind, flags, stream_id) + payload


def call(path: str, message: bytes, authority: str = "bench") -> tuple[bytes, bytes]:
    """A unary call's header block and body, encoded once (literal headers: no table state to keep)."""
    headers = [(":method", "POST"), (":scheme", "http"), (":path", path), (":authority", authority),
               ("content-type", "application/grpc"), ("te", "trailers")]  # fmt: skip
    block = hpack.Encoder().encode([hpack.NeverIndexedHeaderTuple(n, v) for n, v in headers], huffman=False)
    return block, b"\x00" + len(message).to_bytes(4, "big") + message


async def client(
    port: int, request: tuple[bytes, bytes], until: float, latencies: list[float], errors: list[int]
) -> None:
    """Send `request` back to back until `until`; append each OK call's latency, and a 1 per other answer."""
    block, body = request
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    decoder, known = hpack.Decoder(), dict[bytes, dict[str, str]]()
    # Windows as large as HTTP/2 allows, so the server never waits for this client's updates.
    settings = struct.pack(">HI", 0x4, _WINDOW)
    writer.write(
        _PREFACE + _frame(_SETTINGS, 0, 0, settings) + _frame(_WINDOW_UPDATE, 0, 0, struct.pack(">I", _WINDOW - 65_535))
    )
    stream, received = 1, 0
    try:
        while time.perf_counter() < until:
            started = time.perf_counter()
            writer.write(_frame(_HEADERS, _END_HEADERS, stream, block) + _frame(_DATA, _END_STREAM, stream, body))
            status = None
            while True:
                kind_length, flags, sid = _HEAD.unpack(await reader.readexactly(9))
                length, kind = kind_length >> 8, kind_length & 0xFF
                payload = await reader.readexactly(length) if length else b""
                if kind == _SETTINGS and not flags & _ACK:
                    writer.write(_frame(_SETTINGS, _ACK, 0))
                elif kind == _PING and not flags & _ACK:
                    writer.write(_frame(_PING, _ACK, 0, payload))
                elif kind == _GOAWAY:
                    raise ConnectionError("GOAWAY from the server")
                elif kind == _DATA:
                    received += length
                elif kind == _HEADERS and sid == stream:
                    headers = known.get(payload)
                    if headers is None:
                        headers = dict(decoder.decode(payload))  # type: ignore[arg-type]
                        known[payload] = headers  # the server's blocks are literal: the table never changes
                    status = headers.get("grpc-status", status)
                if sid == stream and flags & _END_STREAM:
                    break
            if received > 1 << 30:  # keep the server's window to this connection open
                writer.write(_frame(_WINDOW_UPDATE, 0, 0, struct.pack(">I", received)))
                received = 0
            if status == "0":
                latencies.append(time.perf_counter() - started)
            else:
                errors.append(1)
            stream += 2
    finally:
        writer.close()
