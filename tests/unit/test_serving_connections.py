"""Connection hygiene, with raw sockets on loopback: oversized heads get 431, half-sent requests and idle
keep-alive connections are closed, and past the connection cap new connections are refused at once while
the server stays reachable, also as a process at its file-descriptor limit."""

import asyncio
import contextlib
import socket
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from serving_support import Answers, binary_request, config, images_batch, kiln_serve, serving
from serving_support import trained_folder as make_trained_folder

from kiln_serving import Server, transport_views

# Generous: the server closes after 0.5 s; a loaded machine may take far longer to get there.
PATIENCE = 30


@pytest.fixture(scope="module")
def folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_trained_folder(tmp_path_factory.mktemp("connections") / "tiny")


@pytest.fixture(scope="module")
def server(folder: Path) -> Iterator[Server]:
    cfg = config(folder, max_header_bytes=8192, header_timeout_seconds=0.5, body_timeout_seconds=0.5,
                 keep_alive_timeout_seconds=0.5, max_connections=8)  # fmt: skip
    with serving(cfg) as running:
        yield running


def connect(server: Server) -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", server.port), timeout=PATIENCE)
    return sock


def probe_until_live(url: str) -> list[str]:
    """GET /v2/health/live until it answers 200, for up to PATIENCE seconds; what every try got, in order."""
    outcomes: list[str] = []
    deadline = time.monotonic() + PATIENCE
    while time.monotonic() < deadline:
        try:
            outcomes.append(str(httpx.get(f"{url}/v2/health/live", timeout=PATIENCE).status_code))
        except httpx.HTTPError as err:  # refused past the cap before the request was read: a reset
            outcomes.append(type(err).__name__)
        if outcomes[-1] == "200":
            break
        time.sleep(0.1)
    return outcomes


def until_closed(sock: socket.socket) -> bytes:
    """Everything the server sends until it closes the connection (socket.timeout if it never does)."""
    chunks = []
    while chunk := sock.recv(65536):
        chunks.append(chunk)
    return b"".join(chunks)


def test_a_head_over_the_limit_gets_431_and_the_connection_closes(server: Server) -> None:
    with connect(server) as sock:
        sock.sendall(b"GET /v2/health/live HTTP/1.1\r\nHost: x\r\nX-Padding: " + b"a" * 20_000 + b"\r\n\r\n")
        assert until_closed(sock).startswith(b"HTTP/1.1 431 ")


def test_a_head_that_stops_halfway_is_answered_408_and_closed(server: Server) -> None:
    with connect(server) as sock:
        sock.sendall(b"POST /v2/models/tiny/infer HTTP/1.1\r\nHost: x\r\n")
        assert until_closed(sock).startswith(b"HTTP/1.1 408 ")


def test_a_body_that_stops_halfway_is_answered_408_and_closed(server: Server) -> None:
    with connect(server) as sock:
        sock.sendall(b'POST /v2/models/tiny/infer HTTP/1.1\r\nHost: x\r\nContent-Length: 1000\r\n\r\n{"inp')
        assert until_closed(sock).startswith(b"HTTP/1.1 408 ")
    assert httpx.get(f"{server.url}/v2/health/ready").status_code == 200


def test_a_slow_body_is_served_while_each_piece_comes_within_the_body_timeout(folder: Path) -> None:
    request = binary_request(images_batch(2))
    pieces = [request[i : i + len(request) // 10 + 1] for i in range(0, len(request), len(request) // 10 + 1)]
    with serving(config(folder, header_timeout_seconds=PATIENCE, body_timeout_seconds=2)) as slow:
        with connect(slow) as sock:
            for piece in pieces:  # 2.5 s in all, past the body timeout; each piece 0.25 s after the last
                sock.sendall(piece)
                time.sleep(0.25)
            status, _, _ = Answers(sock).next()
    assert status.startswith(b"HTTP/1.1 200 ")


def test_a_read_timeout_fires_at_its_newest_deadline_and_never_once_disarmed() -> None:
    async def run() -> None:
        loop = asyncio.get_running_loop()
        fired: list[float] = []
        timeout = transport_views.Timeout(loop, lambda: fired.append(loop.time()))

        async def next_firing() -> float:
            while not fired:
                await asyncio.sleep(0.01)
            return fired.pop()

        start = loop.time()
        timeout.arm(0.05)
        timeout.arm(0.3)  # later: the timer set for 0.05 s looks again when it fires
        assert await asyncio.wait_for(next_firing(), PATIENCE) - start >= 0.3
        start = loop.time()
        timeout.arm(PATIENCE)
        timeout.arm(0.05)  # sooner: a new timer
        assert 0.05 <= await asyncio.wait_for(next_firing(), PATIENCE) - start < PATIENCE
        for stop in (timeout.disarm, timeout.cancel):
            timeout.arm(0.05)
            stop()
            await asyncio.sleep(0.3)
            assert not fired and not timeout.armed

    asyncio.run(run())


def test_an_idle_keep_alive_connection_is_closed_after_its_answer(server: Server) -> None:
    with connect(server) as sock:
        sock.sendall(b"GET /v2/health/live HTTP/1.1\r\nHost: x\r\n\r\n")
        received = until_closed(sock)
    assert received.startswith(b"HTTP/1.1 200 ") and received.count(b"HTTP/1.1 ") == 1  # closed, not answered 408


@pytest.mark.parametrize(
    ("second", "status"),
    [
        (b"GET /v2/health/live HTTP/1.1\r\n", b"408"),
        (b"GET /v2/health/live HTTP/1.1\r\nHost: x\r\nX-Padding: " + b"a" * 20_000 + b"\r\n\r\n", b"431"),
        (b"GET /v2/health/live HTTP/1.1\r\n\r\n", b"400"),
    ],
    ids=["a head that stops halfway", "a head too large", "no Host"],
)
def test_a_second_request_refused_for_its_head_on_a_kept_alive_connection_is_answered(
    server: Server, second: bytes, status: bytes
) -> None:
    """The request before it was answered; its own refusal still goes out before the connection closes (they
    were closed without a word, the answered request before them taken for theirs). After an answer the
    connection's one timer waits out the keep-alive; the next request's first byte hands it to the head's."""
    with connect(server) as sock:
        sock.sendall(b"GET /v2/health/live HTTP/1.1\r\nHost: x\r\n\r\n")
        answer = b""
        while not answer.endswith(b'{"live":true}'):
            answer += sock.recv(65536)
        sock.sendall(second)
        assert until_closed(sock).startswith(b"HTTP/1.1 " + status + b" ")


def test_past_the_connection_cap_new_connections_get_503_at_once_and_the_server_stays_reachable(
    folder: Path,
) -> None:
    # Silent connections time out too, so these get longer than the test can take to fill the cap.
    with serving(config(folder, header_timeout_seconds=PATIENCE, max_connections=8)) as capped:
        idle = [connect(capped) for _ in range(8)]
        try:
            with connect(capped) as extra:
                assert until_closed(extra).startswith(b"HTTP/1.1 503 ")
        finally:
            for sock in idle:
                sock.close()
        # The idle ones are gone: probes get through again.
        assert probe_until_live(capped.url)[-1] == "200"


def status_until_closed(sock: socket.socket) -> str:
    """The status the server answered before closing (socket.timeout if it never closes); "reset" when the
    connection was reset, as one refused at once with the request unread may be."""
    try:
        return until_closed(sock)[:12].decode()
    except ConnectionResetError:
        return "reset"


def test_at_its_file_descriptor_limit_the_server_answers_probes_and_closes_half_sent_requests(
    folder: Path,
) -> None:
    # 256 descriptors bring the connection cap down to 192 (connections.connection_cap), under 400 connections.
    with kiln_serve(folder, "--header-timeout-seconds", "2", open_files=256) as served:
        # The server times each from when it accepts it, in bursts of many: 2 s is ample to reach the cap.
        half_sent = [socket.create_connection(("127.0.0.1", served.port), timeout=PATIENCE) for _ in range(400)]
        try:
            for sock in half_sent:
                with contextlib.suppress(OSError):  # one refused past the cap may be reset already
                    sock.sendall(b"POST /v2/models/tiny/infer HTTP/1.1\r\nHost: x\r\n")
            # With all 400 still open on this side, probes are answered (503 while the cap is full) and get
            # 200 once the half-sent requests time out.
            outcomes = probe_until_live(served.url)
            assert outcomes[-1] == "200", outcomes
            # Every half-sent one was closed by the server: refused at once past the cap, else 408 once its
            # header timeout passed (each recv waits up to PATIENCE, far past the 2 s).
            answers = Counter(status_until_closed(sock) for sock in half_sent)
        finally:
            for sock in half_sent:
                sock.close()
        assert set(answers) <= {"HTTP/1.1 408", "HTTP/1.1 503", "reset"}, answers
        assert answers["HTTP/1.1 408"] >= 1 and answers["HTTP/1.1 503"] + answers["reset"] >= 1, answers
        assert httpx.get(f"{served.url}/v2/health/live", timeout=PATIENCE).status_code == 200
        assert served.process.poll() is None
    assert "Too many open files" not in "".join(served.log), "".join(served.log)


def test_a_connection_that_never_sends_a_byte_is_answered_408_and_closed(server: Server) -> None:
    with connect(server) as sock:
        assert until_closed(sock).startswith(b"HTTP/1.1 408 ")


def test_an_answer_without_a_body_write_still_goes_out_before_the_next_one(server: Server) -> None:
    """A response's head waits for its body to share one send; a HEAD's answer has no body write to wait for,
    and the request pipelined behind it is answered after it on the same connection."""
    with connect(server) as sock:
        sock.sendall(b"HEAD /v2/health/live HTTP/1.1\r\nHost: x\r\n\r\nGET /v2 HTTP/1.1\r\nHost: x\r\n\r\n")
        answers = b""
        while answers.count(b"HTTP/1.1 200") < 2 or not answers.endswith(b"}"):
            answers += sock.recv(65536)
        head, _, rest = answers.partition(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 200") and b"content-length: 13" in head
        assert rest.startswith(b"HTTP/1.1 200") and b'"name":"kiln"' in rest


@pytest.mark.parametrize(
    ("request_head", "answer"),
    [
        (b"POST /v2/models/tiny/infer HTTP/1.1\r\nHost: x\r\nX-Padding: " + b"a" * 20_000 + b"\r\n\r\n", b"431"),
        (
            b"POST /v2/models/nope/infer HTTP/1.1\r\nHost: x\r\nConnection: close\r\nContent-Type: application/json\r\n"
            b"Content-Length: 4000000\r\n\r\n",
            b"404",
        ),
        (
            b"POST /v2/models/nope/infer HTTP/1.1\r\nHost: x\r\nConnection: close\r\n"
            b"Inference-Header-Content-Length: 2\r\nContent-Length: 4000000\r\n\r\n",
            b"404",
        ),
    ],
    ids=["a head too large", "an answer before the body, connection: close", "the same, binary (direct.py)"],
)
def test_a_client_still_sending_when_the_server_closes_gets_its_answer_not_a_reset(
    server: Server, request_head: bytes, answer: bytes
) -> None:
    # As clients send: the whole request first, then read. Closed at once with 4 MB unread, the server's kernel
    # sent an RST: the client's send failed and the answer was lost. Lingering, the server reads on until the
    # client is done.
    with connect(server) as sock:
        sock.sendall(request_head + b"x" * 4_000_000)
        assert until_closed(sock).startswith(b"HTTP/1.1 " + answer), answer


LIVE_REQUEST = b"GET /v2/health/live HTTP/1.1\r\nHost: x\r\n\r\n"


def test_pipelined_requests_are_all_answered_in_order(server: Server) -> None:
    # Parsed a piece at a time, at most a few queued ahead of the one answered (connections.py): all still answered.
    with connect(server) as sock:
        sock.sendall(LIVE_REQUEST * 20_000)
        received = bytearray()
        while received.count(b"HTTP/1.1 200 OK") < 20_000:
            chunk = sock.recv(1 << 20)
            assert chunk, f"closed after {received.count(b'HTTP/1.1 200 OK')} answers"
            received += chunk
    assert received.count(b"HTTP/1.1 ") == 20_000 and received.endswith(b'{"live":true}')


def resident_mb(pid: int) -> float:
    fields = dict(line.split(":", 1) for line in Path(f"/proc/{pid}/status").read_text().splitlines())
    return int(fields["VmRSS"].split()[0]) / 1024


def test_a_client_pipelining_without_reading_answers_grows_the_server_by_little(folder: Path) -> None:
    # 300,000 pipelined GETs (12 MB), sent for 2 s without reading an answer. uvicorn parsed each read whole and
    # queued every request in it (~1.5 KB each): the server grew by hundreds of MB. Now requests are parsed no
    # further than a few ahead of the one being answered; the rest waits in the socket buffers.
    with kiln_serve(folder) as served, socket.create_connection(("127.0.0.1", served.port)) as sock:
        before = resident_mb(served.process.pid)
        sock.setblocking(False)
        data, deadline = memoryview(LIVE_REQUEST * 300_000), time.monotonic() + 2
        while data and time.monotonic() < deadline:
            try:
                data = data[sock.send(data) :]
            except BlockingIOError:
                time.sleep(0.01)
        grown = resident_mb(served.process.pid) - before
    assert grown < 30, f"the server grew by {grown:.0f} MB"
