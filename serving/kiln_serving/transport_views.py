"""What connections.py puts between uvicorn and a connection's transport: the answer it writes itself, a
response's view of the transport (head and body in one send, 100 Continue, closing through the connection), flow
control that tells the connection when reading pauses, and the lingering close (HTTP/2's connections' too)."""

import asyncio
import json
from collections.abc import Callable
from typing import Any

from uvicorn.protocols.http.flow_control import FlowControl
from uvicorn.protocols.http.httptools_impl import RequestResponseCycle

from kiln_serving import direct


def response(status: int, reason: str, message: str | None = None) -> bytes:
    """An answer connections.py writes itself (a refusal, in the protocol's error shape), closing the connection."""
    body = json.dumps({"error": message or reason}).encode()
    return (f"HTTP/1.1 {status} {reason}\r\ncontent-type: application/json\r\ncontent-length: {len(body)}\r\n"
            "connection: close\r\n\r\n").encode() + body  # fmt: skip


class Timeout:
    """A connection's read timeout (the head's, the body's next chunk, or the keep-alive wait between requests):
    arm(seconds) from now, or disarm. One timer set for no later than the deadline stays and looks at the deadline
    when it fires: a new timer each time it is re-armed, per request and per body chunk, was ~2 us of every read."""

    def __init__(self, loop: asyncio.AbstractEventLoop, expire: Callable[[], None]) -> None:
        self._loop, self._expire = loop, expire
        self._timer: asyncio.TimerHandle | None = None
        self._deadline: float | None = None  # loop time

    @property
    def armed(self) -> bool:
        return self._deadline is not None

    def arm(self, seconds: float) -> None:
        self._deadline = deadline = self._loop.time() + seconds
        if self._timer is None or self._timer.when() > deadline:
            self.cancel()
            self._deadline = deadline
            self._timer = self._loop.call_at(deadline, self._fired)

    def disarm(self) -> None:
        self._deadline = None  # a pending timer finds nothing to do

    def cancel(self) -> None:
        """Disarm, and let go of the timer (the connection is gone)."""
        self._deadline = None
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def _fired(self) -> None:
        self._timer, deadline = None, self._deadline
        if deadline is not None and self._loop.time() < deadline:  # moved later since the timer was set
            self._timer = self._loop.call_at(deadline, self._fired)
        elif deadline is not None:
            self._deadline = None
            self._expire()


# Longest a closed connection lingers for its client to stop sending (see connections.py's docstring).
LINGER_SECONDS = 2.0


def linger(transport: asyncio.Transport, loop: asyncio.AbstractEventLoop) -> asyncio.TimerHandle | None:
    """Close lingering (see connections.py's docstring): our side shut now (write_eof), the transport closed once the
    client closes its side (the protocol's default on EOF) or by the timer returned, after LINGER_SECONDS; None
    where the transport cannot half-close, and was closed at once. The caller drops what still arrives."""
    try:
        transport.write_eof()
    except (NotImplementedError, RuntimeError, OSError):
        transport.close()
        return None
    return loop.call_later(LINGER_SECONDS, transport.close)


# What uvicorn writes when an ASGI app first asks for the body of a request that expects 100-continue.
CONTINUE = b"HTTP/1.1 100 Continue\r\n\r\n"


class HeadWithBody:
    """A response's view of the transport: its head (uvicorn's first write: status line and headers) is held
    until the body's first write and both leave in one send, so a small answer is one TCP segment and one
    wake-up of the client rather than two. A head with no body by the end of this loop turn (HEAD) goes alone.

    A 100 Continue goes out at once and starts the body's timeout (`continued`); a final answer to a request
    that expected it, sent before it and before the body, says `connection: close` and closes the connection."""

    def __init__(
        self, transport: asyncio.Transport, loop: asyncio.AbstractEventLoop, cycle: RequestResponseCycle,
        continued: Callable[[], None] | None, close: Callable[[], None],
    ) -> None:  # fmt: skip
        self._transport = transport
        self._close = close
        self._loop = loop
        self._head: bytes | None = None
        self._first = True
        self._cycle = cycle
        self._continued = continued  # None: no 100 Continue expected, or already sent

    def write(self, data: bytes) -> None:
        if self._continued is not None:
            if data == CONTINUE:
                continued: Callable[[], None] = self._continued
                self._continued = None
                self._transport.write(data)
                continued()
                return
            self._continued = None
            if self._cycle.more_body and self._cycle.keep_alive:  # the head of an answer sent without asking
                self._cycle.keep_alive = False  # uvicorn closes the connection after the body
                data = data[:-2] + b"connection: close\r\n\r\n"
        if self._first:
            self._first, self._head = False, data
            self._loop.call_soon(self.flush)
        elif self._head is not None:
            head, self._head = self._head, None
            direct.send(self._transport, head, data)
        else:
            self._transport.write(data)

    def flush(self) -> None:
        if self._head is not None:
            head, self._head = self._head, None
            self._transport.write(head)

    def close(self) -> None:
        self.flush()
        self._close()

    def __getattr__(self, name: str) -> Any:
        return getattr(self._transport, name)


class Flow(FlowControl):
    """uvicorn's flow control, telling the connection when the server pauses and resumes reading it, and resuming
    only while the connection holds no bytes read earlier that wait to be parsed (`holding`)."""

    def __init__(
        self, transport: asyncio.Transport, reading_paused: Callable[[bool], None], holding: Callable[[], bool]
    ) -> None:
        super().__init__(transport)
        self._reading_paused, self._holding = reading_paused, holding

    def pause_reading(self) -> None:
        if not self.read_paused:
            super().pause_reading()
            self._reading_paused(True)

    def resume_reading(self) -> None:
        if self.read_paused and not self._holding():
            super().resume_reading()
            self._reading_paused(False)
