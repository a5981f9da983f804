"""gRPC calls' memory and event-loop cost before they run: a large call's body is read only once admitted
(--max-concurrent-large-requests, as the HTTP server reads large bodies), waiting meanwhile with no more than
HTTP/2's first window; a ModelInferRequest whose structure is absurd is refused before protobuf parses it; and a
large tensor is never copied (raw) or converted in one stretch holding the GIL (typed)."""

import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from google.protobuf.message import DecodeError
from http2_support import LIVE, Answer, Client, first_output, framed, infer_body, output, request_fields
from serving_support import config, images_batch, kiln_serve, longest_health_wait, reference, serving
from serving_support import trained_folder as make_trained_folder
from tritonclient.grpc import service_pb2 as pb

from kiln_cluster.controlplane import free_port
from kiln_serving import Server, protobuf_walk
from kiln_serving.dataplane import LARGE_BYTES

FIRST_WINDOW = 65_535  # HTTP/2's default stream window (RFC 9113 6.9.2)


@pytest.fixture(scope="module")
def folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_trained_folder(tmp_path_factory.mktemp("grpc") / "tiny")


@pytest.fixture(scope="module")
def one_at_a_time(folder: Path) -> Iterator[Server]:
    with serving(config(folder, grpc_port=free_port(), max_concurrent_large_requests=1)) as running:
        yield running


def test_a_large_call_waits_for_admission_with_only_the_first_window_then_is_read_and_answered(
    one_at_a_time: Server, folder: Path
) -> None:
    x = images_batch(512)  # 393 KB, as the bench sends: a large request
    body = infer_body(x)
    assert len(body) > 256 * 1024  # over dataplane.LARGE_BYTES: it needs one of the places
    expected = reference(folder / "models" / "model.onnx", {"input": x})["logits"]
    with Client(one_at_a_time) as client:
        # The first call is admitted (its window opens to its whole body) and holds the only place: not ended.
        first = client.call("ModelInfer", body, end=False)
        second = client.h2.get_next_available_stream_id()
        client.answers[second] = Answer()
        client.h2.send_headers(second, request_fields("ModelInfer"))
        for start in range(0, FIRST_WINDOW, 16_384):
            client.h2.send_data(second, body[start : min(start + 16_384, FIRST_WINDOW)])
        client.flush()
        assert client.wait(client.call("ServerLive", LIVE)).status == 0  # the server has read all of the above
        assert client.h2.local_flow_control_window(second) == 0  # not admitted: nothing past the first window
        client.h2.end_stream(first)
        client.flush()
        assert np.allclose(output(client.wait(first).body), expected, atol=1e-5)
        # The place is free: the second call's window opens to what its body still needs, and it is answered.
        sent = FIRST_WINDOW
        while sent < len(body):
            room = min(client.h2.local_flow_control_window(second), 16_384, len(body) - sent)
            if room == 0:
                client.pump()
                continue
            client.h2.send_data(second, body[sent : sent + room], end_stream=sent + room == len(body))
            sent += room
            client.flush()
        assert np.allclose(output(client.wait(second).body), expected, atol=1e-5)


def absurd(where: str) -> bytes:
    """A large ModelInferRequest of more than MAX_INFER_FIELDS fields: empty `inputs` entries (2 bytes each), or
    parameters of one input or one output (about 12 bytes each)."""
    request = pb.ModelInferRequest(model_name="tiny")
    if where == "inputs":
        return request.SerializeToString() + b"\x2a\x00" * (LARGE_BYTES // 2)
    tensor = request.inputs.add(name="input") if where == "an input's parameters" else request.outputs.add(name="o")
    for i in range(LARGE_BYTES // 8):
        tensor.parameters[f"{i}"].bool_param = True
    return request.SerializeToString()


@pytest.mark.parametrize("where", ["inputs", "an input's parameters", "an output's parameters"])
def test_a_model_infer_of_absurdly_many_fields_is_refused_before_it_is_parsed(
    one_at_a_time: Server, where: str
) -> None:
    message = absurd(where)
    assert len(message) >= LARGE_BYTES  # large enough to be walked (a small one is just parsed)
    with Client(one_at_a_time) as client:
        answer = client.wait(client.call("ModelInfer", framed(message)))
    assert answer.status == 3 and "refused unparsed" in answer.headers["grpc-message"]


def test_a_shape_of_a_million_dimensions_is_refused_by_its_length(one_at_a_time: Server) -> None:
    request = pb.ModelInferRequest(model_name="tiny")
    request.inputs.add(name="input", datatype="FP32").shape.extend([1] * 1_000_000)
    message = request.SerializeToString()
    with Client(one_at_a_time) as client:
        answer = client.wait(client.call("ModelInfer", framed(message)))
    assert answer.status == 3, answer.headers
    assert answer.headers["grpc-message"] == "input 'input': shape has 1000000 dimensions; at most 64"


# A gRPC client of its own process (grpcio, the message already serialized): sending from a thread of this one
# would make the health probes here wait for the GIL, not for the server.
_SEND = """
import sys, grpc
message = open(sys.argv[2], "rb").read()
limits = [("grpc.max_send_message_length", -1), ("grpc.max_receive_message_length", -1)]
with grpc.insecure_channel(sys.argv[1], options=limits) as channel:
    sys.stdout.buffer.write(channel.unary_unary("/inference.GRPCInferenceService/ModelInfer")(message))
"""


def typed_message(x: np.ndarray) -> bytes:
    """A ModelInferRequest with x as fp32_contents (what KServe's InferenceGRPCClient sends)."""
    request = pb.ModelInferRequest(model_name="tiny")
    tensor = request.inputs.add(name="input", datatype="FP32", shape=list(x.shape))
    tensor.contents.fp32_contents.extend(x.ravel().tolist())
    return request.SerializeToString()


def test_a_large_typed_tensor_call_never_holds_the_event_loop(folder: Path, tmp_path: Path) -> None:
    # 24 MB of fp32_contents. Reference: numpy turning the parsed contents into an array, holding the GIL all the
    # while (a thread does not help), as the server did while probes waited. (A raw tensor's stall was joining,
    # parsing and copying it, ~100 ms for 48 MB, too close to what a busy machine's probes wait anyway to test
    # here: test_a_walked_message_keeps_its_raw_contents_uncopied... checks that it is no longer copied.)
    x = images_batch(24 * 1024 * 1024 // images_batch(1).nbytes)
    message = typed_message(x)
    parsed = pb.ModelInferRequest.FromString(message).inputs[0].contents.fp32_contents
    started = time.perf_counter()
    np.asarray(parsed, dtype=np.float32)
    reference_seconds = time.perf_counter() - started
    (tmp_path / "message").write_bytes(message)
    sent: list[subprocess.CompletedProcess[bytes]] = []
    with kiln_serve(folder, grpc=True) as server:
        command = [sys.executable, "-c", _SEND, f"127.0.0.1:{server.grpc_port}", str(tmp_path / "message")]
        longest = longest_health_wait(server.url, lambda: sent.append(subprocess.run(command, capture_output=True)))
    assert sent[0].returncode == 0, sent[0].stderr.decode()
    assert longest < reference_seconds / 2, f"a probe waited {longest:.3f}s; the GIL was held {reference_seconds:.3f}s"
    expected = reference(folder / "models" / "model.onnx", {"input": x})["logits"]
    assert np.allclose(first_output(sent[0].stdout), expected, atol=1e-5)


def test_a_walked_message_keeps_its_raw_contents_uncopied_and_protobuf_reads_the_rest() -> None:
    request = pb.ModelInferRequest(model_name="tiny", id="7", raw_input_contents=[b"\x01" * 300, b"", b"\x02" * 5])
    request.inputs.add(name="input", datatype="FP32", shape=[1, 3])
    request.outputs.add(name="logits")
    message = request.SerializeToString()
    walked = protobuf_walk.split(message, 7, limit=10)
    assert walked.fields == 7  # model_name, id, inputs, outputs and three raw contents
    assert protobuf_walk.split(message, 7, limit=20, nested={5, 6}).fields == 11  # and the tensors' own fields
    assert [bytes(view) for view in walked.lifted] == list(request.raw_input_contents)
    assert all(view.obj is message for view in walked.lifted)  # views of the message, not copies
    del request.raw_input_contents[:]
    assert pb.ModelInferRequest.FromString(walked.rest) == request
    assert protobuf_walk.split(message, 7, limit=3).fields == 4  # counting stops past the limit


@pytest.mark.parametrize(
    "broken",
    [b"\x3a\x05abc", b"\x0a\x80", b"\x0b", b"\x08" + b"\xff" * 11],
    ids=["a field past the end", "a cut length", "a group's wire type", "an overlong varint"],
)
def test_a_large_message_broken_at_its_top_level_is_refused_as_protobuf_refuses_one(
    one_at_a_time: Server, broken: bytes
) -> None:
    with pytest.raises(DecodeError):
        protobuf_walk.split(broken, 7, limit=10)
    message = infer_body(images_batch(512))[5:] + broken  # large: walked by hand, not parsed
    with Client(one_at_a_time) as client:
        answer = client.wait(client.call("ModelInfer", framed(message)))
        assert answer.status == 13 and "cannot parse the request message" in answer.headers["grpc-message"]
        assert client.wait(client.call("ServerLive", LIVE)).status == 0
