"""kiln's own HTTP/2 transport for gRPC with well-behaved peers that share none of its code: the h2 library as a
client over a plain socket (flow control both ways, request trailers, deadlines, hang-ups, graceful stop), frames
built by hand, and tritonclient.grpc (grpc-core) for many calls multiplexed on one connection. Limits and timeouts
are in test_serving_http2_limits.py."""

import contextlib
import functools
import logging
import queue
import threading
import time
import urllib.parse
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import h2.settings
import hpack
import numpy as np
import pytest
import tritonclient.grpc as triton_grpc
from http2_support import (
    LIVE,
    NO_ERROR,
    PATIENCE,
    Client,
    Frames,
    framed,
    goaway_codes,
    infer_body,
    output,
    raw,
    request_fields,
)
from serving_support import GatedModel, config, gauge, images_batch, queue_depth, reference, serving, statuses
from serving_support import trained_folder as make_trained_folder
from tritonclient.grpc import service_pb2 as pb
from tritonclient.utils import InferenceServerException

from kiln_cluster.controlplane import free_port
from kiln_serving import Server
from kiln_serving.http2_wire import (
    CONTINUATION,
    DATA,
    END_HEADERS,
    END_STREAM,
    GOAWAY,
    HEAD,
    HEADERS,
    PREFACE,
    SETTINGS,
    WINDOW_UPDATE,
    frame,
    header_frames,
)

GATED = infer_body(np.array([[1.0, 2.0]], dtype=np.float32), model="gated", name="x")


@pytest.fixture(scope="module")
def folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_trained_folder(tmp_path_factory.mktemp("http2") / "tiny")


@pytest.fixture(scope="module")
def server(folder: Path) -> Iterator[Server]:
    with serving(config(folder, grpc_port=free_port())) as running:
        yield running


@contextlib.contextmanager
def gated(folder: Path) -> Iterator[tuple[Server, GatedModel]]:
    """A server whose model holds every batch at its gate (opened on the way out, so the server can stop)."""
    model = GatedModel()
    with serving(config(folder, grpc_port=free_port(), max_queue_size=1, max_queue_delay_microseconds=0), model) as s:
        try:
            yield s, model
        finally:
            model.gate.set()


def until(condition: Callable[[], bool], what: str) -> None:
    deadline = time.monotonic() + PATIENCE
    while not condition():
        assert time.monotonic() < deadline, what
        time.sleep(0.02)


def test_an_answer_larger_than_the_clients_window_comes_only_as_the_client_gives_window_back(
    server: Server, folder: Path
) -> None:
    x = images_batch(4000, seed=41)  # 3 MB of request in 16 KiB frames; 80 KB of logits
    expected = reference(folder / "models" / "model.onnx", {"input": x})["logits"]
    window = h2.settings.SettingCodes.INITIAL_WINDOW_SIZE
    with Client(server, {window: 1024}) as client:
        client.acknowledge = False
        answer = client.answers[stream := client.call("ModelInfer", infer_body(x))]
        while len(answer.body) < 1024:
            client.pump()
        assert len(answer.body) == 1024 and not answer.ended  # one window's worth, then the server waits
        client.sock.settimeout(0.5)  # and nothing more comes while the window stays shut
        with pytest.raises(TimeoutError):
            client.pump()
        client.sock.settimeout(PATIENCE)
        client.acknowledge = True
        client.h2.acknowledge_received_data(1024, stream)
        client.flush()
        assert client.wait(stream).status == 0
        assert np.abs(output(answer.body) - expected).max() <= 1e-4
        # A second call stalls the same way; a larger SETTINGS_INITIAL_WINDOW_SIZE then opens the stream's window
        # by the difference (RFC 9113 6.9.2), and the rest comes without the stream's window given back.
        client.acknowledge = False
        client.h2.increment_flow_control_window(1 << 20)  # the connection's window is not the limit here
        again = client.answers[stream := client.call("ModelInfer", infer_body(x))]
        while len(again.body) < 1024:
            client.pump()
        assert len(again.body) == 1024 and not again.ended
        client.h2.update_settings({window: 1 << 20})
        client.flush()
        assert client.wait(stream).status == 0 and again.body == answer.body


def test_request_trailers_split_over_continuation_frames_end_the_request(server: Server) -> None:
    encoder = hpack.Encoder()
    head = encoder.encode(request_fields("ServerLive"))
    trailers = encoder.encode([("x-checksum", "0" * 64)], huffman=False)
    with raw(server) as sock:
        request = frame(HEADERS, END_HEADERS, 1, head) + frame(DATA, 0, 1, LIVE)
        split = frame(HEADERS, END_STREAM, 1, trailers[:30]) + frame(CONTINUATION, END_HEADERS, 1, trailers[30:])
        sock.sendall(PREFACE + frame(SETTINGS, 0, 0) + request + split)
        answer = Frames(sock).until(lambda f: f[2] == 1 and bool(f[1] & END_STREAM))
    assert not goaway_codes(answer) and dict(hpack.Decoder().decode(answer[-1][3]))["grpc-status"] == "0"


def test_frames_of_one_byte_are_handled_a_turn_at_a_time_in_order_and_the_call_answered(
    server: Server, folder: Path
) -> None:
    # A call's 49 KB body in 1-byte DATA frames (49,000 frames), after 200,000 WINDOW_UPDATEs of 1 (2.6 MB that
    # wait for their turns with reading paused): handled _FRAMES_PER_TURN at a time (http2.py), all of them, in
    # order, and the call answered from its whole body.
    x = images_batch(64, seed=7)
    body = infer_body(x)
    updates = frame(WINDOW_UPDATE, 0, 0, (1).to_bytes(4, "big")) * 200_000
    data = b"".join(frame(DATA, 0, 1, body[i : i + 1]) for i in range(len(body) - 1))
    head = frame(HEADERS, END_HEADERS, 1, hpack.Encoder().encode(request_fields("ModelInfer")))
    with raw(server) as sock:
        sock.sendall(PREFACE + frame(SETTINGS, 0, 0) + updates + head + data + frame(DATA, END_STREAM, 1, body[-1:]))
        answer = Frames(sock).until(lambda f: f[2] == 1 and bool(f[1] & END_STREAM))
    assert not goaway_codes(answer) and dict(hpack.Decoder().decode(answer[-1][3]))["grpc-status"] == "0"
    message = b"".join(payload for kind, _, stream, payload in answer if kind == DATA and stream == 1)
    expected = reference(folder / "models" / "model.onnx", {"input": x})["logits"]
    assert np.abs(output(message) - expected).max() <= 1e-5


def test_a_non_grpc_request_gets_415_and_a_get_gets_405(server: Server) -> None:
    with Client(server) as client:
        json = client.call("ModelInfer", b"{}", [("content-type", "application/json")])
        assert client.wait(json).headers[":status"] == "415"
        get = client.call("ServerLive", b"", [(":method", "GET")])
        assert client.wait(get).headers[":status"] == "405"
        assert client.wait(client.call("ServerLive", LIVE)).status == 0


def at_the_gate(server: Server) -> None:
    """Wait until one request is in flight, neither arriving nor queued: at the model's gate."""
    until(lambda: not (server.dataplane.batcher.incoming or queue_depth(server))
          and gauge(server, "requests_in_flight") >= 1, "the first request never reached the model")  # fmt: skip


@pytest.mark.parametrize("leaving", ["deadline", "hang-up"])
def test_a_queued_call_that_leaves_gives_its_place_back_counted_by_why_without_an_error_log(
    folder: Path, caplog: pytest.LogCaptureFixture, leaving: str
) -> None:
    with caplog.at_level(logging.INFO, logger="kiln_serving"), gated(folder) as (server, model):
        with Client(server) as client, Client(server) as other:
            running = client.call("ModelInfer", GATED)
            at_the_gate(server)
            if leaving == "deadline":  # h2 keeps no deadlines: the answer comes from the server's own clock
                late = other.wait(other.call("ModelInfer", GATED, [("grpc-timeout", "300m")]))
                assert late.status == 4, late.headers
            else:
                other.call("ModelInfer", GATED)
                until(lambda: queue_depth(server) >= 1, "the second call was never queued")
                other.sock.close()
            until(lambda: queue_depth(server) == 0, "the call that left kept its place in the queue")
            waiting = client.call("ModelInfer", GATED)  # queued (max_queue_size=1) only because the place is free
            until(lambda: queue_depth(server) >= 1, "the next call was not queued")
            model.gate.set()
            assert client.wait(running).status == 0 and client.wait(waiting).status == 0
            counted = statuses(server, "gated")
            # A hang-up is the client's doing (499, not an error); a deadline that passed while the call waited is
            # the server not answering in time (504, as grpc-gateway maps DEADLINE_EXCEEDED): alerts must see it.
            assert counted.get("504" if leaving == "deadline" else "499") == 1 and "500" not in counted, counted
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR]


@pytest.mark.parametrize(("timeout", "status"), [("0n", 4), ("0S", 4), ("1n", 4), ("10S", 0)])
def test_a_call_whose_deadline_passes_before_its_answer_is_ready_ends_deadline_exceeded(
    server: Server, timeout: str, status: int
) -> None:
    # ServerLive's answer is ready at once, but not within 0 (already passed) or 1 ns: grpc's servers say so.
    with Client(server) as client:
        answer = client.wait(client.call("ServerLive", LIVE, [("grpc-timeout", timeout)]))
        assert answer.status == status, answer.headers


def test_a_call_in_flight_when_the_server_stops_is_answered_before_the_connection_closes(folder: Path) -> None:
    with gated(folder) as (server, model), Client(server) as client:
        client.call("ModelInfer", GATED)  # stream 1; from here the frames are read raw
        at_the_gate(server)
        stopping = threading.Thread(target=server.stop)
        stopping.start()
        frames = Frames(client.sock)
        goaway = frames.until(lambda f: f[0] == GOAWAY)[-1][3]
        assert int.from_bytes(goaway[:4], "big") == 1 and int.from_bytes(goaway[4:8], "big") == NO_ERROR
        model.gate.set()
        rest = [f for f in frames.until_closed() if f[2] == 1]
        blocks = [dict(hpack.Decoder().decode(payload)) for kind, _, _, payload in rest if kind == HEADERS]
        assert blocks[-1]["grpc-status"] == "0" and rest[-1][1] & END_STREAM
        body = b"".join(payload for kind, _, _, payload in rest if kind == DATA)
        assert output(body).tolist() == [[1.0, 2.0]]
        stopping.join(PATIENCE)
        assert not stopping.is_alive()


def test_a_hundred_calls_multiplexed_on_one_connection_each_get_their_own_answer(server: Server, folder: Path) -> None:
    x = images_batch(100, seed=43)
    expected = reference(folder / "models" / "model.onnx", {"input": x})["logits"]
    answers: queue.Queue[tuple[int, Any, Any]] = queue.Queue()

    def collect(i: int, result: Any, error: Any) -> None:
        answers.put((i, result, error))

    with contextlib.closing(triton_grpc.InferenceServerClient(server.grpc_address)) as client:
        for i in range(len(x)):
            tensor = triton_grpc.InferInput("input", [1, 3, 8, 8], "FP32")
            tensor.set_data_from_numpy(x[i : i + 1])
            client.async_infer("tiny", [tensor], functools.partial(collect, i))
        got = [answers.get(timeout=PATIENCE) for _ in range(len(x))]
    assert sorted(i for i, _, _ in got) == list(range(len(x)))
    for i, result, error in got:
        assert error is None, error
        assert np.abs(result.as_numpy("logits") - expected[i : i + 1]).max() <= 1e-5


def test_an_unknown_model_with_a_non_ascii_name_is_not_found_with_the_name_intact(server: Server) -> None:
    with contextlib.closing(triton_grpc.InferenceServerClient(server.grpc_address)) as client:
        with pytest.raises(InferenceServerException) as missing:
            client.get_model_metadata("modèle 100%41")  # "%41" would come back as "A" if '%' went unencoded
    assert missing.value.status() == "StatusCode.NOT_FOUND"
    assert "'modèle 100%41'" in missing.value.message()


def test_an_error_naming_a_very_long_non_ascii_model_fits_the_clients_frames_and_the_connection_serves_on(
    server: Server,
) -> None:
    request = pb.ModelReadyRequest(name="é" * 3000).SerializeToString()  # 12 KB once percent-encoded, uncut
    with Client(server) as client:  # h2 refuses a frame over its 16 KiB SETTINGS_MAX_FRAME_SIZE
        missing = client.wait(client.call("ModelReady", framed(request)))
        assert missing.status == 5
        message = missing.headers["grpc-message"]
        assert len(message) <= 4096 and urllib.parse.unquote(message, errors="strict").startswith("model 'éé")
        assert client.wait(client.call("ServerLive", LIVE)).status == 0


def test_a_header_block_over_the_peers_frame_size_goes_out_as_headers_and_continuation_frames() -> None:
    block = hpack.Encoder().encode([("grpc-message", "x" * 40_000)], huffman=False)
    frames = [(HEAD.unpack_from(f), f[9:]) for f in header_frames(7, block, True, 16_384)]
    assert [kind_length & 0xFF for (kind_length, _, _), _ in frames] == [HEADERS, CONTINUATION, CONTINUATION]
    assert [flags for (_, flags, _), _ in frames] == [END_STREAM, 0, END_HEADERS]
    assert all(len(payload) <= 16_384 and sid == 7 for (_, _, sid), payload in frames)
    assert b"".join(payload for _, payload in frames) == block
