"""HTTP/2 server connections (RFC 9113) for the gRPC service, on the server's event loop.

Why kiln has its own: grpcio's server drove every call through its C core, a poller thread and Cython callbacks,
and cost 2.4x the CPU per request of kiln's HTTP/1.1 path. What gRPC needs of HTTP/2 is small: cleartext with
prior knowledge (no TLS, no Upgrade, no server push), request streams that end in one body, and answers made of
headers, data and trailers. A connection parses frames from one buffer, decodes header blocks with `hpack`
(a block seen before under the same dynamic table is looked up, not decoded: a client's calls repeat theirs),
and sends each answer as one write: headers, data frames and trailers together whenever the peer's flow-control
windows allow, else the rest as window updates arrive.

This module holds the connection's lifecycle, its limits and frames in. Under it: request bodies in (the windows
kiln grants, admission, requests handed to the handler) are http2_bodies.Bodies, and the sending half (streams,
the client's windows, answers out) is http2_answers.Answers; Connection inherits both, and all spell frames with
http2_wire.

Limits (the same settings as the HTTP/1.1 server's): a header block over max_header_bytes ends the connection
(ENHANCE_YOUR_CALM), trailers included; a body over max_body bytes gets the handler's `oversize` answer; the
preface, and every header block once begun, must arrive within header_timeout, each stream's body must make
progress every body_timeout (other frames do not count), and a connection with no stream open for
keep_alive_timeout is sent GOAWAY and closed; past max_connections a new connection is closed at once; at most
http2_wire.MAX_STREAMS streams are open on a connection (more are refused: the client retries). A client that does
not read what it is sent is not read either (pause_writing): its PINGs and SETTINGS cannot pile up replies. One
that breaks the protocol is sent GOAWAY and closed lingering: what it still sends is read and dropped until it
closes too, or for transport_views.LINGER_SECONDS.
"""

import asyncio
import logging
import struct
import time

import hpack

from kiln_serving import http2_answers, http2_bodies, http2_wire, transport_views

log = logging.getLogger(__name__)

# Largest frame kiln accepts (it says so in its SETTINGS): a 400 KB batch arrives in one frame, not 25.
MAX_FRAME = 1 << 20
_CACHED_BLOCKS = 256
# Frames handled in one turn of the event loop; the rest of a read waits for the next turn (a 256 KB read holds
# 26,000 1-byte DATA frames, ~3 us each: 80 ms of the loop at once), reading paused while over _BACKLOG bytes wait.
_FRAMES_PER_TURN, _BACKLOG = 2048, 1 << 20


class Connection(http2_bodies.Bodies, asyncio.Protocol):
    """One client connection: frames in, bodies and streams handed to settings.handler, answers out (the inherited
    halves)."""

    def __init__(self, settings: http2_wire.Settings, registry: set["Connection"]) -> None:
        super().__init__(settings, asyncio.get_running_loop())
        self.registry = registry
        self.buffer = bytearray()
        self.started = False  # the client's preface arrived
        self.decoder = hpack.Decoder(max_header_list_size=settings.max_header_bytes)
        self.blocks: dict[bytes, dict[str, str]] = {}
        self.continuing: tuple[int, bytearray, bool] | None = None  # stream, block so far, END_STREAM
        self.self_dependent: set[int] = set()  # streams opened depending on themselves, reset once decoded
        self.block_since = 0.0  # when the header block in `continuing` began
        self.writing_paused = False  # the client does not read: frames in wait, so replies cannot pile up
        self.last_read = time.monotonic()
        self.timer: asyncio.TimerHandle | None = None
        self.lingering: asyncio.TimerHandle | None = None  # closing: our side shut, the client's awaited (close)
        self.backlogged = False  # reading paused: more than _BACKLOG bytes wait for their turn (_pace)

    # -- connection ------------------------------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's TCP transports are not asyncio.Transport subclasses, but have its methods.
        self.transport = transport  # type: ignore[assignment]
        if len(self.registry) >= self.settings.max_connections:
            log.warning("refusing a gRPC connection: %d open, the limit is %d", len(self.registry),
                        self.settings.max_connections)  # fmt: skip
            transport.close()
            return
        self.registry.add(self)
        # Streams keep HTTP/2's default first window (http2_bodies says why); the connection's opens to the budget.
        ours = [(http2_wire.SETTINGS_MAX_CONCURRENT_STREAMS, http2_wire.MAX_STREAMS),
                (http2_wire.SETTINGS_MAX_FRAME_SIZE, MAX_FRAME),
                (http2_wire.SETTINGS_MAX_HEADER_LIST_SIZE, self.settings.max_header_bytes)]  # fmt: skip
        payload = b"".join(struct.pack(">HI", key, value) for key, value in ours)
        settings = http2_wire.frame(http2_wire.SETTINGS, 0, 0, payload)
        self.transport.write(settings + self.open_budget())  # type: ignore[union-attr]
        self.timer = self.loop.call_later(self.settings.header_timeout, self._check)

    def connection_lost(self, exc: Exception | None) -> None:
        self.registry.discard(self)
        if self.lingering is not None:
            self.lingering.cancel()
        self._end_streams()  # the client hung up: nobody waits for these answers

    def _end_streams(self) -> None:
        if self.timer is not None:
            self.timer.cancel()
        for stream in self.streams.values():
            if stream.task is not None:
                stream.task.cancel()
        self.streams.clear()

    def pause_writing(self) -> None:
        """The client is not reading: stop reading it too (frames already in wait in the buffer)."""
        self.writing_paused = True
        if self.transport is not None and not self.transport.is_closing():
            self.transport.pause_reading()

    def resume_writing(self) -> None:
        self.writing_paused = False
        # Held back by the server, frames and bodies were not late: their clocks restart with reading.
        self.last_read = now = time.monotonic()
        for stream in self.streams.values():
            stream.progress = now
        if self.transport is not None and not self.transport.is_closing():
            if not self.backlogged:
                self.transport.resume_reading()
            self.loop.call_soon(self.data_received, b"")  # the frames that waited

    def _check(self) -> None:
        """The connection's one timer: preface, header blocks, each body's progress and idle time. It comes back
        when the earliest clock running runs out (_next_check), so none runs long by more than a little slack."""
        now, s = time.monotonic(), self.settings
        if not self.started:
            return self.close(http2_wire.PROTOCOL_ERROR, "no HTTP/2 preface within the header timeout")
        if self.continuing is not None and now - self.block_since >= s.header_timeout:
            return self.close(http2_wire.CANCEL, "header block not received within the header timeout")
        late = self.buffer and now - self.last_read >= s.body_timeout
        if not self.writing_paused and (late or self._stalled(now)):
            return self.close(http2_wire.CANCEL, "request not received within the body timeout")
        if self.idle_since is not None and now - self.idle_since >= s.keep_alive_timeout:
            return self.close(http2_wire.NO_ERROR, "idle")
        self.timer = self.loop.call_later(self._next_check(now) - now, self._check)

    def _next_check(self, now: float) -> float:
        """When the earliest clock running runs out (a timer of fixed period let a header block or a stalled body
        live up to twice its timeout), or the shortest timeout from now (a clock started later runs out no sooner);
        never sooner than a tenth of that from now. Every stream's body clock counts, those _stalled exempts too
        (received, or waiting for admission): for them the check comes early, never late."""
        s = self.settings
        shortest = min(s.header_timeout, s.body_timeout, s.keep_alive_timeout)
        due = [now + shortest, *(stream.progress + s.body_timeout for stream in self.streams.values())]
        if self.continuing is not None:
            due.append(self.block_since + s.header_timeout)
        if self.buffer:
            due.append(self.last_read + s.body_timeout)
        if self.idle_since is not None:
            due.append(self.idle_since + s.keep_alive_timeout)
        return max(min(when for when in due if when > now), now + shortest / 10)

    def close(self, code: int, message: str, linger: bool = False) -> None:
        """GOAWAY with `code`, then close (streams running are cancelled); `linger` for a client that may still be
        sending (one that broke the protocol), as connections.py closes HTTP/1.1: else its unread bytes made the
        kernel send an RST, which could discard the GOAWAY saying why."""
        if self.transport is None or self.transport.is_closing() or self.lingering is not None:
            return
        goaway = struct.pack(">II", self.last_stream, code) + message.encode()
        self.transport.write(http2_wire.frame(http2_wire.GOAWAY, 0, 0, goaway))
        if not linger:
            self.transport.close()
            return
        self._end_streams()
        self.buffer.clear()
        self.lingering = transport_views.linger(self.transport, self.loop)
        if self.lingering is not None:
            self.transport.resume_reading()  # paused for a client not reading: what it sends is dropped now

    def shut_down(self) -> None:
        """Graceful: no new streams (GOAWAY NO_ERROR naming the last one taken); close once the last answer is out."""
        self.going_away = True
        if self.transport is not None and not self.transport.is_closing():
            goaway = struct.pack(">II", self.last_stream, http2_wire.NO_ERROR)
            self.transport.write(http2_wire.frame(http2_wire.GOAWAY, 0, 0, goaway))
            if not self.streams:
                self.transport.close()

    # -- frames in -------------------------------------------------------------------------------------------

    def data_received(self, data: bytes) -> None:
        if self.transport is None or self.transport.is_closing() or self.lingering is not None:
            return
        if data:
            self.last_read = time.monotonic()
            self.buffer += data
        try:
            self._frames()
        except http2_wire.ConnectionError_ as err:
            log.info("closing a gRPC connection: %s", err)
            self.close(err.code, str(err), linger=True)
            return
        self._pace()

    def _pace(self) -> None:
        """Reading paused while more than _BACKLOG bytes wait for their turn (_frames), resumed once fewer do."""
        if self.transport is None or self.transport.is_closing():
            return
        if len(self.buffer) > _BACKLOG:
            self.backlogged = True
            self.transport.pause_reading()
        elif self.backlogged:
            self.backlogged = False
            if not self.writing_paused:
                self.transport.resume_reading()

    def _frames(self) -> None:
        buf = self.buffer
        if not self.started:
            if len(buf) < len(http2_wire.PREFACE):
                if not http2_wire.PREFACE.startswith(bytes(buf)):
                    raise http2_wire.ConnectionError_(http2_wire.PROTOCOL_ERROR, "not an HTTP/2 connection preface")
                return
            if buf[: len(http2_wire.PREFACE)] != http2_wire.PREFACE:
                raise http2_wire.ConnectionError_(http2_wire.PROTOCOL_ERROR, "not an HTTP/2 connection preface")
            del buf[: len(http2_wire.PREFACE)]
            self.started = True
        pos, size, handled = 0, len(buf), 0
        view = memoryview(buf)
        try:
            while size - pos >= 9:
                kind_length, flags, stream_id = http2_wire.HEAD.unpack_from(buf, pos)
                length, kind = kind_length >> 8, kind_length & 0xFF
                if length > MAX_FRAME:
                    raise http2_wire.ConnectionError_(http2_wire.FRAME_SIZE_ERROR, f"frame of {length} bytes")
                end = pos + 9 + length
                if end > size:
                    break
                payload = bytes(view[pos + 9 : end])
                pos = end
                self._frame(kind, flags, stream_id & 0x7FFFFFFF, payload)
                handled += 1
                if self.writing_paused or self.transport is None or self.transport.is_closing():
                    break
                if handled == _FRAMES_PER_TURN and size - pos >= 9:  # the loop's other work first
                    self.loop.call_soon(self.data_received, b"")
                    break
        finally:
            view.release()
            del buf[:pos]

    def _frame(self, kind: int, flags: int, stream_id: int, payload: bytes) -> None:
        if self.continuing is not None and kind != http2_wire.CONTINUATION:
            raise http2_wire.ConnectionError_(http2_wire.PROTOCOL_ERROR, "header block interrupted")
        if kind == http2_wire.DATA:
            self._data(flags, stream_id, payload)
        elif kind == http2_wire.HEADERS:
            self._headers(flags, stream_id, payload)
        elif kind == http2_wire.CONTINUATION:
            # continuing[0] is -stream_id while a trailer block continues (see _headers).
            if self.continuing is None or abs(self.continuing[0]) != stream_id:
                raise http2_wire.ConnectionError_(http2_wire.PROTOCOL_ERROR, "CONTINUATION without HEADERS")
            block = self.continuing[1]
            block += payload
            self._within_limit(block)
            if not payload and not flags & http2_wire.END_HEADERS:
                self._count_empty()
            if flags & http2_wire.END_HEADERS:
                sid, _, end = self.continuing
                self.continuing = None
                self._open(sid, bytes(block), end)
        elif kind == http2_wire.SETTINGS:
            if stream_id:
                raise http2_wire.ConnectionError_(http2_wire.PROTOCOL_ERROR, "SETTINGS on a stream")
            if flags & http2_wire.ACK:
                if payload:
                    raise http2_wire.ConnectionError_(http2_wire.FRAME_SIZE_ERROR, "SETTINGS ACK with a payload")
            else:
                self._settings(stream_id, payload)
        elif kind == http2_wire.WINDOW_UPDATE:
            self._not_idle(stream_id, "WINDOW_UPDATE")
            self._window_update(stream_id, payload)
        elif kind == http2_wire.PING:
            if stream_id:
                raise http2_wire.ConnectionError_(http2_wire.PROTOCOL_ERROR, "PING on a stream")
            if len(payload) != 8:
                raise http2_wire.ConnectionError_(http2_wire.FRAME_SIZE_ERROR, "PING not of 8 bytes")
            if not flags & http2_wire.ACK and self.transport is not None:
                self.transport.write(http2_wire.frame(http2_wire.PING, http2_wire.ACK, 0, payload))
        elif kind == http2_wire.RST_STREAM:
            if len(payload) != 4:
                raise http2_wire.ConnectionError_(http2_wire.FRAME_SIZE_ERROR, "RST_STREAM not of 4 bytes")
            self._not_idle(stream_id, "RST_STREAM")
            stream = self._forget(stream_id, reset=False)
            if stream is not None:
                self._cancelled()
                if stream.task is not None:
                    stream.task.cancel()
            self._maybe_idle()
        elif kind == http2_wire.GOAWAY:  # the client's asks kiln to open no streams, and kiln opens none: the
            if stream_id:  # connection serves on (a PING after it is answered) until the client closes or it idles
                raise http2_wire.ConnectionError_(http2_wire.PROTOCOL_ERROR, "GOAWAY on a stream")
        elif kind == http2_wire.PUSH_PROMISE:
            raise http2_wire.ConnectionError_(http2_wire.PROTOCOL_ERROR, "a client cannot push")
        elif kind == http2_wire.PRIORITY:  # kiln does not prioritise, but checks it as RFC 9113 §6.3 says
            if not stream_id:
                raise http2_wire.ConnectionError_(http2_wire.PROTOCOL_ERROR, "PRIORITY on stream 0")
            if len(payload) != 5:  # a stream error: only that stream is reset
                self._reset(stream_id, http2_wire.FRAME_SIZE_ERROR)
            elif http2_wire.self_dependent(payload, stream_id):
                self._reset(stream_id, http2_wire.PROTOCOL_ERROR)
        # Unknown frame types are ignored, as RFC 9113 says.

    def _not_idle(self, stream_id: int, kind: str) -> None:
        """RFC 9113 §5.1: RST_STREAM on stream 0, or either frame on a stream the client never opened (idle; even
        ids are the server's, which opens none), is a connection error."""
        idle = stream_id % 2 == 0 or stream_id > self.last_stream
        if (stream_id == 0 and kind == "RST_STREAM") or (stream_id and idle):
            raise http2_wire.ConnectionError_(http2_wire.PROTOCOL_ERROR, f"{kind} on idle stream {stream_id}")

    def _headers(self, flags: int, stream_id: int, payload: bytes) -> None:
        block, itself = self._unpad(flags, payload), False
        if flags & http2_wire.PRIORITY_FLAG:  # 5 bytes of priority before the block (RFC 9113 §6.2), ignored
            if len(block) < 5:  # too short for them: FRAME_SIZE_ERROR (§4.2), or its padding covers them
                short = len(payload) < 5 + bool(flags & http2_wire.PADDED)
                code = http2_wire.FRAME_SIZE_ERROR if short else http2_wire.PROTOCOL_ERROR
                raise http2_wire.ConnectionError_(code, "HEADERS too short for its priority fields")
            itself = http2_wire.self_dependent(block, stream_id)
            block = block[5:]
        if stream_id in self.streams:  # trailers after a body: they only end the stream
            if self.streams[stream_id].received:
                message = f"HEADERS after the end of stream {stream_id}"
                raise http2_wire.ConnectionError_(http2_wire.PROTOCOL_ERROR, message)
            if not flags & http2_wire.END_STREAM:
                raise http2_wire.ConnectionError_(http2_wire.PROTOCOL_ERROR, "HEADERS in the middle of a request")
            self._trailers(flags, stream_id, block)
            return
        if stream_id in self.reset_streams:  # trailers already on the way when kiln reset it: ignored (RFC 9113 5.1)
            self._trailers(flags, stream_id, block)
            return
        if stream_id % 2 == 0 or stream_id <= self.last_stream:
            raise http2_wire.ConnectionError_(http2_wire.PROTOCOL_ERROR, f"stream {stream_id} cannot be opened")
        self.last_stream = stream_id
        if itself:  # reset once its block is decoded (HPACK's table)
            self.self_dependent.add(stream_id)
        if flags & http2_wire.END_HEADERS:
            self._open(stream_id, block, bool(flags & http2_wire.END_STREAM))
        else:
            self._continue(stream_id, block, bool(flags & http2_wire.END_STREAM))

    def _trailers(self, flags: int, stream_id: int, block: bytes) -> None:
        """A trailer block: checked and decoded like any (HPACK's table must follow it), then dropped."""
        if flags & http2_wire.END_HEADERS:
            self._open(-stream_id, block, True)
        else:
            self._continue(-stream_id, block, True)  # continuing[0] is -stream_id while a trailer block continues

    def _continue(self, stream_id: int, block: bytes, end: bool) -> None:
        self._within_limit(block)
        self.continuing = (stream_id, bytearray(block), end)
        self.block_since = time.monotonic()

    def _within_limit(self, block: bytes | bytearray) -> None:
        if len(block) > (limit := self.settings.max_header_bytes):
            raise http2_wire.ConnectionError_(http2_wire.ENHANCE_YOUR_CALM, f"header block over {limit} bytes")

    def _decode(self, block: bytes) -> dict[str, str] | None:
        """The block's headers, None if a field is malformed; a block decoded before under the same dynamic table
        is looked up. Only a block HPACK cannot decode ends the connection (COMPRESSION_ERROR: the table is lost);
        a malformed field is the request's fault, and the table followed its block all the same."""
        known = self.blocks.get(block)
        if known is not None:
            return known
        table = self.decoder.header_table
        before = (table.maxsize, tuple(table.dynamic_entries))
        try:
            headers = http2_wire.fields(self.decoder.decode(block, raw=True))
        except hpack.HPACKError as err:
            raise http2_wire.ConnectionError_(http2_wire.COMPRESSION_ERROR, f"header block: {err}") from err
        if (table.maxsize, tuple(table.dynamic_entries)) != before:
            self.blocks.clear()  # the table changed: what blocks mean changed
        elif headers is not None and len(self.blocks) < _CACHED_BLOCKS:
            self.blocks[block] = headers
        return headers

    def _open(self, stream_id: int, block: bytes, end: bool) -> None:
        self._within_limit(block)
        if stream_id < 0:  # trailers of -stream_id: malformed ones make the request malformed
            trailers = self._decode(block)
            if (stream := self.streams.get(-stream_id)) is not None:
                if trailers is None or any(name[:1] == ":" for name in trailers):  # no pseudo-header (§8.1)
                    self._reset(stream.id, http2_wire.PROTOCOL_ERROR)
                else:
                    self._received(stream)
            return
        headers = self._decode(block)
        if headers is None or http2_wire.malformed(headers) or stream_id in self.self_dependent:  # stream errors
            self.self_dependent.discard(stream_id)
            self._reset(stream_id, http2_wire.PROTOCOL_ERROR)
            return
        if self.going_away or len(self.streams) >= http2_wire.MAX_STREAMS:
            self._reset(stream_id, http2_wire.REFUSED_STREAM)
            return
        stream = http2_answers.Stream(stream_id, self.peer_window, headers=headers)
        self.streams[stream_id] = stream
        self.idle_since = None
        refusal = self.settings.refuse(headers)
        if refusal is not None:  # answered from its headers: the rest of its body is dropped as it comes
            stream.received = end
            self._send(stream, refusal)
        elif end:
            self._received(stream)
