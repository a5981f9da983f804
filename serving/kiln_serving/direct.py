"""Binary inference requests answered straight from the HTTP protocol, without ASGI.

Nearly every request to a busy server is a POST to .../infer with the binary tensor extension. Through ASGI each
one pays for a scope, message dicts both ways, Starlette's Request and Response and uvicorn's send() checks, and
the loop's CPU is what batching at batch 1 and the HTTP overhead at batch 32 are bound by. A request that
qualifies (`wanted`: the binary extension, a plain Content-Length within the limit, no Content-Encoding,
Transfer-Encoding or Expect) gets a `DirectCycle` instead of uvicorn's ASGI cycle: once admitted, its body goes
into the aligned buffer the tensors are used from, and the routes' handler returns an `Answer` that is written
as one send. Everything else about the connection (keep-alive, pipelining, flow control, timeouts, graceful
shutdown, the access log) stays uvicorn's and connections.py's, and every other request takes the ASGI way.
"""

import asyncio
import re
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from uvicorn.protocols.http.flow_control import HIGH_WATER_LIMIT
from uvicorn.protocols.http.httptools_impl import STATUS_LINE, RequestResponseCycle
from uvicorn.protocols.utils import get_client_addr, get_path_with_query_string

from kiln_serving import binary, errors

# The binary extension's header, as the HTTP parser hands header names over (lower case).
_INFERENCE_HEADER = binary.HEADER.lower().encode()

# A body smaller than this is joined to its head (a cheap copy); a larger one leaves beside it (writev).
_JOIN_BELOW = 64 * 1024


def send(transport: asyncio.WriteTransport, head: bytes, body: bytes) -> None:
    """A response's head and body in one send: a small answer is one TCP segment and one wake-up of the client
    rather than two."""
    if len(body) < _JOIN_BELOW:
        transport.write(head + body)
    else:
        transport.writelines((head, body))


@dataclass(frozen=True, slots=True)
class Answer:
    """An HTTP answer as the routes build it: the ASGI path makes a Response of it, the direct path writes it."""

    status: int
    body: bytes
    content_type: str = "application/json"
    headers: Mapping[str, str] | None = None


@dataclass(slots=True)
class InferCall:
    """What the direct path knows of an inference request, for the routes' handler (`admitted` is set in place once
    its place is taken: dataclasses.replace took 1.5 us of every request, measured warm)."""

    path: str
    name: str
    version: str | None
    length: int  # Content-Length
    header_length: int  # Inference-Header-Content-Length
    body: Callable[[], Awaitable[memoryview]]  # the whole body, once it has arrived
    hang_up: asyncio.Future[int | None]  # done once the connection is lost (see connections.py)
    admitted: bool = False  # holds its place already (DataPlane.admit_now), taken while its head was parsed


@dataclass(frozen=True)
class Route:
    """The inference paths (Starlette's compiled patterns, with `name` and maybe `version`) and their handler."""

    paths: Sequence[re.Pattern[str]]
    handler: Callable[[InferCall], Awaitable[Answer]]
    max_body_bytes: int
    admit_now: Callable[[int], bool]  # DataPlane.admit_now

    def wanted(
        self, method: bytes, path: str, headers: list[tuple[bytes, bytes]]
    ) -> tuple[dict[str, Any], int, int] | None:
        """(path parameters, Content-Length, Inference-Header-Content-Length) when the request can go direct."""
        if method != b"POST":
            return None
        length = header_length = None
        for name, value in headers:
            if name == b"content-length":
                length = binary.digits(value)
            elif name == _INFERENCE_HEADER:
                if header_length is not None:
                    return None  # given twice: the ASGI path refuses it
                header_length = binary.digits(value)
            elif name in (b"content-encoding", b"transfer-encoding", b"expect"):
                return None
        if length is None or header_length is None or length > self.max_body_bytes:
            return None  # the ASGI path says what is wrong with it, or inflates it, or streams it
        for pattern in self.paths:
            match = pattern.match(path)
            if match is not None:
                return match.groupdict(), length, header_length
        return None


class DirectCycle(RequestResponseCycle):
    """uvicorn's request cycle, but run by `Route.handler` instead of the ASGI app (see the module docstring)."""

    def __init__(
        self, *args: Any, route: Route, params: dict[str, Any], length: int, header_length: int,
        hang_up: asyncio.Future[int | None], close: Callable[[], None], **kwargs: Any,
    ) -> None:  # fmt: skip
        super().__init__(*args, **kwargs)
        self.close = close  # the connection's (lingering) close
        self.length, self.header_length = length, header_length
        self.buffer: memoryview | None = None  # allocated when the request is admitted (admit_now, _body)
        self.filled = 0
        self.early: list[bytes] = []  # the body's pieces that came before the buffer
        self.early_bytes = 0
        self.call = InferCall(self.scope["path"], params["name"], params.get("version"), length, header_length,
                              self._body, hang_up)  # fmt: skip
        self.handler, self._admit_now = route.handler, route.admit_now

    def admit_now(self) -> None:
        """Take the request's place now if one is free (its task is about to start): its body then goes into its
        buffer as it arrives, never held back (see feed)."""
        if self._admit_now(self.length):
            self.buffer = binary.aligned_buffer(self.length, self.header_length)
            self.call.admitted = True

    def feed(self, chunk: bytes) -> None:
        """A piece of the body from the parser, which frames it by Content-Length: it never runs past the end.

        Until the request is admitted (DataPlane.admit bounds how many large bodies are read at once: at once by
        admit_now if a place is free, else when the handler's turn comes) the pieces wait as uvicorn keeps them,
        reading paused past HIGH_WATER_LIMIT; so a crowd of clients declaring large bodies costs no more memory
        than it would through ASGI."""
        if self.response_complete:
            return
        if self.buffer is None:  # kept as the parser made them: one copy, into the buffer, later
            self.early.append(chunk)
            self.early_bytes += len(chunk)
            if self.early_bytes > HIGH_WATER_LIMIT:
                self.flow.pause_reading()
            return
        end = self.filled + len(chunk)
        self.buffer[self.filled : end] = chunk
        self.filled = end

    async def _body(self) -> memoryview:
        if self.buffer is None:
            self.buffer = binary.aligned_buffer(self.length, self.header_length)
        for piece in self.early:
            self.buffer[self.filled : self.filled + len(piece)] = piece
            self.filled += len(piece)
        self.early.clear()
        self.flow.resume_reading()
        while self.more_body and not self.disconnected:
            await self.message_event.wait()
            self.message_event.clear()
        if self.disconnected:
            raise errors.ClientClosed("the client went away")
        return self.buffer[: self.filled]

    async def run_asgi(self, app: object) -> None:
        """Named as uvicorn calls it; `app` is not used."""
        try:
            answer = await self.handler(self.call)
        except BaseException as exc:  # as uvicorn does for an app: log it, answer 500 if nothing was sent
            self.logger.error("Exception in inference request", exc_info=exc)
            answer = Answer(500, b'{"error":"Internal Server Error"}')
        try:
            await self._respond(answer)
        finally:
            self.on_response = lambda: None  # as uvicorn: the protocol is not kept alive by a finished cycle

    async def _respond(self, answer: Answer) -> None:
        if self.flow.write_paused and not self.disconnected:
            await self.flow.drain()
        if self.disconnected or self.transport.is_closing():
            return
        self.response_started = True
        if self.access_log:
            self.access_logger.info('%s - "%s %s HTTP/%s" %d', get_client_addr(self.scope), self.scope["method"],
                                    get_path_with_query_string(self.scope), self.scope["http_version"],
                                    answer.status)  # fmt: skip
        head = [STATUS_LINE[answer.status]]
        for name, value in self.default_headers:
            head += [name, b": ", value, b"\r\n"]
        head.append(b"content-type: %s\r\ncontent-length: %d\r\n" % (answer.content_type.encode(), len(answer.body)))
        for key, text in (answer.headers or {}).items():
            head += [key.encode(), b": ", text.encode(), b"\r\n"]
        head.append(b"\r\n" if self.keep_alive else b"connection: close\r\n\r\n")
        send(self.transport, b"".join(head), answer.body)
        self.response_complete = True
        self.message_event.set()
        if not self.keep_alive:
            self.close()
        self.on_response()
