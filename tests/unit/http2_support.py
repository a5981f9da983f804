"""The HTTP/2 tests' peers, shared by the test_serving_http2*.py files: the h2 library as a
client over a plain socket, a reader of the server's raw frames, and gRPC calls' request and answer bytes."""

import contextlib
import socket
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import h2.config
import h2.connection
import h2.events
import h2.settings
import numpy as np
from serving_support import ServeProcess, config
from tritonclient.grpc import service_pb2 as pb

from kiln_cluster.controlplane import free_port
from kiln_serving import Server, ServingConfig
from kiln_serving.http2_wire import GOAWAY

# Generous: the strict server closes after 0.5 s; a loaded machine may take far longer to get there.
PATIENCE = 60
SERVICE = "/inference.GRPCInferenceService"
# HTTP/2 error codes (RFC 9113 section 7), spelled out here rather than taken from the module under test.
NO_ERROR, PROTOCOL_ERROR, CANCEL, ENHANCE_YOUR_CALM = 0x0, 0x1, 0x8, 0xB
LIVE = b"\x00\x00\x00\x00\x00"  # ServerLive's request: an empty message in gRPC's framing


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

    def __init__(self, server: Server | ServeProcess, settings: dict[int, int] | None = None) -> None:
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


def raw(server: Server | ServeProcess) -> socket.socket:
    assert server.grpc_port is not None
    return socket.create_connection(("127.0.0.1", server.grpc_port), timeout=PATIENCE)


def infer_body(x: np.ndarray, model: str = "tiny", name: str = "input") -> bytes:
    """A ModelInferRequest with x as raw contents, framed."""
    request = pb.ModelInferRequest(model_name=model)
    request.inputs.add(name=name, datatype="FP32", shape=list(x.shape))
    request.raw_input_contents.append(x.tobytes())
    return framed(request.SerializeToString())


def framed(message: bytes) -> bytes:
    """A message in gRPC's framing: uncompressed, 4-byte length, message."""
    return b"\x00" + len(message).to_bytes(4, "big") + message


def output(body: bytes) -> np.ndarray:
    """The first output of a ModelInferResponse in its gRPC framing."""
    assert body[0] == 0 and int.from_bytes(body[1:5], "big") == len(body) - 5
    return first_output(body[5:])


_SEND = """
import sys, grpc
message = open(sys.argv[2], "rb").read()
limits = [("grpc.max_send_message_length", -1), ("grpc.max_receive_message_length", -1)]
with grpc.insecure_channel(sys.argv[1], options=limits) as channel:
    sys.stdout.buffer.write(channel.unary_unary("/inference.GRPCInferenceService/ModelInfer")(message))
"""


def send_message(address: str, message: Path) -> list[str]:
    """The command that sends a serialized ModelInferRequest (a file) with grpcio and writes the answer to stdout:
    a process of its own, so that a test's probes share no GIL with the client."""
    return [sys.executable, "-c", _SEND, address, str(message)]


def first_output(message: bytes) -> np.ndarray:
    """The first output of a ModelInferResponse message."""
    response = pb.ModelInferResponse.FromString(message)
    return np.frombuffer(response.raw_output_contents[0], dtype=np.float32).reshape(list(response.outputs[0].shape))


def strict_config(folder: Path, **overrides: object) -> ServingConfig:
    """A server with a gRPC port and limits tight enough to reach in a test: 8 KiB heads, half-second header and
    body timeouts."""
    settings: dict[str, object] = {"max_header_bytes": 8192, "header_timeout_seconds": 0.5,
                                   "body_timeout_seconds": 0.5, **overrides}  # fmt: skip
    return config(folder, grpc_port=free_port(), **settings)
