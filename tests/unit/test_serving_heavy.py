"""Heavy and hostile requests: health answers while a big JSON request is decoded or a big JSON answer written, a
JSON request's memory stays within a few times its body, and a client that hangs up is counted as such, not as a
server error."""

import contextlib
import json
import logging
import socket
import time
import tracemalloc
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import numpy as np
import pytest
import uvicorn
from serving_support import (
    SIZE,
    GatedModel,
    all_datatypes,
    binary_body,
    config,
    gauge,
    images_batch,
    kiln_serve,
    longest_health_wait,
    queue_depth,
    reference,
    serving,
    statuses,
)
from serving_support import trained_folder as make_trained_folder

from kiln_serving import Server, ServingConfig, jsonwrite
from kiln_serving.app import build_app
from kiln_serving.connections import bind
from kiln_serving.model import Model

PATIENCE = 60


@pytest.fixture(scope="module")
def folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_trained_folder(tmp_path_factory.mktemp("heavy") / "tiny")


@pytest.fixture(scope="module")
def server(folder: Path) -> Iterator[Server]:
    with serving(config(folder)) as running:
        yield running


def big_json(rows: int, seed: int = 0) -> tuple[np.ndarray, bytes]:
    x = np.random.default_rng(seed).normal(size=(rows, 3, SIZE, SIZE)).round(3).astype(np.float32)
    body = {"inputs": [{"name": "input", "shape": list(x.shape), "datatype": "FP32", "data": x.tolist()}]}
    return x, json.dumps(body).encode()


def raw_post(port: int, path: str, body: bytes, declared: int | None = None, header_length: int | None = None
             ) -> socket.socket:  # fmt: skip
    """Send a POST (possibly less body than declared) on a fresh connection and return the socket; with
    header_length, a binary-extension request (which kiln answers without ASGI), else JSON."""
    sock = socket.create_connection(("127.0.0.1", port))
    kind = "Content-Type: application/json\r\n"
    if header_length is not None:
        kind = f"Content-Type: application/octet-stream\r\nInference-Header-Content-Length: {header_length}\r\n"
    head = (f"POST {path} HTTP/1.1\r\nHost: x\r\n{kind}"
            f"Content-Length: {len(body) if declared is None else declared}\r\n\r\n").encode()  # fmt: skip
    sock.sendall(head)
    sock.sendall(body)  # not head + body: that copy would count against the server in the memory test
    return sock


def read_response(sock: socket.socket) -> bytearray:
    """One answer (to its Content-Length, or to the connection's end), received straight into one buffer of its
    size: a test's probes share this process's GIL, and copying a 45 MB answer here would stall them."""
    data = bytearray()
    while (split := data.find(b"\r\n\r\n")) < 0:
        chunk = sock.recv(1 << 16)
        if not chunk:
            return data
        data += chunk
    head = bytes(data[:split]).lower()
    if b"content-length:" not in head:
        while chunk := sock.recv(1 << 20):
            data += chunk
        return data
    end = split + 4 + int(head.split(b"content-length:")[1].split(b"\r\n")[0])
    answer, received = bytearray(end), min(len(data), end)
    answer[:received] = data[:received]
    view = memoryview(answer)
    while received < end and (count := sock.recv_into(view[received:], end - received)):
        received += count
    view.release()
    return answer if received == end else answer[:received]


def big_bodies() -> dict[str, tuple[str, bytes, bytes]]:
    """(path, body, the start of the answer) of big JSON requests of several shapes."""
    x, v2 = big_json(4000)
    v1 = json.dumps({"instances": x.tolist()}).encode()
    members = {"inputs": [{"name": "input", "shape": [1, 3, SIZE, SIZE], "datatype": "FP32", "data": [0.0] * 192}],
               "parameters": {f"p{i}": i for i in range(1_000_000)}}  # fmt: skip
    return {
        "v2 numbers": ("/v2/models/tiny/infer", v2, b"HTTP/1.1 200"),
        "v1 numbers": ("/v1/models/tiny:predict", v1, b"HTTP/1.1 200"),
        "a million request parameters": ("/v2/models/tiny/infer", json.dumps(members).encode(), b"HTTP/1.1 400"),
    }


@pytest.mark.parametrize("case", list(big_bodies()))
def test_health_never_waits_for_a_big_json_request_to_be_decoded(folder: Path, case: str) -> None:
    # 12-19 MB of JSON. Reference: how long json.loads takes on it here, now; with the decode on the event loop
    # (or holding the GIL on a thread) every health probe waited at least that long. The server runs as `kiln
    # serve` does, in a process of its own.
    path, body, answer = big_bodies()[case]
    started = time.perf_counter()
    json.loads(body)
    decode_seconds = time.perf_counter() - started
    answered: list[bytearray] = []

    with kiln_serve(folder) as server:

        def send_big() -> None:
            with contextlib.closing(raw_post(server.port, path, body)) as sock:
                answered.append(read_response(sock))

        longest = longest_health_wait(server.url, send_big)
        assert answered[0].startswith(answer), answered[0][:300]
        if case == "a million request parameters":
            assert b"request JSON has an object of 1000000 members; at most 4096" in answered[0]
        assert longest < decode_seconds / 2, (
            f"a health probe waited {longest:.2f}s; json.loads takes {decode_seconds:.2f}s"
        )
    if case.startswith("v"):  # and the big request itself was answered correctly
        x = big_json(4000)[0]
        answer_json = json.loads(answered[0].partition(b"\r\n\r\n")[2])
        data = answer_json["outputs"][0]["data"] if case == "v2 numbers" else answer_json["predictions"]
        expected = reference(folder / "models" / "model.onnx", {"input": x})["logits"]
        assert np.abs(np.asarray(data, dtype=np.float32).reshape(len(x), -1) - expected).max() <= 1e-4


def test_health_never_waits_for_a_big_json_answer_to_be_written(tmp_path: Path) -> None:
    # 4.2 M values in as binary data (17 MB), out as JSON (~45 MB of text). Reference: orjson writing them, one
    # call holding the GIL, as the server's encoding did (on a codec thread, and every probe waited all the same).
    x = np.random.default_rng(0).normal(size=(1_400_000, 3)).astype(np.float32)
    started = time.perf_counter()
    jsonwrite.dumps({"data": x.reshape(-1)})
    write_seconds = time.perf_counter() - started
    model = all_datatypes(tmp_path / "types" / "model.onnx", ["FP32"])
    raw = x.tobytes()
    header = json.dumps({"inputs": [{"name": "in_FP32", "shape": list(x.shape), "datatype": "FP32",
                                     "parameters": {"binary_data_size": len(raw)}}],
                         "outputs": [{"name": "out_FP32"}]}).encode()  # fmt: skip
    answered: list[bytearray] = []
    with kiln_serve(model.parent) as server:

        def send_big() -> None:
            path = "/v2/models/types/infer"
            with contextlib.closing(raw_post(server.port, path, header + raw, header_length=len(header))) as sock:
                answered.append(read_response(sock))

        longest = longest_health_wait(server.url, send_big)
    assert longest < write_seconds / 2, f"a health probe waited {longest:.3f}s; orjson takes {write_seconds:.3f}s"
    head, _, body = answered[0].partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200"), answered[0][:300]
    (output,) = json.loads(body)["outputs"]
    assert np.array_equal(np.asarray(output["data"], dtype=np.float32), x.reshape(-1))


def test_health_never_waits_for_a_big_kserve_v1_answer_to_be_written(tmp_path: Path) -> None:
    # 1 M instances of 3 values in (~31 MB of JSON), one prediction each out. Reference: the predictions as Python
    # lists, as the server made them, on the event loop (every probe waited all of it and the write after it).
    x = np.random.default_rng(1).normal(size=(1_000_000, 3)).round(3).astype(np.float32)
    started = time.perf_counter()
    [row.tolist() for row in x]
    lists_seconds = time.perf_counter() - started
    model = all_datatypes(tmp_path / "types" / "model.onnx", ["FP32"])
    body = json.dumps({"instances": x.tolist()}).encode()
    answered: list[bytearray] = []
    with kiln_serve(model.parent) as server:

        def send_big() -> None:
            with contextlib.closing(raw_post(server.port, "/v1/models/types:predict", body)) as sock:
                answered.append(read_response(sock))

        longest = longest_health_wait(server.url, send_big)
    assert longest < lists_seconds / 2, f"a health probe waited {longest:.3f}s; the lists take {lists_seconds:.3f}s"
    head, _, text = answered[0].partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200"), answered[0][:300]
    assert np.array_equal(np.asarray(json.loads(text)["predictions"], dtype=np.float32), x)


def test_a_json_request_peaks_at_under_three_times_its_body_in_memory(server: Server) -> None:
    _, body = big_json(2000, seed=1)
    tracemalloc.start()
    try:
        baseline = tracemalloc.get_traced_memory()[0]
        tracemalloc.reset_peak()
        sock = raw_post(server.port, "/v2/models/tiny/infer", body)
        assert read_response(sock).startswith(b"HTTP/1.1 200")
        sock.close()
        peak = tracemalloc.get_traced_memory()[1] - baseline
    finally:
        tracemalloc.stop()
    assert peak <= 3 * len(body), f"peak {peak / 1e6:.1f} MB for a {len(body) / 1e6:.1f} MB body"


@pytest.mark.parametrize("binary", [False, True], ids=["json", "binary"])
def test_a_client_hanging_up_mid_body_is_counted_as_499_without_an_error_log(
    server: Server, caplog: pytest.LogCaptureFixture, binary: bool
) -> None:
    before = statuses(server)
    # The first bytes of a body that never arrives whole.
    body, header_length = binary_body(images_batch(64)) if binary else (b'{"inputs": [' + b" " * 100_000, None)
    with caplog.at_level(logging.INFO):  # every logger: uvicorn's as well as kiln's
        sock = raw_post(server.port, "/v2/models/tiny/infer", body[:1000], len(body), header_length)
        sock.close()
        deadline = time.monotonic() + 60
        while statuses(server).get("499", 0) <= before.get("499", 0) and time.monotonic() < deadline:
            time.sleep(0.05)
    after = statuses(server)
    assert after.get("499", 0) == before.get("499", 0) + 1
    assert after.get("500", 0) == before.get("500", 0)
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR]
    assert httpx.get(f"{server.url}/v2/health/ready").status_code == 200


@contextlib.contextmanager
def plain_uvicorn(cfg: ServingConfig, model: Model) -> Iterator[Server]:
    """kiln's app under uvicorn's own h11 protocol: no kiln connection layer, so no hang-up extension."""
    app = build_app(cfg, model)
    uv = uvicorn.Server(uvicorn.Config(app, http="h11", lifespan="on", log_config=None))
    server = Server(app=app, sock=bind(cfg.host, cfg.port), uvicorn_server=uv)
    server.thread.start()
    try:
        assert server.wait_loaded(PATIENCE)
        yield server
    finally:
        server.stop()


@pytest.mark.parametrize(
    ("run", "binary"),
    [(serving, False), (serving, True), (plain_uvicorn, False)],
    ids=["kiln-http-json", "kiln-http-binary", "another-asgi-server"],
)
def test_a_queued_request_whose_client_hangs_up_gives_its_place_in_the_queue_back(
    tmp_path: Path, run: Callable[[ServingConfig, Model], contextlib.AbstractContextManager[Server]], binary: bool
) -> None:
    model = GatedModel()
    x = np.array([[1.0, 2.0]], dtype=np.float32)
    if binary:
        body, header_length = binary_body(x, name="x", output="y")
    else:
        body = json.dumps({"inputs": [{"name": "x", "shape": [1, 2], "datatype": "FP32", "data": [1.0, 2.0]}]}).encode()
        header_length = None

    def post(server: Server) -> socket.socket:
        return raw_post(server.port, "/v2/models/gated/infer", body, header_length=header_length)

    with run(config(tmp_path, max_queue_size=1, max_queue_delay_microseconds=0), model) as server:
        running = post(server)  # holds the worker at the gate
        deadline = time.monotonic() + PATIENCE
        # In flight, neither arriving nor queued: the first request is at the model's gate.
        while server.dataplane.batcher.incoming or queue_depth(server) or gauge(server, "requests_in_flight") < 1:
            assert time.monotonic() < deadline, "the first request never reached the model"
            time.sleep(0.02)
        leaving = post(server)  # queued: the only place
        while queue_depth(server) < 1:
            assert time.monotonic() < deadline
            time.sleep(0.02)
        leaving.close()
        while queue_depth(server) > 0:  # its place is given back without the worker ever running it
            assert time.monotonic() < deadline, "the hung-up request kept its place in the queue"
            time.sleep(0.02)
        waiting = post(server)  # fits only because the place is free
        while queue_depth(server) < 1:
            assert time.monotonic() < deadline
            time.sleep(0.02)
        model.gate.set()
        assert read_response(running).startswith(b"HTTP/1.1 200")
        assert read_response(waiting).startswith(b"HTTP/1.1 200")
        assert statuses(server, "gated").get("499") == 1


@pytest.mark.parametrize("binary", [False, True], ids=["json", "binary"])
def test_a_large_body_the_server_holds_back_for_admission_is_not_timed_out(tmp_path: Path, binary: bool) -> None:
    """max_concurrent_large_requests=1 and one large request at the model: the next one's body is read no
    further than 64 KiB until its turn, and waiting for its turn, far past the body timeout, is not its
    client's slowness: no 408, and it is answered once the first is done."""
    model = GatedModel()
    x = np.arange(80_000, dtype=np.float32).reshape(-1, 2)  # 320 KB binary, over 256 KB (a large request)
    if binary:
        body, header_length = binary_body(x, name="x", output="y")
    else:
        body = json.dumps({"inputs": [{"name": "x", "shape": list(x.shape), "datatype": "FP32",
                                       "data": x.reshape(-1).tolist()}]}).encode()  # fmt: skip
        header_length = None
    cfg = config(tmp_path, max_concurrent_large_requests=1, body_timeout_seconds=0.3, max_queue_delay_microseconds=0)
    with serving(cfg, model) as server:
        first = raw_post(server.port, "/v2/models/gated/infer", body, header_length=header_length)
        deadline = time.monotonic() + PATIENCE
        while server.dataplane.batcher.incoming or queue_depth(server) or gauge(server, "requests_in_flight") < 1:
            assert time.monotonic() < deadline, "the first request never reached the model"
            time.sleep(0.02)
        held = raw_post(server.port, "/v2/models/gated/infer", body, header_length=header_length)
        while gauge(server, "requests_in_flight") < 2:  # the second is in, waiting for its turn
            assert time.monotonic() < deadline
            time.sleep(0.02)
        time.sleep(1.0)  # more than three body timeouts
        model.gate.set()
        for sock in (first, held):
            assert read_response(sock).startswith(b"HTTP/1.1 200"), "a request waiting for its turn timed out"
            sock.close()


@pytest.mark.parametrize("path", ["/v2/models/tiny/infer", "/v1/models/tiny:predict"], ids=["v2", "kserve v1"])
def test_a_large_json_body_with_a_syntax_error_gets_a_400_naming_where_json_loads_does(server: Server, path: str
                                                                                      ) -> None:  # fmt: skip
    x, body = big_json(200)
    if path.startswith("/v1"):
        body = json.dumps({"instances": x.tolist()}).encode()
    comma = body.rfind(b", ")  # between the last two numbers: the error is inside the numbers, on line 2
    broken = body[: len(body) // 2] + b"\n" + body[len(body) // 2 : comma] + b" " + body[comma + 2 :]
    with pytest.raises(json.JSONDecodeError) as expected:
        json.loads(broken)
    sock = raw_post(server.port, path, broken)
    head, _, text = read_response(sock).partition(b"\r\n\r\n")
    sock.close()
    assert head.startswith(b"HTTP/1.1 400"), head
    assert json.loads(text)["error"] == f"request body is not valid JSON: {expected.value}"
