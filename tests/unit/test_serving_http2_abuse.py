"""kiln's own HTTP/2 transport for gRPC against peers that try to make it hold or do more than a call needs: PINGs
sent to a server whose answers are never read, a half-sent call kept open by other frames or living past its
timeout, floods of empty frames, oversized trailer blocks, trailers that reach a stream the server already reset,
and frames or header fields RFC 9113 forbids. Frames are built by hand (h2 would refuse to send most of them)."""

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
    SERVICE,
    Client,
    Frames,
    goaway_codes,
    infer_body,
    raw,
    request_fields,
    strict_config,
)
from serving_support import config, images_batch, serving
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
    PADDED,
    PING,
    PREFACE,
    PRIORITY,
    PRIORITY_FLAG,
    PROTOCOL_ERROR,
    RST_STREAM,
    SETTINGS,
    STREAM_CLOSED,
    WINDOW_UPDATE,
    frame,
)

PONG = 0x1  # PING's ACK flag
# The timed test's header and body timeouts: long enough that a loaded machine's delays are small beside them.
TIMEOUT = 2.0


@pytest.fixture(scope="module")
def folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_trained_folder(tmp_path_factory.mktemp("http2") / "tiny")


@pytest.fixture(scope="module")
def strict(folder: Path) -> Iterator[Server]:
    with serving(strict_config(folder, keep_alive_timeout_seconds=30, max_body_bytes=1024)) as running:
        yield running


@pytest.fixture(scope="module")
def timed(folder: Path) -> Iterator[Server]:
    cfg = strict_config(folder, header_timeout_seconds=TIMEOUT, body_timeout_seconds=TIMEOUT,
                        keep_alive_timeout_seconds=PATIENCE)  # fmt: skip
    with serving(cfg) as running:
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


@pytest.mark.parametrize("left", ["header block", "body"])
def test_a_half_sent_header_block_or_body_is_closed_soon_after_its_timeout_and_never_before(
    timed: Server, left: str
) -> None:
    block = hpack.Encoder().encode(request_fields("ModelInfer"))
    with opened(timed) as sock:
        # Begin just after the server's first check, at its header timeout: a timer of fixed period (the shortest
        # timeout) came back a whole period later and found the block, or the body, not yet late: 2x the timeout.
        time.sleep(TIMEOUT + 0.1)
        started = time.monotonic()
        if left == "header block":
            sock.sendall(frame(HEADERS, 0, 1, block[:2]))
        else:  # 10 of 1000 bytes
            sock.sendall(frame(HEADERS, END_HEADERS, 1, block) + frame(DATA, 0, 1, b"\x00\x00\x00\x03\xe8" + bytes(5)))
        assert goaway_codes(Frames(sock).until_closed()) == [CANCEL]
        waited = time.monotonic() - started
    # Never early (the server's clock starts once the frames are in); late by its slack (a tenth of the timeout)
    # and what a loaded machine adds, well short of the old 2x.
    assert TIMEOUT <= waited < 1.5 * TIMEOUT + 0.3


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
        pytest.param(frame(PRIORITY, 0, 0, bytes(5)), PROTOCOL_ERROR, id="PRIORITY on stream 0"),
        pytest.param(frame(HEADERS, END_HEADERS | PRIORITY_FLAG, 1, bytes(4)), FRAME_SIZE_ERROR,
                     id="HEADERS too short for its priority fields"),
        pytest.param(frame(HEADERS, END_HEADERS | PADDED | PRIORITY_FLAG, 1, bytes([4]) + bytes(5)), PROTOCOL_ERROR,
                     id="HEADERS padded over its priority fields"),
    ],
)  # fmt: skip
def test_frames_rfc_9113_forbids_end_the_connection_with_its_error(strict: Server, sent: bytes, code: int) -> None:
    with opened(strict) as sock:
        sock.sendall(sent)
        assert goaway_codes(Frames(sock).until_closed()) == [code]


def test_a_client_still_sending_when_the_server_ends_the_connection_gets_the_goaway_not_a_reset(
    strict: Server,
) -> None:
    # A forbidden frame, then 4 MB more, sent before reading (as the HTTP/1.1 test of connections.py does). Closed at
    # once with that unread, the server's kernel sent an RST: the client's send failed, the GOAWAY saying why was
    # lost. Lingering, the server reads and drops the rest until the client is done.
    with opened(strict) as sock:
        sock.sendall(frame(PING, 0, 1, b"12345678") + b"x" * 4_000_000)
        assert goaway_codes(Frames(sock).until_closed()) == [PROTOCOL_ERROR]


@pytest.mark.parametrize(
    ("sent", "code"),
    [
        pytest.param(frame(WINDOW_UPDATE, 0, 1, bytes(4)), PROTOCOL_ERROR, id="WINDOW_UPDATE of 0"),
        pytest.param(frame(PRIORITY, 0, 1, bytes(4)), FRAME_SIZE_ERROR, id="PRIORITY of 4 bytes"),
        pytest.param(frame(PRIORITY, 0, 1, struct.pack(">IB", 1, 15)), PROTOCOL_ERROR, id="PRIORITY on itself"),
    ],
)
def test_a_stream_error_on_an_open_stream_resets_only_that_stream(strict: Server, sent: bytes, code: int) -> None:
    encoder = hpack.Encoder()
    with opened(strict) as sock:
        sock.sendall(frame(HEADERS, END_HEADERS, 1, encoder.encode(request_fields("ServerLive"))))
        sock.sendall(sent)
        frames = Frames(sock)
        assert reset(frames) == (1, code)
        serves_on(sock, frames, encoder)


def test_a_stream_reset_while_its_large_body_is_admitted_gives_its_place_back(folder: Path) -> None:
    body = infer_body(images_batch(400))  # 300 KB: a large request, read only once admitted
    cfg = config(folder, grpc_port=free_port(), max_concurrent_large_requests=1)
    with serving(cfg) as one, opened(one) as sock:
        encoder, frames = hpack.Encoder(), Frames(sock)
        for stream, error in [(1, frame(WINDOW_UPDATE, 0, 1, bytes(4))), (3, frame(PRIORITY, 0, 3, bytes(4)))]:
            sock.sendall(frame(HEADERS, END_HEADERS, stream, encoder.encode(request_fields("ModelInfer"))))
            sock.sendall(frame(DATA, 0, stream, body[:16_384]))
            # Admitted (the one place is free again): its window opens to the rest. Then a stream error ends it.
            assert frames.until(lambda f: f[0] == WINDOW_UPDATE and f[2] != 0)[-1][2] == stream
            sock.sendall(error)
            assert reset(frames)[0] == stream
        with Client(one) as client:
            assert client.wait(client.call("ModelInfer", body)).status == 0


def test_priority_a_client_may_signal_is_ignored_and_its_call_answered(strict: Server) -> None:
    encoder = hpack.Encoder()
    priority = struct.pack(">IB", 1 << 31, 15)  # exclusively on the root, weight 16
    padded = bytes([3]) + priority + encoder.encode(request_fields("ServerLive")) + bytes(3)
    with opened(strict) as sock:
        sock.sendall(frame(PRIORITY, 0, 1, priority) + frame(HEADERS, END_HEADERS | PADDED | PRIORITY_FLAG, 1, padded))
        sock.sendall(frame(PRIORITY, 0, 1, priority) + frame(DATA, END_STREAM, 1, LIVE))
        frames = Frames(sock)
        assert frames.until(lambda f: ended_by_stream([f], 1))[-1][0] == HEADERS  # its trailers, not a reset
        serves_on(sock, frames, encoder)


@pytest.mark.parametrize(
    "fields",
    [
        pytest.param([*request_fields("ServerLive"), ("X-Upper", "1")], id="an upper-case name"),
        pytest.param([*request_fields("ServerLive"), ("connection", "keep-alive")], id="a connection header"),
        pytest.param([*request_fields("ServerLive"), ("te", "gzip")], id="te other than trailers"),
        pytest.param([f for f in request_fields("ServerLive") if f[0] != ":path"], id="no :path"),
        pytest.param([*request_fields("ServerLive"), ("x-note", "a\x00b")], id="NUL in a value"),
        pytest.param([*request_fields("ServerLive"), ("x-note", "a\r\nx-more: 1")], id="CR LF in a value"),
        pytest.param([*request_fields("ServerLive"), ("x-note", " a")], id="a value beginning with a space"),
        pytest.param([*request_fields("ServerLive"), ("x-note", "a\t")], id="a value ending with a tab"),
        pytest.param([*request_fields("ServerLive"), (b"x-n\xf6te", b"1")], id="a name of obs-text"),
        pytest.param([*request_fields("ServerLive"), ("x:note", "1")], id="a colon in a name"),
        pytest.param(
            [*request_fields("ServerLive"), ("content-length", str(len(LIVE) + 1))],
            id="a content-length its DATA do not add up to",
        ),
        pytest.param([*request_fields("ServerLive"), ("content-length", "5x")], id="a content-length not a number"),
        # RFC 9113 §8.3: a request's own pseudo-headers only, each once, before the regular fields; :path not empty.
        pytest.param(
            [*request_fields("ServerLive")[:4], (":foo", "1"), *request_fields("ServerLive")[4:]],
            id="an unknown pseudo-header",
        ),
        pytest.param([(":status", "200"), *request_fields("ServerLive")], id="a response's pseudo-header"),
        pytest.param([("x-note", "1"), *request_fields("ServerLive")], id="a pseudo-header after a regular field"),
        pytest.param([(":method", "POST"), *request_fields("ServerLive")], id="a duplicated :method"),
        pytest.param(request_fields("ServerLive", (":path", "")), id="an empty :path"),
    ],
)
def test_a_malformed_request_resets_its_stream_and_the_connection_serves_on(
    strict: Server, fields: list[tuple[str | bytes, str | bytes]]
) -> None:
    encoder = hpack.Encoder()
    with opened(strict) as sock:
        sock.sendall(frame(HEADERS, END_HEADERS, 1, encoder.encode(fields)) + frame(DATA, END_STREAM, 1, LIVE))
        frames = Frames(sock)
        assert reset(frames) == (1, PROTOCOL_ERROR)
        serves_on(sock, frames, encoder)


@pytest.mark.parametrize("closed_by", ["its END_STREAM, then the answer", "its RST_STREAM"])
def test_data_on_a_stream_the_client_closed_is_a_stream_closed_error_and_the_connection_serves_on(
    strict: Server, closed_by: str
) -> None:
    # RFC 9113 §5.1: a client that ended or reset a stream knows it is closed; data after that is its error. Data
    # on a stream the server reset is ignored instead (it may have been sent before the reset arrived).
    encoder = hpack.Encoder()
    with opened(strict) as sock:
        frames = Frames(sock)
        sock.sendall(frame(HEADERS, END_HEADERS, 1, encoder.encode(request_fields("ServerLive"))))
        if closed_by == "its RST_STREAM":
            sock.sendall(frame(RST_STREAM, 0, 1, struct.pack(">I", CANCEL)))
        else:
            sock.sendall(frame(DATA, END_STREAM, 1, LIVE))
            assert frames.until(lambda f: ended_by_stream([f], 1))[-1][0] == HEADERS
        sock.sendall(frame(DATA, 0, 1, LIVE))
        assert reset(frames) == (1, STREAM_CLOSED)
        serves_on(sock, frames, encoder)


def test_a_request_that_is_not_grpc_is_read_whole_then_answered_and_not_read_as_a_grpc_message(
    strict: Server,
) -> None:
    # Its first bytes are no gRPC length prefix: read as one, "xxxxx" claimed 2 GB and got RESOURCE_EXHAUSTED
    # before its end; and a path kiln does not serve is refused early only for a gRPC call (which may stream).
    encoder = hpack.Encoder()
    fields = request_fields("Nothing", ("content-type", "text/plain"))
    with opened(strict) as sock:
        sock.sendall(frame(HEADERS, END_HEADERS, 1, encoder.encode(fields)) + frame(DATA, 0, 1, b"x" * 1000))
        sock.sendall(frame(DATA, END_STREAM, 1, b"x" * 1000))
        frames = Frames(sock)
        answer = frames.until(lambda f: ended_by_stream([f], 1))
        heads = [dict(hpack.Decoder().decode(p)) for kind, _, _, p in answer if kind == HEADERS]
        assert heads[0][":status"] == "415", heads
        sock.sendall(frame(HEADERS, END_HEADERS, 3, encoder.encode(request_fields("ServerLive"))))
        sock.sendall(frame(DATA, END_STREAM, 3, LIVE))
        later = frames.until(lambda f: ended_by_stream([f], 3))
        # Answered once whole: no RST_STREAM telling the client to stop sending a body it had already ended.
        assert not [f for f in answer + later if f[0] == RST_STREAM and f[2] == 1], answer + later


def test_a_stream_depending_on_itself_is_reset_and_a_true_content_length_is_served(strict: Server) -> None:
    # RFC 9113 §5.3.1: a stream error; the header block is still decoded, so HPACK's table stays in step.
    encoder = hpack.Encoder()
    itself = struct.pack(">IB", 1, 15) + encoder.encode([*request_fields("ServerLive"), ("x-new", "indexed")])
    with opened(strict) as sock:
        sock.sendall(frame(HEADERS, END_HEADERS | PRIORITY_FLAG, 1, itself) + frame(DATA, END_STREAM, 1, LIVE))
        frames = Frames(sock)
        assert reset(frames) == (1, PROTOCOL_ERROR)
        fields = [*request_fields("ServerLive"), ("x-new", "indexed"), ("content-length", str(len(LIVE)))]
        sock.sendall(frame(HEADERS, END_HEADERS, 3, encoder.encode(fields)) + frame(DATA, END_STREAM, 3, LIVE))
        assert frames.until(lambda f: ended_by_stream([f], 3))[-1][0] == HEADERS  # its trailers: served
        serves_on(sock, frames, encoder, stream=5)


@pytest.mark.parametrize("trailer", [("x-note", "\0"), (":path", "/")], ids=["a NUL", "a pseudo-header"])
def test_a_malformed_trailer_resets_its_stream_and_the_connection_serves_on(
    strict: Server, trailer: tuple[str, str]
) -> None:
    encoder = hpack.Encoder()
    with opened(strict) as sock:
        sock.sendall(frame(HEADERS, END_HEADERS, 1, encoder.encode(request_fields("ServerLive"))))
        trailers = encoder.encode([trailer])
        sock.sendall(frame(DATA, 0, 1, LIVE) + frame(HEADERS, END_HEADERS | END_STREAM, 1, trailers))
        frames = Frames(sock)
        assert reset(frames) == (1, PROTOCOL_ERROR)
        serves_on(sock, frames, encoder)


@pytest.mark.parametrize(
    ("name", "value", "status"),
    [
        pytest.param("x-note", b"caf\xe9", 0, id="in a header kiln does not read: served"),
        pytest.param(":path", f"{SERVICE}/Server".encode() + b"\xe9Live", 12, id="in :path: UNIMPLEMENTED"),
        pytest.param("grpc-timeout", b"9\xe9S", 13, id="in grpc-timeout: INTERNAL, as any bad one"),
    ],
)
def test_a_value_of_obs_text_is_taken_and_where_kiln_reads_it_answered_as_any_bad_value(
    strict: Server, name: str, value: bytes, status: int
) -> None:
    # Not UTF-8, and not malformed either (RFC 9113 §8.2.1): never a COMPRESSION_ERROR for a block HPACK decoded.
    encoder = hpack.Encoder()
    fields = {key.encode(): text.encode() for key, text in request_fields("ServerLive")} | {name.encode(): value}
    with opened(strict) as sock:
        sock.sendall(frame(HEADERS, END_HEADERS, 1, encoder.encode(list(fields.items()))))
        sock.sendall(frame(DATA, END_STREAM, 1, LIVE))
        frames = Frames(sock)
        answer = [f for f in frames.until(lambda f: ended_by_stream([f], 1)) if f[2] == 1]
        decoder = hpack.Decoder()
        got = dict(field for kind, _, _, block in answer if kind == HEADERS for field in decoder.decode(block))
        assert got["grpc-status"] == str(status)
        serves_on(sock, frames, encoder)


def test_streams_opened_only_to_be_cancelled_end_the_connection_past_a_burst(strict: Server) -> None:
    # Rapid reset (CVE-2023-44487). 500 cancelled calls are a client's right; 1,500 more, sent at once, are past
    # the burst of 1,000 unless this machine took 30 s to send them (refilled at 33 a second). One write of 40 KB,
    # read by the server whole: unread bytes at its close would reset the connection before the GOAWAY is read.
    encoder = hpack.Encoder()

    def cancelled(streams: range) -> bytes:
        return b"".join(frame(HEADERS, END_HEADERS, sid, encoder.encode(request_fields("ServerLive")))
                        + frame(RST_STREAM, 0, sid, struct.pack(">I", CANCEL)) for sid in streams)  # fmt: skip

    with opened(strict) as sock:
        frames = Frames(sock)
        sock.sendall(cancelled(range(1, 1000, 2)))
        serves_on(sock, frames, encoder, stream=1001)
        sock.sendall(cancelled(range(1003, 4003, 2)))
        assert goaway_codes(frames.until_closed()) == [ENHANCE_YOUR_CALM]
