"""Connection hygiene for the HTTP server: uvicorn's httptools protocol with the limits it lacks.

- Request heads (request line + headers) over max_header_bytes get 431 and the connection is closed, before
  anything is parsed further: a 64 MB header no longer ties up the event loop.
- A connection's first head must arrive within header_timeout_seconds of connecting, a later one within it of
  its first byte, and a body may pause at most body_timeout_seconds between chunks; a silent connection or a
  half-sent request is answered 408 and closed, so idle sockets do not pile up and fill the connection cap.
- Past max_connections (capped below the process's file-descriptor limit) a new connection is answered 503
  at once and closed, so the server stays reachable for probes as soon as any connection ends.
An idle keep-alive connection is closed after keep_alive_timeout_seconds, timed by the same timer (uvicorn
set a new one after every answer).
- A response's head and body leave in one send (transport_views.HeadWithBody). A request sent with `Expect:
  100-continue` waits for its body with no timeout until the server asks for it (100 Continue); answered without
  asking, it closes the connection (its client may never send the body, so the next request's start is unknown).
- Each request is answered at most once: a timeout after the answer closes the connection without a second one,
  and when the connection is lost every request on it, the one being answered and those pipelined behind it,
  sees the hang-up.
- A request refused for its head (bytes the parser cannot parse: 400; a head too large: 431; a head too slow: 408;
  a transfer coding other than chunked: 501; an Upgrade (gRPC has its own port), or HTTP/1.1 without exactly one
  Host: 400; an HTTP version but 1.0 and 1.1: 505) is answered and the connection closed only after the answers of
  the requests pipelined before it (as nginx and h11 do). Nothing after it is parsed.
- A connection the server closes (a refusal, an answer with `connection: close`) is closed lingering, as nginx
  and RFC 9112 9.6 do: the answer out, the server's side shut (FIN), and what the client still sends read and
  dropped until it closes too or for transport_views.LINGER_SECONDS; closed at once, its unread bytes made the
  kernel send an RST that could discard the answer before the client read it (a 64 MB head got a reset, not its
  431).
- A binary inference request skips ASGI: its cycle is a direct.DirectCycle (see direct.py).
- Each request's scope carries, under extensions[HANG_UP], a future of its connection that is done once the
  connection is lost, so the app learns of a client hanging up without a watcher task per request.
"""

import asyncio
import functools
import logging
import resource
import socket
import urllib.parse
from typing import Any

import httptools
from uvicorn.protocols.http.flow_control import HIGH_WATER_LIMIT
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol, RequestResponseCycle

from kiln_serving import direct, http_heads, transport_views
from kiln_serving.config import ServingConfig

log = logging.getLogger(__name__)

# The ASGI scope extension holding the connection's "lost" future (see the module's docstring).
HANG_UP = "kiln.hang_up"

# File descriptors kept free for the listening socket, model files, logs and the gRPC service.
_SPARE_FDS = 64
# Pipelined requests are parsed a piece of this many bytes at a time, and no further than this many requests
# queued behind the one being answered (see GuardedHttp._parse_paced).
_PIECE, _PARSED_AHEAD = 4096, 16


def bind(host: str, port: int) -> socket.socket:
    """A listening socket; port 0 picks a free one, which the caller reads back from the socket."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    # proto must say TCP: asyncio sets TCP_NODELAY only on sockets that do, and without it every response
    # (headers and body are two writes) stalls ~40 ms on Nagle's algorithm meeting delayed ACKs.
    sock = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, port))
    sock.listen(2048)
    sock.set_inheritable(True)
    return sock


def connection_cap(configured: int) -> int:
    """max_connections, lowered to what the file-descriptor limit (RLIMIT_NOFILE) leaves room for."""
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == resource.RLIM_INFINITY:
        return configured
    return max(1, min(configured, soft - _SPARE_FDS))


def protocol(config: ServingConfig, route: direct.Route | None = None) -> type[HttpToolsProtocol]:
    """The protocol class for uvicorn.Config(http=...), with config's limits; requests `route` wants skip ASGI."""
    cap = connection_cap(config.max_connections)
    head_too_large = http_heads.too_large(config.max_header_bytes)

    class GuardedHttp(HttpToolsProtocol):
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            super().__init__(*args, **kwargs)
            self._head_bytes = 0
            self._in_head = True  # between requests the next bytes start a head
            self._idle = False  # answered, nothing pipelined: the timeout is the keep-alive's until a byte comes
            self._timeout = transport_views.Timeout(self.loop, self._expire)  # the head's, the body's or the idle's
            # Done once the connection is lost: None when its client left, else the status the server answered
            # when it closed the connection (a timeout's 408), which the request metrics then record.
            self._hang_up: asyncio.Future[int | None] = self.loop.create_future()
            self._answering: RequestResponseCycle | None = None  # the cycle whose task runs (self.cycle: the newest)
            # A request was refused (or the connection is closing): nothing after it is parsed, and what the client
            # sends is dropped.
            self._refused = False
            self._lingering: asyncio.TimerHandle | None = None  # closing: our side shut, the client's awaited
            self._close_at_once = False  # nothing to linger for (a quiet client), or no descriptor to spare
            self._body_in = bytearray()  # an ASGI request's body from the read being parsed (on_body)
            self._held = b""  # pipelined bytes read but not parsed yet, reading paused meanwhile (_parse_paced)

        def _reading_paused(self, paused: bool) -> None:
            """While the server keeps a request waiting (a body held until the request is admitted, a pipelined
            request behind another), its client is not slow: the head and body timeouts stop, and restart when
            reading does."""
            if paused or self._refused:  # no request is read any more, only answered
                self._timeout.disarm()
            elif not self._in_head and self.cycle is not None and self.cycle.more_body:
                if not self.cycle.waiting_for_100_continue:  # else: the body's clock starts with the 100
                    self._timeout.arm(config.body_timeout_seconds)
            elif self._in_head and self._head_bytes:
                self._timeout.arm(config.header_timeout_seconds)

        def _expire(self) -> None:
            if self._idle:  # a keep-alive connection nobody used: closed without an answer, as uvicorn closes it
                self.transport.close()
                return
            self._close_at_once = True  # its client went quiet
            if self._in_head:
                self._refuse_head(408, "Request Timeout")
            else:
                self._refuse_read(408, "Request Timeout")

        def _refuse_read(self, status: int, reason: str, message: str | None = None) -> None:
            """_refuse, for the request being read: the app, if it already reads it, records `status` (the server
            ended it), not a client hang-up."""
            answered = self.cycle is not None and self.cycle.response_started
            if not self._hang_up.done() and self.cycle is not None and not answered:
                self._hang_up.set_result(status)
            self._refuse(status, reason, message, answered)

        def _refuse(self, status: int, reason: str, message: str | None = None, answered: bool = False) -> None:
            """Answer `status` and close the connection; a request `answered` already gets no second answer. (A head
            refused has no answer yet: self.cycle is still the request before it, answered or not.)"""
            if not self._hang_up.done():
                self._hang_up.set_result(None)
            self._hang_up_cycles()  # the app, if it already runs, sees a disconnect
            if not self.transport.is_closing() and self._lingering is None:
                if not answered:
                    self.transport.write(transport_views.response(status, reason, message))
                self._close()

        def _close(self) -> None:
            """Close lingering (see the module docstring and transport_views.linger). Nothing is parsed or answered
            meanwhile."""
            if self.transport.is_closing() or self._lingering is not None:
                return
            if self._close_at_once:
                self.transport.close()
                return
            self._timeout.disarm()
            self._refused = True  # what still arrives is dropped (data_received), pipelined bytes held too
            self._held = b""
            self._lingering = transport_views.linger(self.transport, self.loop)
            if self._lingering is not None:
                self.flow.resume_reading()

        def on_response_complete(self) -> None:
            """uvicorn's, but the keep-alive wait is timed by the connection's one timer."""
            self.server_state.total_requests += 1
            if self._lingering is not None or self.transport.is_closing():  # nothing pipelined is started
                return
            self.flow.resume_reading()
            if self.pipeline:
                cycle, app = self.pipeline.pop()
                self._start_asgi_task(cycle, app)
            elif self._in_head and not self._head_bytes:  # else a head or body being read is timed already
                self._idle = True
                self._timeout.arm(self.timeout_keep_alive)
            if self._held:  # the queue is a request shorter: parse on, a turn later
                self.loop.call_soon(self._parse_held)

        def _parse_held(self) -> None:
            if self._held:
                self.data_received(b"")

        def _hang_up_cycles(self) -> None:
            """Every request on this connection that is not yet answered sees it gone: uvicorn tells only the
            newest, and the one being answered (pipelining) would write to a closed transport."""
            for cycle in (self._answering, self.cycle, *(cycle for cycle, _ in self.pipeline)):
                if cycle is not None and not cycle.response_complete:
                    cycle.disconnected = True
                    cycle.message_event.set()

        def send_400_response(self, msg: str) -> None:
            """uvicorn's call when its parser fails: refused as a bad head is, or as the (chunked) body it is in."""
            if self.transport.is_closing() or self._refused:
                return
            if not self._in_head:
                if self.pipeline and self.pipeline[0][0] is self.cycle:
                    self.pipeline.popleft()  # queued behind another request: never started, the 400 is its answer
                else:  # its app runs, so every request before it is answered: it ends now, counted 400
                    self._refused = True
                    self._refuse_read(400, "Bad Request", msg)
                    return
            self._refuse_head(400, "Bad Request", msg)

        def _refuse_head(self, status: int, reason: str, message: str | None = None) -> None:
            """Refuse the request whose head is being (or was just) read, and close the connection: after the answers
            of the requests pipelined before it, in order (refused at once, they lost their answers and were counted
            as client hang-ups, as nginx and h11 never do). Nothing after it is parsed."""
            if self.transport.is_closing() or self._refused:
                return
            self._refused = True
            self._timeout.disarm()  # the answers before the refusal take what they take; no head or body is awaited
            last = self.pipeline[0][0] if self.pipeline else self._answering
            if last is None or last.response_complete:
                self._refuse(status, reason, message)
            else:
                last.on_response = functools.partial(
                    self._answer_after, last, transport_views.response(status, reason, message)
                )

        def _answer_after(self, cycle: RequestResponseCycle, refusal: bytes) -> None:
            """The on_response of the last request before a refused one: its answer is out, now the refusal's turn.
            Written through the cycle's transport, which first sends a HEAD answer's head if still held."""
            if not self.transport.is_closing():  # else its answer closed the connection (HTTP/1.0, shutdown)
                cycle.transport.write(refusal)
                cycle.transport.close()
            self.on_response_complete()  # counts the request; the connection is closing, so nothing is resumed

        def _start_asgi_task(self, cycle: RequestResponseCycle, app: Any) -> None:
            self._answering = cycle
            super()._start_asgi_task(cycle, app)

        def _unsupported_upgrade_warning(self) -> None:
            """Refused in on_headers_complete, where the client is told why; nothing to warn the operator of."""

        def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
            super().connection_made(transport)
            self.flow = transport_views.Flow(transport, self._reading_paused, lambda: bool(self._held))
            if len(self.connections) > cap:
                log.warning("refusing a connection: %d open, the limit is %d", len(self.connections) - 1, cap)
                self._close_at_once = True  # its descriptor is what is short
                self._refuse(503, "Service Unavailable")
            else:
                self._timeout.arm(config.header_timeout_seconds)  # a connection that never sends a byte times out too

        def connection_lost(self, exc: Exception | None) -> None:
            self._timeout.cancel()
            if self._lingering is not None:
                self._lingering.cancel()
            if not self._hang_up.done():
                self._hang_up.set_result(None)
            self._hang_up_cycles()
            super().connection_lost(exc)

        def on_message_begin(self) -> None:
            super().on_message_begin()
            extensions: dict[str, object] = self.scope.setdefault("extensions", {})  # type: ignore[assignment]
            extensions[HANG_UP] = self._hang_up

        def data_received(self, data: bytes) -> None:
            if self._refused or self.transport.is_closing():
                return
            if self._held or self.pipeline or data.count(b"\r\n\r\n", 0, _PIECE) > 1:
                self._parse_paced(self._held + data)
            else:
                self._parse(data)

        def _parse_paced(self, data: bytes) -> None:
            """Pipelined requests, parsed a piece at a time and no further than _PARSED_AHEAD requests queued behind
            the one being answered; the rest is held unparsed, reading paused, until answers shorten the queue.
            uvicorn parsed all of a read at once and queued every request in it: a read of pipelined GETs held the
            loop ~0.1 s, and a client sending 500,000 of them without reading the answers grew the server by 400 MB
            in 3 s."""
            self._held = b""
            for at in range(0, len(data), _PIECE):
                if self._refused or self.transport.is_closing():
                    return
                if len(self.pipeline) >= _PARSED_AHEAD:
                    self._held = data[at:]
                    self.flow.pause_reading()
                    return
                self._parse(data[at : at + _PIECE])
            cycle = self.cycle
            held = cycle.early_bytes if isinstance(cycle, direct.DirectCycle) else len(cycle.body) if cycle else 0
            if held <= HIGH_WATER_LIMIT:  # else the body's admission resumes reading
                self.flow.resume_reading()

        def _parse(self, data: bytes) -> None:
            if self._in_head:
                if self._head_bytes == 0 and (self._idle or not self._timeout.armed):
                    self._idle = False
                    self._timeout.arm(config.header_timeout_seconds)  # the whole head within this, however slow
                self._head_bytes += len(data)
                if self._head_bytes > config.max_header_bytes and not self._head_done(data):
                    self._refuse_head(*head_too_large)
                    return
            elif self.cycle is not None and self.cycle.more_body:
                self._timeout.arm(config.body_timeout_seconds)  # the next body chunk within this
            self._feed(data)
            self._hand_body_over()

        def _feed(self, data: bytes) -> None:
            """uvicorn's data_received, but a parse error's 400 says what the parser found ("Content-Length can't be
            present with Transfer-Encoding"), where uvicorn's says only "Invalid HTTP request received."."""
            try:
                self.parser.feed_data(data)
            except httptools.HttpParserError as err:
                self.logger.warning("invalid HTTP request: %s", err)
                self.send_400_response(f"not valid HTTP/1.1: {err}")
            except httptools.HttpParserUpgrade:
                pass  # refused in on_headers_complete: kiln upgrades no connection

        def _head_done(self, data: bytes) -> bool:
            """Whether this chunk ends the head within the limit (its end is in the last bytes counted)."""
            end = data.find(b"\r\n\r\n")
            return end >= 0 and self._head_bytes - len(data) + end + 4 <= config.max_header_bytes

        def on_headers_complete(self) -> None:
            self._in_head = False
            if self.expect_100_continue and self.parser.get_http_version() == "1.0":  # RFC 9110 §10.1.1: no 1xx
                self.expect_100_continue = False  # to an HTTP/1.0 client; its expectation is ignored
            if self._refused or self.transport.is_closing():  # pipelined behind a refused request: not served
                return
            refusal = self._refusal()
            if refusal is not None:
                self._refuse_head(*refusal)
                return
            previous = self.cycle
            if not self._direct():
                super().on_headers_complete()
                cycle = self.cycle
                if cycle is not None and cycle is not previous:
                    continued = self._body_timeout if self.expect_100_continue else None
                    cycle.transport = transport_views.HeadWithBody(  # type: ignore[assignment]
                        self.transport, self.loop, cycle, continued, self._close
                    )
            if self.expect_100_continue:
                self._timeout.disarm()  # the client waits for 100 Continue, sent when the server wants the body
            else:
                self._body_timeout()

        def _body_timeout(self) -> None:
            """Time the body from now, unless none is coming or the server itself holds it back (read_paused)."""
            if self.cycle is not None and self.cycle.more_body and not self.flow.read_paused:
                self._timeout.arm(config.body_timeout_seconds)
            else:
                self._timeout.disarm()

        def _refusal(self) -> http_heads.Refusal | None:
            version, upgrade = self.parser.get_http_version(), self.parser.should_upgrade()
            return http_heads.refusal(self.url, self.headers, version, upgrade, config.max_header_bytes)

        def _direct(self) -> bool:
            """Start a DirectCycle for this request if `route` wants it, as uvicorn starts its ASGI cycle."""
            if route is None or self.limit_concurrency is not None or self.parser.should_upgrade():
                return False
            parsed = httptools.parse_url(self.url)
            path = parsed.path.decode("ascii")
            if "%" in path:
                path = urllib.parse.unquote(path)
            wanted = route.wanted(self.parser.get_method(), path, self.headers)
            if wanted is None:
                return False
            params, length, header_length = wanted
            http_version = self.parser.get_http_version()
            scope = self.scope
            scope["method"], scope["http_version"] = "POST", http_version
            scope["path"], scope["raw_path"] = self.root_path + path, self.root_path.encode("ascii") + parsed.path
            scope["query_string"] = parsed.query or b""
            existing, self.cycle = self.cycle, direct.DirectCycle(
                scope=self.scope, transport=self.transport, flow=self.flow, logger=self.logger,
                access_logger=self.access_logger, access_log=self.access_log,
                default_headers=self.server_state.default_headers, message_event=asyncio.Event(),
                expect_100_continue=False, keep_alive=http_version != "1.0" and self.parser.should_keep_alive(),
                on_response=self.on_response_complete, route=route, params=params, length=length,
                header_length=header_length, hang_up=self._hang_up, close=self._close,
            )  # fmt: skip
            if existing is None or existing.response_complete:
                self.cycle.admit_now()  # its task starts now, and gives the place back whatever happens
                self._start_asgi_task(self.cycle, self.app)
            else:  # pipelined behind a request still being answered, as uvicorn queues them
                self.flow.pause_reading()
                self.pipeline.appendleft((self.cycle, self.app))
            return True

        def on_body(self, body: bytes) -> None:
            if self._refused or self.transport.is_closing():  # refused, or timed out: nobody reads the rest
                return
            if isinstance(self.cycle, direct.DirectCycle):
                self.cycle.feed(body)
            else:  # handed to the cycle once per read: a body of 1-byte chunks cost a call of uvicorn's each
                self._body_in += body  # (~2 us: 43,000 of them in one 256 KB read held the loop ~0.1 s)

        def _hand_body_over(self) -> None:
            if self._body_in:
                body, self._body_in = self._body_in, bytearray()
                if not self._refused and not self.transport.is_closing():
                    super().on_body(body)  # type: ignore[arg-type]  # uvicorn appends it to a bytearray

        def on_message_complete(self) -> None:
            self._hand_body_over()
            self._timeout.disarm()
            if not self._refused and not self.transport.is_closing():
                super().on_message_complete()
            self._in_head, self._head_bytes = True, 0

    return GuardedHttp
