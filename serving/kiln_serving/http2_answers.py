"""The sending half of kiln's HTTP/2 connections (http2.py) and the flow control that paces it: each answer's
headers, data and trailers go out in one write when the client's windows allow, the rest as its WINDOW_UPDATEs
come in; a stream is forgotten once its answer is out, and a connection going away closes after its last answer.
"""

import asyncio
import struct
import time
from dataclasses import dataclass, field

from kiln_serving.http2_wire import (
    ACK,
    DATA,
    DEFAULT_FRAME,
    END_HEADERS,
    END_STREAM,
    FLOW_CONTROL_ERROR,
    FRAME_SIZE_ERROR,
    HEADERS,
    INITIAL_WINDOW_SIZE,
    MAX_FRAME_SIZE,
    MAX_WINDOW,
    NO_ERROR,
    PROTOCOL_ERROR,
    RST_STREAM,
    SETTINGS,
    ConnectionError_,
    Reply,
    frame,
)


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
    # What waits for window: data (not yet sent) and the trailer block.
    pending: memoryview | None = None
    trailers: bytes | None = None


class Answers:
    """Frames out, for a connection that owns this state (http2.Connection sets it and reads frames in)."""

    transport: asyncio.Transport | None
    streams: dict[int, Stream]
    send_window: int  # the connection's, as the client granted it
    peer_frame: int  # the client's SETTINGS_MAX_FRAME_SIZE
    peer_window: int  # the client's SETTINGS_INITIAL_WINDOW_SIZE
    going_away: bool
    idle_since: float | None

    # -- flow control: the client's SETTINGS and WINDOW_UPDATE ------------------------------------------------

    def _settings(self, stream_id: int, payload: bytes) -> None:
        if stream_id or len(payload) % 6:
            raise ConnectionError_(PROTOCOL_ERROR, "malformed SETTINGS")
        for key, value in struct.iter_unpack(">HI", payload):
            if key == INITIAL_WINDOW_SIZE:
                if value > MAX_WINDOW:
                    raise ConnectionError_(FLOW_CONTROL_ERROR, "initial window over 2^31-1")
                for stream in self.streams.values():
                    stream.send_window += value - self.peer_window
                self.peer_window = value
            elif key == MAX_FRAME_SIZE:
                if not DEFAULT_FRAME <= value <= (1 << 24) - 1:
                    raise ConnectionError_(PROTOCOL_ERROR, f"max frame size {value}")
                self.peer_frame = value
        assert self.transport is not None
        self.transport.write(frame(SETTINGS, ACK, 0))
        self._flush()

    def _window_update(self, stream_id: int, payload: bytes) -> None:
        if len(payload) != 4:
            raise ConnectionError_(FRAME_SIZE_ERROR, "malformed WINDOW_UPDATE")
        increment = struct.unpack(">I", payload)[0] & 0x7FFFFFFF
        if stream_id == 0:
            self.send_window += increment
            if self.send_window > MAX_WINDOW:
                raise ConnectionError_(FLOW_CONTROL_ERROR, "connection window over 2^31-1")
        elif (stream := self.streams.get(stream_id)) is not None:
            stream.send_window += increment
        self._flush()

    # -- frames out ------------------------------------------------------------------------------------------

    def _reset(self, stream_id: int, code: int) -> None:
        self.streams.pop(stream_id, None)
        if self.transport is not None and not self.transport.is_closing():
            self.transport.write(frame(RST_STREAM, 0, stream_id, struct.pack(">I", code)))
        self._maybe_idle()

    def _send(self, stream: Stream, reply: Reply) -> None:
        """The answer's headers now, then as much of its body as the windows allow, then the trailers."""
        if reply.trailers is None and not reply.body:
            out = [frame(HEADERS, END_HEADERS | END_STREAM, stream.id, reply.head)]
        else:
            out = [frame(HEADERS, END_HEADERS, stream.id, reply.head)]
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
            out.append(frame(DATA, 0, stream.id, bytes(data[:n])))
            data = data[n:]
            stream.send_window -= n
            self.send_window -= n
        if len(data):
            stream.pending = data
            return
        stream.pending = None
        out.append(frame(HEADERS, END_HEADERS | END_STREAM, stream.id, stream.trailers or b"")
                   if stream.trailers is not None else frame(DATA, END_STREAM, stream.id))  # fmt: skip

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
            self.transport.write(frame(RST_STREAM, 0, stream.id, struct.pack(">I", NO_ERROR)))
        self.streams.pop(stream.id, None)
        self._maybe_idle()

    def _maybe_idle(self) -> None:
        if not self.streams:
            self.idle_since = time.monotonic()
            if self.going_away and self.transport is not None:
                self.transport.close()
