"""Binary inference requests skip ASGI (kiln_serving/direct.py) yet behave exactly as through it: the same
answer byte for byte, pipelining and keep-alive, connection close, timeouts, the access log; over raw sockets on
loopback against a real server and real onnxruntime. Hang-ups and graceful shutdown on both paths are tested
with the heavy and batching tests."""

import contextlib
import logging
import socket
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from serving_support import (
    Answers,
    binary_output,
    binary_request,
    config,
    images_batch,
    reference,
    serving,
    statuses,
    wait_until,
)
from serving_support import trained_folder as make_trained_folder
from uvicorn.protocols.http.flow_control import HIGH_WATER_LIMIT

from kiln_serving import Server
from kiln_serving.direct import DirectCycle

PATIENCE = 30
# The most one read of the event loop hands over at once (uvloop reads into a 256 KiB buffer).
READ_BYTES = 256 * 1024


@pytest.fixture(scope="module")
def folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_trained_folder(tmp_path_factory.mktemp("direct") / "tiny")


@pytest.fixture(scope="module")
def server(folder: Path) -> Iterator[Server]:
    with serving(config(folder, body_timeout_seconds=0.5, access_log=True)) as running:
        yield running


def connect(server: Server) -> socket.socket:
    return socket.create_connection(("127.0.0.1", server.port), timeout=PATIENCE)


def open_cycles(server: Server) -> list[Any]:
    """The last request cycle of each connection the server holds open."""
    connections = list(server.uvicorn_server.server_state.connections)
    return [c.cycle for c in connections if getattr(c, "cycle", None) is not None]  # type: ignore[attr-defined]


def cycles(server: Server) -> list[str]:
    return [type(c).__name__ for c in open_cycles(server)]


def logits(folder: Path, x: np.ndarray) -> np.ndarray:
    return reference(folder / "models" / "model.onnx", {"input": x})["logits"]


def test_a_binary_answer_is_the_same_bytes_and_headers_as_through_asgi(server: Server, folder: Path) -> None:
    x = images_batch(3, seed=1)
    with connect(server) as sock:
        answers = Answers(sock)
        sock.sendall(binary_request(x))
        direct = answers.next()
        assert cycles(server) == ["DirectCycle"]
        # Any Content-Encoding goes through ASGI.
        sock.sendall(binary_request(x, extra="Content-Encoding: identity\r\n"))
        through_asgi = answers.next()
        assert cycles(server) == ["RequestResponseCycle"]
    assert direct[0] == through_asgi[0] == b"HTTP/1.1 200 OK"
    del direct[1]["date"], through_asgi[1]["date"]
    assert direct[1] == through_asgi[1]
    assert set(direct[1]) == {"server", "content-type", "content-length", "inference-header-content-length"}
    assert direct[2] == through_asgi[2]
    got = binary_output(direct[2], int(direct[1]["inference-header-content-length"]))
    assert np.abs(got - logits(folder, x)).max() <= 1e-5


def test_pipelined_requests_are_answered_in_order_and_an_unread_body_does_not_break_the_connection(
    server: Server, folder: Path
) -> None:
    xs = [images_batch(n, seed=n) for n in (1, 2, 5)]
    with connect(server) as sock:
        answers = Answers(sock)
        # The unknown model is refused before its body is read; the parser still frames it by its length.
        sock.sendall(b"".join([binary_request(xs[0], model="resnet"), *map(binary_request, xs)]))
        status, _, body = answers.next()
        assert status.startswith(b"HTTP/1.1 404") and b"model 'resnet' not found" in body
        for x in xs:
            status, headers, body = answers.next()
            assert status == b"HTTP/1.1 200 OK"
            got = binary_output(body, int(headers["inference-header-content-length"]))
            assert got.shape == (len(x), 5) and np.abs(got - logits(folder, x)).max() <= 1e-5
        sock.sendall(binary_request(xs[0]))  # and the connection is still good for more
        assert answers.next()[0] == b"HTTP/1.1 200 OK"


@pytest.mark.parametrize(("version", "extra"), [("1.1", "Connection: close\r\n"), ("1.0", "")])
def test_a_request_that_does_not_keep_the_connection_alive_is_answered_then_closed(
    server: Server, version: str, extra: str
) -> None:
    with connect(server) as sock:
        answers = Answers(sock)
        sock.sendall(binary_request(images_batch(1), extra=extra, version=version))
        status, headers, _ = answers.next()
        assert status.endswith(b" 200 OK") and headers["connection"] == "close"
        assert answers.closed()


def test_a_binary_body_that_stops_halfway_is_answered_408_and_closed(server: Server) -> None:
    whole = binary_request(images_batch(4))
    with connect(server) as sock:
        sock.sendall(whole[: len(whole) // 2])
        answers = Answers(sock)
        assert answers.next()[0].startswith(b"HTTP/1.1 408")
        assert answers.closed()


def test_a_direct_request_is_in_the_access_log_and_the_request_metrics(
    server: Server, caplog: pytest.LogCaptureFixture
) -> None:
    before = statuses(server).get("200", 0)
    with caplog.at_level(logging.INFO, logger="uvicorn.access"), connect(server) as sock:
        sock.sendall(binary_request(images_batch(1), model="tiny/versions/1"))
        assert Answers(sock).next()[0] == b"HTTP/1.1 200 OK"
    assert statuses(server)["200"] == before + 1
    lines = [r.getMessage() for r in caplog.records if r.name == "uvicorn.access"]
    assert any('"POST /v2/models/tiny/versions/1/infer HTTP/1.1" 200' in line for line in lines), lines


def test_bodies_waiting_to_be_admitted_are_held_no_further_than_through_asgi(folder: Path) -> None:
    """Past max_concurrent_large_requests a large body waits as uvicorn holds one for an app not reading yet
    (reading paused past HIGH_WATER_LIMIT), and no buffer of its declared size exists until it is admitted."""
    whole = binary_request(images_batch(2000))  # 1.5 MB of body
    cfg = config(folder, max_concurrent_large_requests=1, header_timeout_seconds=PATIENCE,
                 body_timeout_seconds=PATIENCE)  # fmt: skip
    with serving(cfg) as server, connect(server) as admitted:
        admitted.sendall(whole[: len(whole) // 2])
        wait_until(lambda: [c.buffer is not None for c in open_cycles(server)] == [True], "the first body admitted")
        waiting = [connect(server) for _ in range(6)]
        try:
            for sock in waiting:
                sock.setblocking(False)
                with contextlib.suppress(BlockingIOError):
                    sock.send(whole[:1_000_000])  # as much as the kernel takes, far past what the server holds
            held = lambda: [c.early_bytes for c in open_cycles(server) if c.buffer is None]  # noqa: E731
            wait_until(lambda: len(held()) == 6 and min(held()) > HIGH_WATER_LIMIT, "six bodies held, reading paused")
            assert max(held()) <= HIGH_WATER_LIMIT + READ_BYTES, held()
            admitted.sendall(whole[len(whole) // 2 :])
            assert Answers(admitted).next()[0] == b"HTTP/1.1 200 OK"
        finally:
            for sock in waiting:
                sock.close()
        wait_until(lambda: statuses(server).get("499", 0) == 6, "the six that left counted as 499")


def test_a_large_body_with_a_place_free_is_read_straight_into_its_buffer_and_gives_the_place_back(
    folder: Path,
) -> None:
    """Its place taken while its head was parsed, none of its body is held back; the place comes back when it
    is answered and when its client leaves, so the next one is read at once too."""
    whole = binary_request(images_batch(2000))  # 1.5 MB of body, past LARGE_BYTES
    cfg = config(folder, max_concurrent_large_requests=1, header_timeout_seconds=PATIENCE,
                 body_timeout_seconds=PATIENCE)  # fmt: skip
    with serving(cfg) as server:
        for leaves in (False, True, False):
            left = statuses(server).get("499", 0)
            with connect(server) as sock:
                sock.sendall(whole[: len(whole) // 2])
                reading = lambda: [c for c in open_cycles(server) if isinstance(c, DirectCycle)]  # noqa: E731
                wait_until(lambda: [c.filled > READ_BYTES for c in reading()] == [True], "half the body in")  # noqa: B023
                (cycle,) = reading()  # (a /metrics connection may still be closing beside it)
                assert cycle.call.admitted and cycle.early_bytes == 0
                if not leaves:  # the place is given back before the answer is sent
                    sock.sendall(whole[len(whole) // 2 :])
                    assert Answers(sock).next()[0] == b"HTTP/1.1 200 OK"
            if leaves:  # counted once its handler has given the place back
                wait_until(lambda: statuses(server).get("499", 0) > left, "the hang-up counted")  # noqa: B023
