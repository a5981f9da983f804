"""Request bodies in, for kiln's HTTP/2 connections (http2.py): DATA frames, the windows the client is granted,
admission, and each request handed to the handler once it is whole.

Why a module of its own: what a connection agrees to hold is what bounds its memory, and that is a concern apart
from parsing frames. A stream starts with HTTP/2's default window (64 KiB), so before the server knows a body it
holds no more of it than the HTTP/1.1 server holds of a request it has not admitted. The body's first bytes
(gRPC's length prefix, settings.body_size) say how large it is: one over max_body is answered at once, one that
fits the first window is simply read, and a larger one waits for settings.admit (DataPlane.admit: a few large
bodies at a time) before its stream's window opens to exactly what it still needs. The connection's window is a
budget (BUDGET) of bytes held for bodies not admitted, given back as they leave (handed to the handler, or
dropped), plus what each admission grants ahead; spreading bodies over many streams does not raise it. A body
is timed out by its own progress (its bytes), never while it waits for admission, and not kept alive by other
frames.
"""

import asyncio
import logging
import struct
import time

from kiln_serving import http2_answers, http2_wire

log = logging.getLogger(__name__)

# Bytes of bodies not yet admitted that one connection holds at most: its receive window, given back as they leave.
BUDGET = 1 << 20
# Frames carrying nothing (DATA not ending its stream, CONTINUATION not ending its block) a connection may send: a
# flood of them is abuse (CVE-2019-9518), ended with ENHANCE_YOUR_CALM as nghttp2 does.
MAX_EMPTY_FRAMES = 1024
# Bodies this large are joined off the event loop: CPython's bytes.join releases the GIL from 1 MiB.
_JOIN_ON_A_THREAD = 1 << 20
# The length prefix's size: a body's size is known once this much of it has come.
_PREFIX = 5


def _window_update(stream_id: int, increment: int) -> bytes:
    return http2_wire.frame(http2_wire.WINDOW_UPDATE, 0, stream_id, struct.pack(">I", increment))


class Bodies(http2_answers.Answers):
    """Bodies in on one connection, within the windows this side grants (see the module docstring)."""

    def __init__(self, settings: http2_wire.Settings, loop: asyncio.AbstractEventLoop) -> None:
        super().__init__()
        self.settings = settings
        self.loop = loop
        self.last_stream = 0  # the highest stream the client opened
        self.recv_window = http2_wire.DEFAULT_WINDOW  # the connection's, as this side granted it
        self.credit = 0  # connection window to give back (below zero: window granted ahead and never used)
        self.empty_frames = 0

    def open_budget(self) -> bytes:
        """The WINDOW_UPDATE that opens the connection's window from HTTP/2's default to BUDGET."""
        self.recv_window = BUDGET
        return _window_update(0, BUDGET - http2_wire.DEFAULT_WINDOW)

    @staticmethod
    def _unpad(flags: int, payload: bytes) -> bytes:
        if flags & http2_wire.PADDED:
            if not payload or payload[0] >= len(payload):
                raise http2_wire.ConnectionError_(http2_wire.PROTOCOL_ERROR, "padding longer than the frame")
            return payload[1 : len(payload) - payload[0]]
        return payload

    def _count_empty(self) -> None:
        self.empty_frames += 1
        if self.empty_frames > MAX_EMPTY_FRAMES:
            raise http2_wire.ConnectionError_(http2_wire.ENHANCE_YOUR_CALM, "a flood of empty frames")

    # -- windows ---------------------------------------------------------------------------------------------

    def _give_back(self, n: int, now: bool = False) -> None:
        """Return n bytes of connection window; sent once a quarter of the budget is due (or `now`)."""
        self.credit += n
        if self.credit > 0 and (now or self.credit >= BUDGET // 4):
            if self.transport is not None and not self.transport.is_closing():
                self.transport.write(_window_update(0, self.credit))
            self.recv_window += self.credit
            self.credit = 0

    def _release(self, stream: http2_answers.Stream) -> None:
        """The stream's body left the connection (handed on or dropped): its held bytes come back to the budget,
        less the window granted ahead that it never used."""
        self._give_back(stream.owed - stream.granted)
        stream.owed = stream.granted = 0

    def _forget(self, stream_id: int, reset: bool) -> http2_answers.Stream | None:
        stream = super()._forget(stream_id, reset)
        if stream is not None:
            self._release(stream)
        return stream

    def _admitted(self, stream: http2_answers.Stream) -> None:
        """Admission came: open the stream's window to what its body still needs, and grant that much ahead on
        the connection (the admission, not the budget, bounds it); its bytes held so far leave the budget."""
        assert stream.expected is not None
        stream.admitted = True
        stream.progress = time.monotonic()  # the wait was this side's, not the client's
        more = max(0, stream.expected - stream.size)
        if more > stream.recv_window and self.transport is not None and not self.transport.is_closing():
            self.transport.write(_window_update(stream.id, more - stream.recv_window))
            stream.recv_window = more
        stream.granted, owed, stream.owed = more, stream.owed, 0
        self._give_back(owed + more, now=True)

    # -- DATA ------------------------------------------------------------------------------------------------

    def _data(self, flags: int, stream_id: int, payload: bytes) -> None:
        n = len(payload)
        self.recv_window -= n
        if self.recv_window < 0:
            raise http2_wire.ConnectionError_(http2_wire.FLOW_CONTROL_ERROR, "data beyond the connection window")
        stream = self.streams.get(stream_id)
        if stream is None:
            if stream_id == 0 or stream_id % 2 == 0 or stream_id > self.last_stream:  # one the client never opened
                raise http2_wire.ConnectionError_(http2_wire.PROTOCOL_ERROR, f"DATA on idle stream {stream_id}")
            self._give_back(n)
            if stream_id not in self.reset_streams:  # closed by the client's own END_STREAM or RST_STREAM (§5.1)
                self._reset(stream_id, http2_wire.STREAM_CLOSED)
            return  # else kiln reset it (or answered it early): the client's late data is dropped
        if stream.received:
            raise http2_wire.ConnectionError_(http2_wire.PROTOCOL_ERROR, f"DATA after the end of stream {stream_id}")
        body = self._unpad(flags, payload)
        end = bool(flags & http2_wire.END_STREAM)
        if not body and not end:
            self._count_empty()
        # Window granted ahead pays first; the rest is held against the budget until the body leaves.
        stream.recv_window -= n
        ahead = min(n, stream.granted)
        stream.granted -= ahead
        if stream.recv_window < 0:
            self._give_back(n - ahead)
            if stream.task is not None:
                stream.task.cancel()
            self._reset(stream_id, http2_wire.FLOW_CONTROL_ERROR)
            return
        if stream.answered or not body:  # nothing to keep: an answered stream's rest, or padding only
            self._give_back(n - ahead)
            if end:
                self._received(stream)
            return
        stream.owed += n - ahead
        stream.progress = time.monotonic()
        stream.chunks.append(body)
        stream.size += len(body)
        if stream.expected is None and stream.size >= _PREFIX:
            first = stream.chunks[0] if len(stream.chunks[0]) >= _PREFIX else b"".join(stream.chunks)
            stream.expected = self.settings.body_size(stream.headers or {}, first)
        if stream.size > self.settings.max_body or (stream.expected or 0) > self.settings.max_body:
            stream.chunks = []  # answered now (before the rest comes); _finish tells the client to stop sending
            self._release(stream)
            self._send(stream, self.settings.oversize)
            return
        if end:
            self._received(stream)
        elif stream.task is None and (stream.expected or 0) > http2_wire.DEFAULT_WINDOW:
            stream.task = self.loop.create_task(self._serve(stream))  # its body is read on once admitted

    # -- requests to the handler -----------------------------------------------------------------------------

    def _received(self, stream: http2_answers.Stream) -> None:
        """The request is whole: hand it to the handler (or to its task, waiting since admission); unless its DATA
        do not add up to its content-length, which makes it malformed (RFC 9113 §8.1.1): a stream error."""
        stream.received = True
        if stream.answered:
            return
        declared = http2_wire.declared_length(stream.headers)
        if declared is not None and declared != stream.size:
            self._reset(stream.id, http2_wire.PROTOCOL_ERROR)
            return
        if stream.task is None:
            stream.task = self.loop.create_task(self._serve(stream))
        elif stream.whole is not None and not stream.whole.done():
            stream.whole.set_result(None)

    def _stalled(self, now: float) -> bool:
        """Whether a body the client is sending has not moved for the body timeout."""
        limit = self.settings.body_timeout
        for stream in self.streams.values():
            held_back = stream.task is not None and not stream.admitted
            if not (stream.received or stream.answered or held_back) and now - stream.progress >= limit:
                return True
        return False

    def _request(self, stream: http2_answers.Stream, body: bytes | None = None) -> http2_wire.Request:
        """The stream's request, its body joined here unless given; the body leaves the connection's keeping for
        the handler's."""
        assert stream.headers is not None
        self._release(stream)
        if body is None:
            body = stream.chunks[0] if len(stream.chunks) == 1 else b"".join(stream.chunks)
        stream.chunks = []
        return http2_wire.Request(stream.headers, body)

    async def _large_request(self, stream: http2_answers.Stream) -> http2_wire.Request:
        """The request of a body over the first window: one of a megabyte or more is joined on a thread (bytes.join
        lets go of the GIL from there; 60 MB took 60-90 ms of the event loop here)."""
        if stream.size < _JOIN_ON_A_THREAD or len(stream.chunks) == 1:
            return self._request(stream)
        return self._request(stream, await asyncio.to_thread(b"".join, stream.chunks))

    async def _serve(self, stream: http2_answers.Stream) -> None:
        try:
            if stream.expected is None or stream.expected <= http2_wire.DEFAULT_WINDOW:
                reply = await self.settings.handler(self._request(stream))
            else:  # a body larger than the first window: read on only once admitted, answered within it
                async with self.settings.admit(stream.expected):
                    if not stream.received:
                        stream.whole = self.loop.create_future()
                        self._admitted(stream)
                        await stream.whole
                    reply = await self.settings.handler(await self._large_request(stream))
        except asyncio.CancelledError:  # the stream was reset or the connection lost
            return
        except Exception:
            log.exception("unexpected error answering a gRPC stream")
            self._reset(stream.id, http2_wire.INTERNAL_ERROR)
            return
        if self.streams.get(stream.id) is stream:
            self._send(stream, reply)
