"""The sending half of kiln's HTTP/2 connections (http2.py): stream state (with the allowance of streams a client
may cancel), the client's flow-control windows, and answers out.

Why a module of its own: what paces answers is a concern apart from reading frames. Each answer's headers, data
and trailers go out in one write when the client's windows allow; what does not fit waits on its stream and is
drained as the client's WINDOW_UPDATEs (or a larger SETTINGS_INITIAL_WINDOW_SIZE) come in. A stream is forgotten
once its answer is out, and a connection going away closes after its last answer. http2.Connection inherits this
half and adds frames in; both work on the one stream table and transport kept here.
"""

import asyncio
import struct
import time
from dataclasses import dataclass, field

from kiln_serving import http2_wire

# Open streams a client may cancel (RST_STREAM) at once, and per second after that: streams opened only to be
# cancelled cost the server work and the client nothing (rapid reset, CVE-2023-44487); nghttp2's numbers.
RESET_BURST, RESETS_PER_SECOND = 1000, 33


@dataclass(eq=False)
class Stream:
    """One request stream: its request as it arrives, then its answer as it waits for window."""

    id: int
    send_window: int
    chunks: list[bytes] = field(default_factory=list)
    size: int = 0
    headers: dict[str, str] | None = None
    task: "asyncio.Task[None] | None" = None
    received: bool = False  # the client's END_STREAM came
    answered: bool = False  # its answer is written or waits for window: what the client still sends is dropped
    # The receiving side (http2_bodies): what the client may still send on it, the body's size once its first
    # bytes tell, whether it holds an admission, and when its body last moved (the body timeout).
    recv_window: int = http2_wire.DEFAULT_WINDOW
    expected: int | None = None
    admitted: bool = False
    progress: float = field(default_factory=time.monotonic)
    # Connection window: bytes received and held that are given back once the body leaves the connection, and
    # window granted ahead to an admitted body that it has not used yet.
    owed: int = 0
    granted: int = 0
    whole: "asyncio.Future[None] | None" = None  # an admitted body waits on this for its END_STREAM
    # What waits for window: data (not yet sent) and the trailer block.
    pending: memoryview | None = None
    trailers: bytes | None = None


class Answers:
    """Answers out on one connection, within the windows the client grants."""

    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.streams: dict[int, Stream] = {}
        self.going_away = False
        self.idle_since: float | None = time.monotonic()  # None while a stream is open
        self.send_window = http2_wire.DEFAULT_WINDOW  # the connection's, as the client granted it
        self.peer_window = http2_wire.DEFAULT_WINDOW  # the client's SETTINGS_INITIAL_WINDOW_SIZE
        self.peer_frame = http2_wire.DEFAULT_FRAME  # the client's SETTINGS_MAX_FRAME_SIZE
        # Streams this side reset (or ended before the client did), newest last: the client's frames already on
        # the way for them are ignored, not a protocol error (RFC 9113 5.1). Bounded: the oldest are forgotten.
        self.reset_streams: dict[int, None] = {}
        self.resets_allowed, self.resets_counted = float(RESET_BURST), time.monotonic()  # see _cancelled

    # -- flow control: the client's SETTINGS and WINDOW_UPDATE ------------------------------------------------

    def _settings(self, stream_id: int, payload: bytes) -> None:
        if len(payload) % 6:
            raise http2_wire.ConnectionError_(http2_wire.FRAME_SIZE_ERROR, "SETTINGS not of whole 6-byte entries")
        for key, value in struct.iter_unpack(">HI", payload):
            if key == http2_wire.SETTINGS_ENABLE_PUSH and value > 1:
                raise http2_wire.ConnectionError_(http2_wire.PROTOCOL_ERROR, f"ENABLE_PUSH of {value}")
            if key == http2_wire.SETTINGS_INITIAL_WINDOW_SIZE:
                if value > http2_wire.MAX_WINDOW:
                    raise http2_wire.ConnectionError_(http2_wire.FLOW_CONTROL_ERROR, "initial window over 2^31-1")
                for stream in self.streams.values():
                    stream.send_window += value - self.peer_window
                self.peer_window = value
            elif key == http2_wire.SETTINGS_MAX_FRAME_SIZE:
                if not http2_wire.DEFAULT_FRAME <= value <= (1 << 24) - 1:
                    raise http2_wire.ConnectionError_(http2_wire.PROTOCOL_ERROR, f"max frame size {value}")
                self.peer_frame = value
        assert self.transport is not None
        self.transport.write(http2_wire.frame(http2_wire.SETTINGS, http2_wire.ACK, 0))
        self._flush()

    def _window_update(self, stream_id: int, payload: bytes) -> None:
        if len(payload) != 4:
            raise http2_wire.ConnectionError_(http2_wire.FRAME_SIZE_ERROR, "malformed WINDOW_UPDATE")
        increment = struct.unpack(">I", payload)[0] & 0x7FFFFFFF
        if stream_id == 0:
            if not increment:
                raise http2_wire.ConnectionError_(http2_wire.PROTOCOL_ERROR, "WINDOW_UPDATE of 0")
            self.send_window += increment
            if self.send_window > http2_wire.MAX_WINDOW:
                raise http2_wire.ConnectionError_(http2_wire.FLOW_CONTROL_ERROR, "connection window over 2^31-1")
        elif (stream := self.streams.get(stream_id)) is not None:
            if not increment:  # a stream error (RFC 9113 §6.9)
                self._reset(stream_id, http2_wire.PROTOCOL_ERROR)
                return
            stream.send_window += increment
            if stream.send_window > http2_wire.MAX_WINDOW:
                self._reset(stream_id, http2_wire.FLOW_CONTROL_ERROR)
                return
        self._flush()

    # -- frames out ------------------------------------------------------------------------------------------

    def _forget(self, stream_id: int, reset: bool) -> Stream | None:
        """Drop a stream; `reset`: this side sent RST_STREAM on it, so the client's late frames are ignored."""
        if reset:
            self.reset_streams[stream_id] = None
            if len(self.reset_streams) > http2_wire.MAX_STREAMS:
                del self.reset_streams[next(iter(self.reset_streams))]
        return self.streams.pop(stream_id, None)

    def _cancelled(self) -> None:
        """The client reset a stream still open: one of its allowance (RESET_BURST, refilled at RESETS_PER_SECOND),
        past which the connection ends; opening streams only to cancel them is the rapid-reset attack."""
        now = time.monotonic()
        refill = (now - self.resets_counted) * RESETS_PER_SECOND
        self.resets_allowed, self.resets_counted = min(RESET_BURST, self.resets_allowed + refill) - 1, now
        if self.resets_allowed < 0:
            raise http2_wire.ConnectionError_(http2_wire.ENHANCE_YOUR_CALM, "too many streams cancelled")

    def _reset(self, stream_id: int, code: int) -> None:
        """A stream error: RST_STREAM, and the stream's task stops (one waiting for its body would hold its
        admission for as long as the connection lives)."""
        stream = self._forget(stream_id, reset=True)
        if stream is not None and stream.task is not None:
            stream.task.cancel()
        if self.transport is not None and not self.transport.is_closing():
            self.transport.write(http2_wire.frame(http2_wire.RST_STREAM, 0, stream_id, struct.pack(">I", code)))
        self._maybe_idle()

    def _send(self, stream: Stream, reply: http2_wire.Reply) -> None:
        """The answer's headers now, then as much of its body as the windows allow, then the trailers."""
        stream.answered = True
        only = reply.trailers is None and not reply.body
        out = http2_wire.header_frames(stream.id, reply.head, only, self.peer_frame)
        if not only:
            stream.pending, stream.trailers = memoryview(reply.body), reply.trailers
            self._drain(stream, out)
        assert self.transport is not None
        self.transport.write(out[0] if len(out) == 1 else b"".join(out))
        if stream.pending is None:
            self._finish(stream)

    def _drain(self, stream: Stream, out: list[bytes]) -> None:
        """Append the data frames the windows allow, and the trailers once no data is left."""
        data = stream.pending
        assert data is not None
        while len(data) and stream.send_window > 0 and self.send_window > 0:
            n = min(len(data), stream.send_window, self.send_window, self.peer_frame)
            out.append(http2_wire.frame(http2_wire.DATA, 0, stream.id, bytes(data[:n])))
            data = data[n:]
            stream.send_window -= n
            self.send_window -= n
        if len(data):
            stream.pending = data
            return
        stream.pending = None
        if stream.trailers is not None:
            out += http2_wire.header_frames(stream.id, stream.trailers, True, self.peer_frame)
        else:
            out.append(http2_wire.frame(http2_wire.DATA, http2_wire.END_STREAM, stream.id))

    def _flush(self) -> None:
        """Send what waited for window."""
        for stream in list(self.streams.values()):
            if stream.pending is not None and self.send_window > 0:
                out: list[bytes] = []
                self._drain(stream, out)
                if out and self.transport is not None:
                    self.transport.write(b"".join(out))
                if stream.pending is None:
                    self._finish(stream)

    def _finish(self, stream: Stream) -> None:
        """The answer is out: forget the stream (and tell a client still sending a body to stop)."""
        if not stream.received:
            assert self.transport is not None
            no_error = struct.pack(">I", http2_wire.NO_ERROR)
            self.transport.write(http2_wire.frame(http2_wire.RST_STREAM, 0, stream.id, no_error))
        self._forget(stream.id, reset=not stream.received)
        self._maybe_idle()

    def _maybe_idle(self) -> None:
        if not self.streams:
            self.idle_since = time.monotonic()
            if self.going_away and self.transport is not None:
                self.transport.close()
