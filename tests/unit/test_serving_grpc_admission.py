"""gRPC calls' memory and event-loop cost before they run: a large call's body is read only once admitted
(--max-concurrent-large-requests, as the HTTP server reads large bodies), waiting meanwhile with no more than
HTTP/2's first window; a ModelInferRequest whose structure is absurd is refused before protobuf parses it; and a
large tensor is never copied (raw) or converted in one stretch holding the GIL (typed)."""

import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from google.protobuf.message import DecodeError
from http2_support import LIVE, Answer, Client, first_output, framed, infer_body, output, request_fields, send_message
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


@pytest.mark.parametrize(
    ("packed", "message"),
    [
        (b"\x01" * 1_000_000, "input 'input': shape has 1000000 dimensions; at most 64"),
        (b"\xff" * 300_000, "input 'input': cannot parse its shape"),
    ],
    ids=["a million dimensions", "no whole varint"],
)
def test_a_long_shape_is_refused_by_its_length_unparsed(one_at_a_time: Server, packed: bytes, message: str) -> None:
    # Parsed, a 7 MB shape held the GIL 88 ms (and 56 MB of memory) before its length was checked.
    tensor = pb.ModelInferRequest.InferInputTensor(name="input", datatype="FP32").SerializeToString()
    tensor += b"\x1a" + protobuf_walk.encode_varint(len(packed)) + packed  # field 3, shape
    sent = b"\x0a\x04tiny\x2a" + protobuf_walk.encode_varint(len(tensor)) + tensor
    with Client(one_at_a_time) as client:
        answer = client.wait(client.call("ModelInfer", framed(sent)))
    assert answer.status == 3, answer.headers
    assert answer.headers["grpc-message"] == message


# A gRPC client of its own process (grpcio, the message already serialized): sending from a thread of this one
# would make the health probes here wait for the GIL, not for the server.
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
        command = send_message(f"127.0.0.1:{server.grpc_port}", tmp_path / "message")
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


def test_a_walk_lifts_the_inputs_contents_out_and_re_encodes_the_inputs_without_them() -> None:
    request = pb.ModelInferRequest(model_name="tiny")
    typed = request.inputs.add(name="a", datatype="FP32", shape=[2])
    typed.contents.fp32_contents.extend([1.5, 2.5])
    typed.parameters["k"].int64_param = 3
    text = request.inputs.add(name="b", datatype="BYTES", shape=[200])
    text.contents.bytes_contents.extend([b"x" * 300] * 200)  # a long input: its length takes two bytes more
    request.inputs.add(name="c", datatype="FP32", shape=[1])  # no contents
    request.outputs.add(name="logits")
    message = request.SerializeToString()
    long = request.inputs.add(name="d", datatype="FP32")
    long.shape.extend([1] * 100)  # 100 bytes packed: lifted from 100 bytes on
    message = request.SerializeToString()
    walked = protobuf_walk.split(message, 7, limit=100, nested={5, 6}, inner=(5, {5: 0, 3: 100}))
    assert [[number for number, _ in lifted] for lifted in walked.inner] == [[5], [5], [], [3]]
    for tensor, lifted in zip(request.inputs, walked.inner, strict=True):
        assert [bytes(view) for number, view in lifted if number == 5] == (
            [tensor.contents.SerializeToString()] if tensor.HasField("contents") else []
        )
        tensor.ClearField("contents")
    assert bytes(walked.inner[3][0][1]) == b"\x01" * 100
    del long.shape[:]
    assert pb.ModelInferRequest.FromString(walked.rest) == request
    assert list(protobuf_walk.numbers(walked.inner[1][0][1], 3)) == [8, 8, 8]  # bytes_contents, one field each
    assert protobuf_walk.split(message, 7, limit=100, nested={5, 6}, inner=(5, {5: 0, 3: 101})).inner[3] == []


def one_input_message(tensor: "pb.ModelInferRequest.InferInputTensor", contents: list[bytes]) -> bytes:
    """ModelInferRequest(model_name="tiny") of one input: `tensor`, then each of `contents` (InferTensorContents'
    wire form, as sent) as its field 5: contents protobuf could not have serialized."""
    fields = tensor.SerializeToString() + b"".join(b"\x2a" + protobuf_walk.encode_varint(len(c)) + c for c in contents)
    return b"\x0a\x04tiny\x2a" + protobuf_walk.encode_varint(len(fields)) + fields


@pytest.mark.parametrize(
    ("datatype", "contents", "message"),
    [
        ("BYTES", b"\x42\x80\x80\x10" + b"x" * 262_144, "input 'input': expected datatype FP32, got BYTES"),
        (
            "FP32",
            b"\x32\x08" + b"\0" * 8 + b"\x42\x80\x80\x10" + b"x" * 262_144,
            "input 'input': FP32 values go in contents.fp32_contents, not contents.bytes_contents",
        ),
        ("FP32", b"\x32\x80\x80\x10" + b"\0" * 262_144, "input 'input': cannot parse its contents"),
    ],
    ids=["BYTES for an FP32 input", "bytes_contents after fp32_contents", "contents protobuf cannot parse"],
)
def test_a_large_messages_input_contents_are_parsed_only_once_the_input_takes_them(
    one_at_a_time: Server, datatype: str, contents: bytes, message: str
) -> None:
    # Each ends in bytes protobuf cannot parse: parsed with the message, it would be refused as unparsable (as
    # 60 MB of empty BYTES elements for an FP32 input were parsed whole first: 0.65 s holding the GIL, 1.2 GB).
    tensor = pb.ModelInferRequest.InferInputTensor(name="input", datatype=datatype, shape=[2, 3, 8, 8])
    sent = one_input_message(tensor, [contents + b"\x0b"])
    assert len(sent) >= LARGE_BYTES
    with pytest.raises(DecodeError):
        pb.ModelInferRequest.FromString(sent)
    with Client(one_at_a_time) as client:
        answer = client.wait(client.call("ModelInfer", framed(sent)))
        assert answer.status == 3 and answer.headers["grpc-message"].startswith(message), answer.headers
        assert client.wait(client.call("ServerLive", LIVE)).status == 0


def test_a_large_messages_contents_sent_in_several_pieces_are_merged_as_protobuf_merges_them(
    one_at_a_time: Server, folder: Path
) -> None:
    x = images_batch(700)  # 538 KB of floats
    half = len(x.ravel()) // 2
    pieces = [pb.InferTensorContents(fp32_contents=part).SerializeToString()
              for part in (x.ravel()[:half].tolist(), x.ravel()[half:].tolist())]  # fmt: skip
    sent = one_input_message(pb.ModelInferRequest.InferInputTensor(name="input", datatype="FP32", shape=list(x.shape)),
                             pieces)  # fmt: skip
    assert list(pb.ModelInferRequest.FromString(sent).inputs[0].contents.fp32_contents) == x.ravel().tolist()
    with Client(one_at_a_time) as client:
        answer = client.wait(client.call("ModelInfer", framed(sent)))
    expected = reference(folder / "models" / "model.onnx", {"input": x})["logits"]
    assert answer.status == 0 and np.allclose(output(answer.body), expected, atol=1e-5)


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
