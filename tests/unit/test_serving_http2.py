"""kiln's own HTTP/2 transport for gRPC, against peers that share none of its code: the h2 library as a client over
a plain socket (flow control both ways, body and header limits, deadlines, hang-ups, graceful stop), frames built
by hand for hostile input, and tritonclient.grpc (grpc-core) for many calls multiplexed on one connection."""

import contextlib
import functools
import logging
import queue
import socket
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import h2.config
import h2.connection
import h2.events
import h2.settings
import hpack
import numpy as np
import pytest
import tritonclient.grpc as triton_grpc
from serving_support import GatedModel, config, gauge, images_batch, queue_depth, reference, serving, statuses
from serving_support import trained_folder as make_trained_folder
from tritonclient.grpc import service_pb2 as pb
from tritonclient.utils import InferenceServerException

from kiln_cluster.controlplane import free_port
from kiln_serving import Server, http2_wire
from kiln_serving.http2_wire import CONTINUATION, DATA, END_HEADERS, END_STREAM, GOAWAY, HEADERS, PREFACE, SETTINGS

frame = http2_wire.frame

# Generous: the strict server closes after 0.5 s; a loaded machine may take far longer to get there.
PATIENCE = 60
SERVICE = "/inference.GRPCInferenceService"
# HTTP/2 error codes (RFC 9113 section 7), spelled out here rather than taken from the module under test.
NO_ERROR, PROTOCOL_ERROR, CANCEL, ENHANCE_YOUR_CALM = 0x0, 0x1, 0x8, 0xB


@pytest.fixture(scope="module")
def folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_trained_folder(tmp_path_factory.mktemp("http2") / "tiny")


@pytest.fixture(scope="module")
def server(folder: Path) -> Iterator[Server]:
    with serving(config(folder, grpc_port=free_port())) as running:
        yield running


@pytest.fixture(scope="module")
def strict(folder: Path) -> Iterator[Server]:
    cfg = config(folder, grpc_port=free_port(), max_header_bytes=8192, header_timeout_seconds=0.5,
                 body_timeout_seconds=0.5, keep_alive_timeout_seconds=0.5, max_connections=8)  # fmt: skip
    with serving(cfg) as running:
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


@dataclass
class Answer:
    """What came back on one stream."""

    headers: dict[str, str] = field(default_factory=dict)
    body: bytearray = field(default_factory=bytearray)
    trailers: dict[str, str] = field(default_factory=dict)
    ended: bool = False
    reset: int | None = None

    @property
    def status(self) -> int:
        """grpc-status, from the trailers or from the only header block of a Trailers-Only answer."""
        return int({**self.headers, **self.trailers}["grpc-status"])


class Client:
    """An h2 client connection over a plain loopback socket, read only when the test pumps it. h2 checks what
    the server sends: a DATA frame past a window or over 16 KiB raises."""

    def __init__(self, server: Server, settings: dict[int, int] | None = None) -> None:
        self.sock = raw(server)
        self.h2 = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True, header_encoding="utf-8"))
        self.h2.local_settings = h2.settings.Settings(client=True, initial_values=settings or {})
        self.h2.initiate_connection()
        self.acknowledge = True  # give received DATA's window back at once
        self.answers: dict[int, Answer] = {}
        self.terminated: h2.events.ConnectionTerminated | None = None
        self.flush()

    def __enter__(self) -> "Client":
        return self

    def __exit__(self, *_: object) -> None:
        self.sock.close()

    def flush(self) -> None:
        if data := self.h2.data_to_send():
            self.sock.sendall(data)

    def call(self, method: str, body: bytes, headers: Sequence[tuple[str, str]] = (), end: bool = True) -> int:
        """POST body to the service's method on a new stream, in DATA frames of at most 16 KiB as the windows
        allow; stops sending once the server has answered."""
        stream = self.h2.get_next_available_stream_id()
        answer = self.answers[stream] = Answer()
        self.h2.send_headers(stream, request_fields(method, *headers), end_stream=end and not body)
        sent = 0
        while sent < len(body) and not answer.ended:
            room = min(self.h2.local_flow_control_window(stream), 16_384, len(body) - sent)
            if room == 0:
                self.flush()
                self.pump()
                continue
            self.h2.send_data(stream, body[sent : sent + room], end_stream=end and sent + room == len(body))
            sent += room
        self.flush()
        return stream

    def pump(self) -> None:
        """Read once from the socket and let h2 check and take apart what came."""
        data = self.sock.recv(1 << 16)
        if not data:
            raise EOFError("the server closed the connection")
        for event in self.h2.receive_data(data):
            stream = getattr(event, "stream_id", None) or 0
            answer = self.answers.get(stream, Answer())
            if isinstance(event, h2.events.ResponseReceived):
                answer.headers = dict(event.headers)  # type: ignore[arg-type]
            elif isinstance(event, h2.events.DataReceived):
                answer.body += event.data or b""
                if self.acknowledge:
                    self.h2.acknowledge_received_data(event.flow_controlled_length or 0, stream)
            elif isinstance(event, h2.events.TrailersReceived):
                answer.trailers = dict(event.headers)  # type: ignore[arg-type]
            elif isinstance(event, h2.events.StreamEnded):
                answer.ended = True
            elif isinstance(event, h2.events.StreamReset):
                answer.reset = int(event.error_code or 0)
            elif isinstance(event, h2.events.ConnectionTerminated):
                self.terminated = event
        self.flush()

    def wait(self, stream: int) -> Answer:
        answer = self.answers[stream]
        while not answer.ended and answer.reset is None:
            self.pump()
        return answer

    def until_closed(self) -> None:
        with contextlib.suppress(EOFError):
            while True:
                self.pump()


Frame = tuple[int, int, int, bytes]  # type, flags, stream id, payload


class Frames:
    """The server's frames, parsed here (h2 stops reading at a GOAWAY, where some of these tests go on)."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock, self.buffer = sock, b""

    def next(self) -> Frame | None:
        """The next frame; None once the server closed."""
        while len(self.buffer) < 9 or len(self.buffer) < 9 + int.from_bytes(self.buffer[:3], "big"):
            chunk = self.sock.recv(1 << 16)
            if not chunk:
                assert not self.buffer, "the connection closed in the middle of a frame"
                return None
            self.buffer += chunk
        length = int.from_bytes(self.buffer[:3], "big")
        head, payload, self.buffer = self.buffer[:9], self.buffer[9 : 9 + length], self.buffer[9 + length :]
        return head[3], head[4], int.from_bytes(head[5:9], "big") & 0x7FFF_FFFF, payload

    def until(self, last: Callable[[Frame], bool]) -> list[Frame]:
        """The frames up to the first that `last` accepts (which the server must send before it closes)."""
        seen: list[Frame] = []
        while not (seen and last(seen[-1])):
            got = self.next()
            assert got is not None, f"closed before the frame awaited: {seen}"
            seen.append(got)
        return seen

    def until_closed(self) -> list[Frame]:
        return list(iter(self.next, None))  # type: ignore[arg-type]


def request_fields(method: str, *extra: tuple[str, str]) -> list[tuple[str, str]]:
    """A gRPC call's request headers; extra ones replace those of the same name."""
    fields = {":method": "POST", ":scheme": "http", ":path": f"{SERVICE}/{method}", ":authority": "kiln",
              "content-type": "application/grpc", "te": "trailers", **dict(extra)}  # fmt: skip
    return list(fields.items())


def goaway_codes(frames: list[Frame]) -> list[int]:
    return [int.from_bytes(payload[4:8], "big") for kind, _, _, payload in frames if kind == GOAWAY]


def raw(server: Server) -> socket.socket:
    assert server.grpc_port is not None
    return socket.create_connection(("127.0.0.1", server.grpc_port), timeout=PATIENCE)


def infer_body(x: np.ndarray, model: str = "tiny", name: str = "input") -> bytes:
    """A ModelInferRequest with x as raw contents, in gRPC's framing: uncompressed, 4-byte length, message."""
    request = pb.ModelInferRequest(model_name=model)
    request.inputs.add(name=name, datatype="FP32", shape=list(x.shape))
    request.raw_input_contents.append(x.tobytes())
    message = request.SerializeToString()
    return b"\x00" + len(message).to_bytes(4, "big") + message


def output(body: bytes) -> np.ndarray:
    """The first output of a ModelInferResponse in its gRPC framing."""
    assert body[0] == 0 and int.from_bytes(body[1:5], "big") == len(body) - 5
    response = pb.ModelInferResponse.FromString(body[5:])
    return np.frombuffer(response.raw_output_contents[0], dtype=np.float32).reshape(list(response.outputs[0].shape))


def until(condition: Callable[[], bool], what: str) -> None:
    deadline = time.monotonic() + PATIENCE
    while not condition():
        assert time.monotonic() < deadline, what
        time.sleep(0.02)


LIVE = b"\x00\x00\x00\x00\x00"  # ServerLive's request: an empty message in gRPC's framing
GATED = infer_body(np.array([[1.0, 2.0]], dtype=np.float32), model="gated", name="x")


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


def test_a_body_over_the_limit_is_answered_resource_exhausted_and_the_connection_stays_usable(folder: Path) -> None:
    with serving(config(folder, grpc_port=free_port(), max_body_bytes=1024)) as small, Client(small) as client:
        # The stream's window holds the 1024 bytes, the 64 KiB envelope and one byte more: the server answers
        # that byte and resets the stream, and the client stops sending.
        too_big = infer_body(images_batch(100))
        assert len(too_big) > 1024 + 64 * 1024 + 1
        refused = client.wait(client.call("ModelInfer", too_big))
        assert refused.status == 8 and "max_body_bytes" in refused.headers["grpc-message"]
        while refused.reset is None:  # and RST_STREAM(NO_ERROR) follows, which tells the client to stop sending
            client.pump()
        assert refused.reset == NO_ERROR
        x = images_batch(1, seed=42)
        fits = client.wait(client.call("ModelInfer", infer_body(x)))
        assert fits.status == 0
        assert np.allclose(output(fits.body), reference(folder / "models" / "model.onnx", {"input": x})["logits"])


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
def test_a_queued_call_that_leaves_gives_its_place_back_and_counts_as_499_without_an_error_log(
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
            assert counted.get("499") == 1 and "500" not in counted, counted
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR]


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


@pytest.mark.parametrize("sent", [b"", b"GET /v2/health/live HTTP/1.1\r\nHost: x\r\n\r\n"], ids=["nothing", "http1"])
def test_a_connection_without_the_preface_gets_settings_then_goaway_protocol_error_and_is_closed(
    strict: Server, sent: bytes
) -> None:
    with raw(strict) as sock:
        sock.sendall(sent)
        frames = Frames(sock).until_closed()
    assert frames[0][0] == SETTINGS and frames[-1][0] == GOAWAY and goaway_codes(frames) == [PROTOCOL_ERROR]


def test_a_request_whose_body_stops_halfway_is_closed_after_the_body_timeout(strict: Server) -> None:
    with Client(strict) as client:
        client.call("ModelInfer", b"\x00\x00\x00\x03\xe8" + b"\x00" * 10, end=False)  # 10 of 1000 bytes
        client.until_closed()
        assert client.terminated is not None and client.terminated.error_code == CANCEL


def test_an_idle_connection_after_its_answer_gets_goaway_no_error_and_is_closed(strict: Server) -> None:
    with Client(strict) as client:
        assert client.wait(client.call("ServerLive", LIVE)).status == 0
        client.until_closed()
        assert client.terminated is not None and client.terminated.error_code == NO_ERROR


@pytest.mark.parametrize("continued", [False, True], ids=["one-headers-frame", "headers-and-continuation"])
def test_a_header_block_over_the_limit_ends_the_connection_with_enhance_your_calm(
    strict: Server, continued: bool
) -> None:
    block = hpack.Encoder().encode(request_fields("ServerLive", ("x-padding", "a" * 20_000)), huffman=False)
    if continued:  # 12 KiB of a block that has not ended: the server stops buffering it at the limit
        sent = [frame(CONTINUATION if i else HEADERS, 0, 1, block[i : i + 4096]) for i in range(0, 12_288, 4096)]
    else:
        sent = [frame(HEADERS, END_HEADERS, 1, block)]
    with raw(strict) as sock:
        sock.sendall(PREFACE + frame(SETTINGS, 0, 0) + b"".join(sent))
        assert goaway_codes(Frames(sock).until_closed()) == [ENHANCE_YOUR_CALM]


def test_past_the_connection_cap_a_new_connection_is_closed_at_once_while_open_ones_still_answer(
    folder: Path,
) -> None:
    cfg = config(folder, grpc_port=free_port(), max_connections=8, header_timeout_seconds=PATIENCE,
                 keep_alive_timeout_seconds=PATIENCE)  # fmt: skip
    with serving(cfg) as capped, Client(capped) as client, contextlib.ExitStack() as others:
        assert client.wait(client.call("ServerLive", LIVE)).status == 0
        for _ in range(7):  # each is taken in: the server's SETTINGS come
            sock = others.enter_context(raw(capped))
            sock.sendall(PREFACE + frame(SETTINGS, 0, 0))
            assert Frames(sock).until(lambda f: True)[0][0] == SETTINGS
        with raw(capped) as extra:
            assert Frames(extra).until_closed() == []  # not even a SETTINGS frame
        assert client.wait(client.call("ServerLive", LIVE)).status == 0
