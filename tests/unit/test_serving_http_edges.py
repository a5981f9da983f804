"""HTTP/1.1 at its edges, as an outside probe of `kiln serve` found them: each request answered once and counted
as what happened to it (a client that pipelines and hangs up, a body the server timed out, an answer sent before
the body), `Expect: 100-continue` waiting for admission, heads kiln cannot serve (a header given twice, a
transfer coding other than chunked, an Upgrade) refused clearly, and bytes no parser accepts answered 400 only
after the requests before them. Raw sockets on loopback against a real server
and real onnxruntime, on both the direct (binary) and the ASGI path."""

import gc
import json
import logging
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from serving_support import (
    Answers,
    binary_output,
    binary_request,
    config,
    gauge,
    images_batch,
    reference,
    serving,
    statuses,
    wait_until,
)
from serving_support import trained_folder as make_trained_folder

from kiln_serving import Server, http_heads
from kiln_serving.dataplane import LARGE_BYTES

PATIENCE = 30
BODY_TIMEOUT = 0.5
# Over LARGE_BYTES as a binary body (768 bytes an image): admitted one at a time below.
LARGE = LARGE_BYTES // 768 + 50


@pytest.fixture(scope="module")
def folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_trained_folder(tmp_path_factory.mktemp("edges") / "tiny")


@pytest.fixture(scope="module")
def server(folder: Path) -> Iterator[Server]:
    cfg = config(folder, body_timeout_seconds=BODY_TIMEOUT, max_concurrent_large_requests=1)
    with serving(cfg) as running:
        yield running


def connect(server: Server) -> socket.socket:
    return socket.create_connection(("127.0.0.1", server.port), timeout=PATIENCE)


def json_request(x: np.ndarray, model: str = "tiny", extra: str = "") -> bytes:
    body = json.dumps({"inputs": [{"name": "input", "datatype": "FP32", "shape": list(x.shape),
                                   "data": x.ravel().tolist()}]}).encode()  # fmt: skip
    return (f"POST /v2/models/{model}/infer HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(body)}\r\n{extra}\r\n").encode() + body  # fmt: skip


def head_and_body(raw: bytes) -> tuple[bytes, bytes]:
    head, body = raw.split(b"\r\n\r\n", 1)
    return head + b"\r\n\r\n", body


def delta(before: dict[str, float], after: dict[str, float]) -> dict[str, float]:
    return {k: v - before.get(k, 0) for k, v in after.items() if v != before.get(k, 0)}


def answered_logits(kind: str, headers: dict[str, str], body: bytes) -> np.ndarray:
    """The logits of an inference answer, binary or JSON."""
    if kind == "binary":
        return binary_output(body, int(headers["inference-header-content-length"]))
    (output,) = json.loads(body)["outputs"]
    return np.asarray(output["data"], np.float32).reshape(output["shape"])


@pytest.mark.parametrize("kind", ["binary", "json"])
def test_a_client_that_pipelines_and_hangs_up_is_counted_499_and_logs_no_error(
    server: Server, kind: str, caplog: pytest.LogCaptureFixture
) -> None:
    # uvicorn tells only the newest request of a connection that it is gone; the one being answered wrote to the
    # closed transport (an ERROR with a traceback per client, "Task exception was never retrieved" on the direct
    # path). Every request on the connection must see the hang-up.
    make = binary_request if kind == "binary" else json_request
    before = statuses(server)
    with caplog.at_level(logging.WARNING):
        for seed in range(5):
            with connect(server) as sock:
                sock.sendall(make(images_batch(8, seed=seed)) * 4)
                assert Answers(sock).next()[0] == b"HTTP/1.1 200 OK"
            wait_until(lambda: gauge(server, "requests_in_flight") == 0, "its requests handled")
        gc.collect()  # an exception nobody retrieved from a task is logged when the task is collected
    counted = delta(before, statuses(server))
    # Each client's first request answered; those behind it cancelled (499) or never begun (not counted).
    assert set(counted) <= {"200", "499"} and counted["200"] >= 5, counted
    problems = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
    assert problems == []


@pytest.mark.parametrize("kind", ["binary", "json"])
def test_an_expect_100_continue_request_waiting_for_admission_gets_100_then_its_answer(
    server: Server, kind: str
) -> None:
    # The server, not the client, withholds the 100 while another large body holds the only admission place:
    # the body's clock must not run (it answered 408 after body_timeout_seconds).
    holder_head, holder_body = head_and_body(binary_request(images_batch(LARGE, seed=1)))
    make = binary_request if kind == "binary" else json_request
    head, body = head_and_body(make(images_batch(LARGE, seed=2), extra="Expect: 100-continue\r\n"))
    with connect(server) as holder, connect(server) as waiting:
        holder.sendall(holder_head)
        pieces = np.array_split(np.frombuffer(holder_body, np.uint8), 8)

        def hold() -> None:  # keeps the admission place ~4 body timeouts, each piece within the timeout
            for piece in pieces:
                holder.sendall(piece.tobytes())
                time.sleep(BODY_TIMEOUT / 2)

        sender = threading.Thread(target=hold)
        sender.start()
        time.sleep(BODY_TIMEOUT / 2)
        waiting.sendall(head)
        started = time.monotonic()
        answers = Answers(waiting)
        status, _, _ = answers.next()
        waited = time.monotonic() - started
        sender.join()
        assert status == b"HTTP/1.1 100 Continue", status
        assert waited > BODY_TIMEOUT  # it really waited for the holder's place
        waiting.sendall(body)
        assert answers.next()[0] == b"HTTP/1.1 200 OK"
        assert Answers(holder).next()[0] == b"HTTP/1.1 200 OK"


def test_an_http_1_0_client_expecting_100_continue_gets_no_1xx_only_its_answer(server: Server) -> None:
    # RFC 9110 §10.1.1: the expectation is ignored in an HTTP/1.0 request, and §15.2: no 1xx to an HTTP/1.0 client.
    request = json_request(images_batch(2), extra="Expect: 100-continue\r\n").replace(b"HTTP/1.1", b"HTTP/1.0", 1)
    with connect(server) as sock:
        sock.sendall(request)
        status, _, body = Answers(sock).next()
    assert status == b"HTTP/1.1 200 OK", status
    assert json.loads(body)["outputs"][0]["shape"][0] == 2


def test_an_expect_100_continue_request_answered_without_its_body_closes_the_connection(server: Server) -> None:
    # Its client need not send the body after a final answer (RFC 9110 §10.1.1), so where the next request would
    # start is unknown: the answer says connection: close, and the connection closes.
    head, _ = head_and_body(binary_request(images_batch(2), model="resnet", extra="Expect: 100-continue\r\n"))
    with connect(server) as sock:
        sock.sendall(head)
        answers = Answers(sock)
        status, headers, body = answers.next()
        assert status.startswith(b"HTTP/1.1 404") and b"model 'resnet' not found" in body
        assert headers["connection"] == "close"
        assert answers.closed()


def test_a_request_answered_before_its_body_gets_no_second_answer(server: Server) -> None:
    # The early 404 stands; if the body never comes, the connection closes without an unasked-for 408.
    head, _ = head_and_body(binary_request(images_batch(2), model="resnet"))
    with connect(server) as sock:
        sock.sendall(head)
        answers = Answers(sock)
        assert answers.next()[0].startswith(b"HTTP/1.1 404")
        assert answers.closed()  # after the body timeout, and with nothing more written


@pytest.mark.parametrize("kind", ["binary", "json"])
def test_a_body_the_server_times_out_is_counted_408_not_as_a_client_hang_up(server: Server, kind: str) -> None:
    make = binary_request if kind == "binary" else json_request
    head, body = head_and_body(make(images_batch(4)))
    before = statuses(server)
    with connect(server) as sock:
        sock.sendall(head + body[: len(body) // 2])
        answers = Answers(sock)
        assert answers.next()[0].startswith(b"HTTP/1.1 408")
        assert answers.closed()
    wait_until(lambda: delta(before, statuses(server)) != {}, "the request counted")
    assert delta(before, statuses(server)) == {"408": 1}


@pytest.mark.parametrize("encoding", ["", "Content-Encoding: identity\r\n"])  # the direct path, then ASGI
def test_an_inference_header_content_length_given_twice_is_refused_on_both_paths(server: Server, encoding: str) -> None:
    raw = binary_request(images_batch(1), extra=encoding)
    head, body = head_and_body(raw)
    for twice in (b"Inference-Header-Content-Length: 1\r\n\r\n", b"Inference-Header-Content-Length: 999\r\n\r\n"):
        with connect(server) as sock:
            sock.sendall(head[:-2] + twice + body)  # a second value before the head's end
            status, _, answer = Answers(sock).next()
            assert status.startswith(b"HTTP/1.1 400"), status
            assert json.loads(answer) == {"error": "Inference-Header-Content-Length is given 2 times; send it once"}


def test_a_transfer_coding_other_than_chunked_gets_501_and_the_connection_closes(server: Server) -> None:
    # The body would reach the model still gzipped behind the chunked framing.
    body = json.dumps({"inputs": []}).encode()
    raw = (b"POST /v2/models/tiny/infer HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
           b"Transfer-Encoding: gzip, chunked\r\n\r\n%x\r\n%s\r\n0\r\n\r\n" % (len(body), body))  # fmt: skip
    with connect(server) as sock:
        sock.sendall(raw + b"GET /v2/health/live HTTP/1.1\r\nHost: x\r\n\r\n")
        answers = Answers(sock)
        status, _, answer = answers.next()
        assert status.startswith(b"HTTP/1.1 501")
        assert "transfer coding 'gzip, chunked' is not supported" in json.loads(answer)["error"]
        assert answers.closed()


def test_an_upgrade_request_gets_400_and_the_connection_closes(server: Server) -> None:
    # The HTTP parser stops at an upgrade, so the body would never be read (and the connection never answer
    # again); kiln upgrades to nothing (gRPC has its own port).
    upgrade = "Connection: Upgrade, HTTP2-Settings\r\nUpgrade: h2c\r\nHTTP2-Settings: AAMAAABkAAQAAP__\r\n"
    with connect(server) as sock:
        sock.sendall(binary_request(images_batch(1), extra=upgrade))
        answers = Answers(sock)
        status, headers, answer = answers.next()
        assert status.startswith(b"HTTP/1.1 400") and headers["connection"] == "close"
        assert "does not upgrade HTTP/1.1 connections" in json.loads(answer)["error"]
        assert answers.closed()


# Bytes no HTTP parser accepts, and what the 400 says of each: a method that is none, an HTTP version that is
# none, a header line without a colon, a body framed two ways at once (a request smuggler's favourite).
UNPARSABLE = {
    b"GARBAGE\r\n\r\n": "Invalid method encountered",
    b"GET /v2/health/live HTTP/9.9\r\nHost: x\r\n\r\n": "Invalid HTTP version",
    b"GET / HTTP/1.1\r\nno colon\r\n\r\n": "Invalid header token",
    b"POST /v2/models/tiny/infer HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\nContent-Length: 3\r\n\r\n":
        "Content-Length can't be present with Transfer-Encoding",
}  # fmt: skip


# A request refused for its head, pipelined behind valid ones, and the status it gets.
REFUSED_HEADS = {
    "unparsable": (b"GARBAGE\r\n\r\n", 400),
    "head too large": (b"GET /v2/health/live HTTP/1.1\r\nX-Big: " + b"a" * (70 * 1024) + b"\r\n\r\n", 431),
    "transfer coding": (b"POST /v2/models/tiny/infer HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: gzip, chunked\r\n\r\n",
                        501),
    "upgrade": (b"POST /v2/models/tiny/infer HTTP/1.1\r\nConnection: Upgrade\r\nUpgrade: h2c\r\n"
                b"Content-Length: 0\r\n\r\n", 400),
    # RFC 9112 §3.2: an HTTP/1.1 request without a Host header, or any with two, MUST get 400.
    "no host": (b"GET /v2/health/live HTTP/1.1\r\n\r\n", 400),
    "two hosts": (b"GET /v2/health/live HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n", 400),
    "http/2.0 request line": (b"GET /v2/health/live HTTP/2.0\r\nHost: x\r\n\r\n", 505),
}  # fmt: skip


@pytest.mark.parametrize(("version", "hosts", "message"), [
    ("1.1", 0, "an HTTP/1.1 request needs exactly one Host header; this one has 0"),
    ("1.1", 2, "an HTTP/1.1 request needs exactly one Host header; this one has 2"),
    ("1.0", 2, "an HTTP/1.0 request may have at most one Host header; this one has 2"),
])  # fmt: skip
def test_a_host_refusal_says_what_the_request_s_own_version_asks(version: str, hosts: int, message: str) -> None:
    headers = [(b"host", b"x")] * hosts
    assert http_heads.refusal(b"/v2/health/live", headers, version, False, 8192) == (400, "Bad Request", message)
    assert http_heads.refusal(b"/v2/health/live", [(b"host", b"x")], version, False, 8192) is None


@pytest.mark.parametrize("refused", list(REFUSED_HEADS))
@pytest.mark.parametrize("pipelined", [1, 2])
@pytest.mark.parametrize("kind", ["binary", "json"])
def test_requests_before_a_refused_head_are_answered_and_counted_200_then_the_refusal_closes_the_connection(
    server: Server, folder: Path, kind: str, pipelined: int, refused: str
) -> None:
    # Refused at once (uvicorn's parser error, or kiln's own refusal of the head), the connection closed while the
    # requests before it were still being answered: their answers were lost and they were counted 499, as if
    # their client had hung up. nginx, Triton and h11 answer them first, in order, then the refusal.
    make = binary_request if kind == "binary" else json_request
    bad, code = REFUSED_HEADS[refused]
    xs = [images_batch(2 + n, seed=n) for n in range(pipelined)]
    before = statuses(server)
    with connect(server) as sock:
        sock.sendall(b"".join(make(x) for x in xs) + bad)  # one write
        answers = Answers(sock)
        for x in xs:
            status, headers, body = answers.next()
            assert status == b"HTTP/1.1 200 OK", status
            got = answered_logits(kind, headers, body)
            assert np.abs(got - reference(folder / "models" / "model.onnx", {"input": x})["logits"]).max() <= 1e-5
        status, headers, _ = answers.next()
        assert status.startswith(b"HTTP/1.1 %d" % code) and headers["connection"] == "close", status
        assert answers.closed()
    wait_until(lambda: sum(delta(before, statuses(server)).values()) >= pipelined, "the requests counted")
    assert delta(before, statuses(server)) == {"200": pipelined}  # not 499: their client never hung up


@pytest.mark.parametrize("bad", UNPARSABLE)
def test_a_health_probe_before_unparsable_bytes_is_answered_then_400_closes_the_connection(
    server: Server, bad: bytes
) -> None:
    with connect(server) as sock:
        sock.sendall(b"GET /v2/health/live HTTP/1.1\r\nHost: x\r\n\r\n" + bad)
        answers = Answers(sock)
        status, _, body = answers.next()
        assert (status, body) == (b"HTTP/1.1 200 OK", b'{"live":true}')
        status, headers, body = answers.next()
        assert status == b"HTTP/1.1 400 Bad Request" and headers["connection"] == "close"
        assert json.loads(body)["error"] == f"not valid HTTP/1.1: {UNPARSABLE[bad]}"  # the parser's reason
        assert answers.closed()


def test_a_head_request_before_unparsable_bytes_gets_its_head_before_the_400(server: Server) -> None:
    # A HEAD answer's head is held for a body that never comes (transport_views.HeadWithBody): it must still leave
    # first. (Answers would frame the 400 as the HEAD's body, so the bytes are read to the end.)
    with connect(server) as sock:
        sock.sendall(b"HEAD /v2/health/live HTTP/1.1\r\nHost: x\r\n\r\n" + b"GARBAGE\r\n\r\n")
        received = b""
        while chunk := sock.recv(1 << 16):
            received += chunk
    head, rest = received.split(b"\r\n\r\n", 1)
    assert head.startswith(b"HTTP/1.1 200 OK\r\n"), received
    assert rest.startswith(b"HTTP/1.1 400 Bad Request\r\n") and b"connection: close\r\n" in rest, received


def test_unparsable_bytes_in_a_pipelined_chunked_body_get_400_after_the_answer_before_them(server: Server) -> None:
    # The bad bytes are in the second request's body: that request is the one answered 400, once the first is
    # answered; it never reached the app, so it is not counted.
    bad = (b"POST /v2/models/tiny/infer HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
           b"Transfer-Encoding: chunked\r\n\r\nzz\r\n")  # fmt: skip
    before = statuses(server)
    with connect(server) as sock:
        sock.sendall(binary_request(images_batch(2)) + bad)
        answers = Answers(sock)
        assert answers.next()[0] == b"HTTP/1.1 200 OK"
        status, headers, _ = answers.next()
        assert status == b"HTTP/1.1 400 Bad Request" and headers["connection"] == "close"
        assert answers.closed()
    wait_until(lambda: delta(before, statuses(server)) != {}, "the request counted")
    assert delta(before, statuses(server)) == {"200": 1}


def test_a_chunked_body_the_parser_cannot_parse_is_counted_400_not_as_a_client_hang_up(server: Server) -> None:
    # Its app already reads it when the bad chunk comes: the server, not the client, ends it.
    head = (b"POST /v2/models/tiny/infer HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            b"Transfer-Encoding: chunked\r\n\r\n5\r\n{\"inp\r\n")  # fmt: skip
    before = statuses(server)
    with connect(server) as sock:
        sock.sendall(head)
        wait_until(lambda: gauge(server, "requests_in_flight") == 1, "the app reading the body")
        sock.sendall(b"zz\r\n")
        answers = Answers(sock)
        status, headers, _ = answers.next()
        assert status == b"HTTP/1.1 400 Bad Request" and headers["connection"] == "close"
        assert answers.closed()
    wait_until(lambda: delta(before, statuses(server)) != {}, "the request counted")
    assert delta(before, statuses(server)) == {"400": 1}


def one_byte_chunks(x: np.ndarray) -> bytes:
    """x as a JSON inference request whose body is sent chunked, one byte a chunk."""
    body = json.dumps({"inputs": [{"name": "input", "datatype": "FP32", "shape": list(x.shape),
                                   "data": x.ravel().tolist()}]}).encode()  # fmt: skip
    chunks = b"".join(b"1\r\n" + body[i : i + 1] + b"\r\n" for i in range(len(body)))
    return (b"POST /v2/models/tiny/infer HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            b"Transfer-Encoding: chunked\r\n\r\n" + chunks + b"0\r\n\r\n")  # fmt: skip


def test_bodies_of_one_byte_chunks_each_reach_their_own_request_whole(server: Server, folder: Path) -> None:
    # A read's body bytes go to their request at once (connections.py gathers them: a call of uvicorn's for each
    # 1-byte chunk held the loop ~0.1 s a read). Two requests pipelined in one send, then a third: each gets all of
    # its body and none of the next one's.
    xs = [images_batch(2, seed=seed) for seed in range(3)]
    with connect(server) as sock:
        sock.sendall(one_byte_chunks(xs[0]) + one_byte_chunks(xs[1]))
        answers = Answers(sock)
        got = [answers.next(), answers.next()]
        sock.sendall(one_byte_chunks(xs[2]))
        got.append(answers.next())
    for x, (status, headers, body) in zip(xs, got, strict=True):
        assert status == b"HTTP/1.1 200 OK", body
        expected = reference(folder / "models" / "model.onnx", {"input": x})["logits"]
        assert np.abs(answered_logits("json", headers, body) - expected).max() <= 1e-5
