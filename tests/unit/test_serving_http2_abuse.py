"""kiln's own HTTP/2 transport for gRPC against peers that try to make it hold or do more than a call needs: PINGs
sent to a server whose answers are never read, a half-sent call kept open by other frames, floods of empty frames,
oversized trailer blocks, and trailers that reach a stream the server already reset. Frames are built by hand
(h2 would refuse to send most of them)."""

import socket
import struct
import time
from collections.abc import Iterator
from pathlib import Path

import hpack
import pytest
from http2_support import (
    CANCEL,
    ENHANCE_YOUR_CALM,
    LIVE,
    PATIENCE,
    Frames,
    goaway_codes,
    raw,
    request_fields,
    strict_config,
)
from serving_support import config, serving
from serving_support import trained_folder as make_trained_folder

from kiln_cluster.controlplane import free_port
from kiln_serving import Server
from kiln_serving.http2_wire import (
    ACK,
    CONTINUATION,
    DATA,
    END_HEADERS,
    END_STREAM,
    FRAME_SIZE_ERROR,
    GOAWAY,
    HEADERS,
    PING,
    PREFACE,
    PROTOCOL_ERROR,
    RST_STREAM,
    SETTINGS,
    WINDOW_UPDATE,
    frame,
)

PONG = 0x1  # PING's ACK flag


@pytest.fixture(scope="module")
def folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_trained_folder(tmp_path_factory.mktemp("http2") / "tiny")


@pytest.fixture(scope="module")
def strict(folder: Path) -> Iterator[Server]:
    with serving(strict_config(folder, keep_alive_timeout_seconds=30, max_body_bytes=1024)) as running:
        yield running


def opened(server: Server) -> socket.socket:
    """A raw connection past the preface and SETTINGS."""
    sock = raw(server)
    sock.sendall(PREFACE + frame(SETTINGS, 0, 0))
    return sock


def ended_by_stream(frames: list[tuple[int, int, int, bytes]], stream: int) -> bool:
    kind, flags, sid, _ = frames[-1]
    return sid == stream and (kind == RST_STREAM or (kind in (HEADERS, DATA) and bool(flags & END_STREAM)))


def serves_on(sock: socket.socket, frames: Frames, encoder: hpack.Encoder, stream: int = 3) -> None:
    """A call on `stream` is answered with nothing ending the connection: it survived what came before."""
    call = frame(HEADERS, END_HEADERS, stream, encoder.encode(request_fields("ServerLive")))
    sock.sendall(call + frame(DATA, END_STREAM, stream, LIVE))
    answer = frames.until(lambda f: ended_by_stream([f], stream))
    assert answer[-1][0] == HEADERS and GOAWAY not in [f[0] for f in answer]


def reset(frames: Frames) -> tuple[int, int]:
    """The stream and error code of the server's next RST_STREAM."""
    got = frames.until(lambda f: f[0] == RST_STREAM)[-1]
    return got[2], struct.unpack(">I", got[3])[0]


def test_a_client_that_sends_pings_but_never_reads_is_no_longer_read_and_is_served_once_it_reads(
    folder: Path,
) -> None:
    cfg = config(folder, grpc_port=free_port(), keep_alive_timeout_seconds=PATIENCE)  # no stream: it idles
    with serving(cfg) as patient, raw(patient) as sock:
        # Small buffers fill soon; smaller still, loopback TCP trickles the answers at a few KB/s once read.
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 64 << 10)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 64 << 10)
        sock.sendall(PREFACE + frame(SETTINGS, 0, 0))
        ping = frame(PING, 0, 0, b"12345678")
        pings, sent = memoryview(ping * 4096), 0
        sock.settimeout(2)
        with pytest.raises(TimeoutError):  # the server stops reading: its PING ACKs would pile up unsent
            while sent < 64 << 20:
                sent += sock.send(pings[sent % len(pings) :])
        assert sent < 16 << 20  # what the sockets' buffers hold, not the 64 MiB the client had to send
        # Once the client reads, the server reads on: every PING is answered, then a call on the same connection.
        cut, whole = sent % len(ping), sent // len(ping)  # the last PING may have been cut off when sending blocked
        got, pos, pongs = bytearray(), 0, 0
        sock.settimeout(PATIENCE)
        while pongs < whole + bool(cut):
            if pongs == whole and cut:
                sock.sendall(ping[cut:])
                cut = 0
            got += sock.recv(1 << 20)
            while len(got) - pos >= 9 and len(got) - pos >= 9 + (length := int.from_bytes(got[pos : pos + 3], "big")):
                if got[pos + 3] == PING:
                    assert got[pos + 4] == PONG and got[pos + 9 : pos + 17] == b"12345678"
                    pongs += 1
                pos += 9 + length
        frames = Frames(sock)
        frames.buffer = bytes(got[pos:])
        encoder = hpack.Encoder()
        sock.sendall(frame(HEADERS, END_HEADERS, 1, encoder.encode(request_fields("ServerLive"))))
        sock.sendall(frame(DATA, END_STREAM, 1, LIVE))
        answer = frames.until(lambda f: ended_by_stream([f], 1))
        assert answer[-1][0] == HEADERS and GOAWAY not in [f[0] for f in answer]


@pytest.mark.parametrize("kept_by", ["pings", "empty-continuations"])
def test_a_half_sent_call_or_header_block_is_timed_out_however_many_other_frames_come(
    strict: Server, kept_by: str
) -> None:
    block = hpack.Encoder().encode(request_fields("ModelInfer"))
    with opened(strict) as sock:
        if kept_by == "pings":  # 10 of 1000 bytes, then only PINGs: no progress of the body
            sock.sendall(frame(HEADERS, END_HEADERS, 1, block) + frame(DATA, 0, 1, b"\x00\x00\x00\x03\xe8" + b"\0" * 5))
            keep = frame(PING, 0, 0, b"12345678")
        else:  # a header block that never ends
            sock.sendall(frame(HEADERS, 0, 1, block[:2]))
            keep = frame(CONTINUATION, 0, 1)
        started = time.monotonic()
        sock.settimeout(0.1)
        seen = b""
        while b"request not received" not in seen and b"header block not received" not in seen:
            assert time.monotonic() - started < 10, "still open 20 timeouts later"
            sock.sendall(keep)
            try:
                if not (got := sock.recv(1 << 16)):
                    break
                seen += got
            except TimeoutError:
                pass
        sock.settimeout(60)
        frames = Frames(sock)
        frames.buffer = seen
        assert goaway_codes(frames.until_closed()) == [CANCEL]


@pytest.mark.parametrize("kind", [DATA, CONTINUATION])
def test_a_flood_of_empty_frames_ends_the_connection_with_enhance_your_calm(strict: Server, kind: int) -> None:
    block = hpack.Encoder().encode(request_fields("ServerLive"))
    head = frame(HEADERS, END_HEADERS if kind == DATA else 0, 1, block)
    with opened(strict) as sock:
        sock.sendall(head + frame(kind, 0, 1) * 5000)
        assert goaway_codes(Frames(sock).until_closed()) == [ENHANCE_YOUR_CALM]


def test_a_trailer_block_over_the_limit_ends_the_connection_with_enhance_your_calm(strict: Server) -> None:
    block = hpack.Encoder().encode(request_fields("ServerLive"))
    no_ops = b"\x20" * 12_000  # HPACK dynamic table size updates: cheap to send, decoded one by one
    with opened(strict) as sock:
        sock.sendall(frame(HEADERS, END_HEADERS, 1, block) + frame(DATA, 0, 1, LIVE))
        sock.sendall(frame(HEADERS, END_HEADERS | END_STREAM, 1, no_ops))
        assert goaway_codes(Frames(sock).until_closed()) == [ENHANCE_YOUR_CALM]


def test_trailers_on_a_stream_the_server_reset_are_ignored_and_the_connection_serves_on(strict: Server) -> None:
    encoder = hpack.Encoder()
    declared = b"\x00" + (1 << 20).to_bytes(4, "big")  # 1 MiB, over the 1024-byte limit: refused on its prefix
    with opened(strict) as sock:
        sock.sendall(frame(HEADERS, END_HEADERS, 1, encoder.encode(request_fields("ModelInfer"))))
        sock.sendall(frame(DATA, 0, 1, declared + b"\0" * 1000))
        frames = Frames(sock)
        refused = frames.until(lambda f: f[0] == RST_STREAM and f[2] == 1)
        assert any(b"grpc-status" in hpack.Decoder().decode(f[3], raw=True)[3][0] for f in refused if f[0] == HEADERS)
        # The client, not having read that yet, finishes its request (more DATA, then trailers) and calls again.
        sock.sendall(
            frame(DATA, 0, 1, b"\0" * 10) + frame(HEADERS, END_HEADERS | END_STREAM, 1, encoder.encode([("x", "1")]))
        )
        serves_on(sock, frames, encoder)


@pytest.mark.parametrize(
    ("sent", "code"),
    [
        pytest.param(frame(RST_STREAM, 0, 0, bytes(4)), PROTOCOL_ERROR, id="RST_STREAM on stream 0"),
        pytest.param(frame(RST_STREAM, 0, 5, bytes(4)), PROTOCOL_ERROR, id="RST_STREAM on an idle stream"),
        pytest.param(frame(RST_STREAM, 0, 1, bytes(3)), FRAME_SIZE_ERROR, id="RST_STREAM of 3 bytes"),
        pytest.param(frame(WINDOW_UPDATE, 0, 0, bytes(4)), PROTOCOL_ERROR, id="WINDOW_UPDATE of 0 on the connection"),
        pytest.param(frame(WINDOW_UPDATE, 0, 7, bytes([0, 0, 0, 1])), PROTOCOL_ERROR, id="WINDOW_UPDATE, idle stream"),
        pytest.param(frame(SETTINGS, ACK, 0, bytes(6)), FRAME_SIZE_ERROR, id="SETTINGS ACK with a payload"),
        pytest.param(frame(SETTINGS, 0, 0, bytes(5)), FRAME_SIZE_ERROR, id="SETTINGS of 5 bytes"),
        pytest.param(frame(SETTINGS, 0, 0, struct.pack(">HI", 0x2, 2)), PROTOCOL_ERROR, id="ENABLE_PUSH of 2"),
        pytest.param(frame(PING, 0, 1, b"12345678"), PROTOCOL_ERROR, id="PING on a stream"),
        pytest.param(frame(GOAWAY, 0, 1, bytes(8)), PROTOCOL_ERROR, id="GOAWAY on a stream"),
        pytest.param(frame(DATA, 0, 2, b"x"), PROTOCOL_ERROR, id="DATA on a stream only the server may open"),
    ],
)  # fmt: skip
def test_frames_rfc_9113_forbids_end_the_connection_with_its_error(strict: Server, sent: bytes, code: int) -> None:
    with opened(strict) as sock:
        sock.sendall(sent)
        assert goaway_codes(Frames(sock).until_closed()) == [code]


def test_a_window_update_of_0_on_an_open_stream_resets_only_that_stream(strict: Server) -> None:
    encoder = hpack.Encoder()
    with opened(strict) as sock:
        sock.sendall(frame(HEADERS, END_HEADERS, 1, encoder.encode(request_fields("ServerLive"))))
        sock.sendall(frame(WINDOW_UPDATE, 0, 1, bytes(4)))
        frames = Frames(sock)
        assert reset(frames) == (1, PROTOCOL_ERROR)
        serves_on(sock, frames, encoder)


@pytest.mark.parametrize(
    "fields",
    [
        pytest.param([*request_fields("ServerLive"), ("X-Upper", "1")], id="an upper-case name"),
        pytest.param([*request_fields("ServerLive"), ("connection", "keep-alive")], id="a connection header"),
        pytest.param([*request_fields("ServerLive"), ("te", "gzip")], id="te other than trailers"),
        pytest.param([f for f in request_fields("ServerLive") if f[0] != ":path"], id="no :path"),
    ],
)
def test_a_malformed_request_resets_its_stream_and_the_connection_serves_on(
    strict: Server, fields: list[tuple[str, str]]
) -> None:
    encoder = hpack.Encoder()
    with opened(strict) as sock:
        sock.sendall(frame(HEADERS, END_HEADERS, 1, encoder.encode(fields)) + frame(DATA, END_STREAM, 1, LIVE))
        frames = Frames(sock)
        assert reset(frames) == (1, PROTOCOL_ERROR)
        serves_on(sock, frames, encoder)
