"""Connection hygiene, with raw sockets on loopback: oversized heads get 431, half-sent requests and idle
keep-alive connections are closed, and past the connection cap new connections are refused at once while
the server stays reachable."""

import socket
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from serving_support import config, serving
from serving_support import trained_folder as make_trained_folder

from kiln_serving import Server

# Generous: the server closes after 0.5 s; a loaded machine may take far longer to get there.
PATIENCE = 30


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    folder: Path = make_trained_folder(tmp_path_factory.mktemp("connections") / "tiny")
    cfg = config(folder, max_header_bytes=8192, header_timeout_seconds=0.5, body_timeout_seconds=0.5,
                 keep_alive_timeout_seconds=0.5, max_connections=8)  # fmt: skip
    with serving(cfg) as running:
        yield running


def connect(server: Server) -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", server.port), timeout=PATIENCE)
    return sock


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


def test_an_idle_keep_alive_connection_is_closed_after_its_answer(server: Server) -> None:
    with connect(server) as sock:
        sock.sendall(b"GET /v2/health/live HTTP/1.1\r\nHost: x\r\n\r\n")
        assert until_closed(sock).startswith(b"HTTP/1.1 200 ")


def test_past_the_connection_cap_new_connections_get_503_at_once_and_the_server_stays_reachable(
    server: Server,
) -> None:
    idle = [connect(server) for _ in range(8)]
    try:
        with connect(server) as extra:
            assert until_closed(extra).startswith(b"HTTP/1.1 503 ")
    finally:
        for sock in idle:
            sock.close()
    # The idle ones are gone (or time out on their own): probes get through again.
    for _ in range(PATIENCE * 10):
        try:
            if httpx.get(f"{server.url}/v2/health/live").status_code == 200:
                break
        except httpx.HTTPError:
            time.sleep(0.1)
    assert httpx.get(f"{server.url}/v2/health/live").status_code == 200
