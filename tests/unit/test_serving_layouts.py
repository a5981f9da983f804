"""A request whose description (an HTTP request's JSON header before binary tensors, a gRPC ModelInferRequest less
its raw_input_contents) the server has seen before skips parsing and checking it (layouts.py), and is answered
and refused exactly as the first was: what varies between such requests, the tensors' bytes, is checked every
time.

Real servers on free local ports, real onnxruntime, tritonclient (HTTP and gRPC), raw HTTP and raw gRPC messages."""

import json
from collections.abc import Iterator
from pathlib import Path

import grpc
import httpx
import numpy as np
import pytest
import tritonclient.grpc as triton_grpc
import tritonclient.http as triton
from serving_support import binary_body, binary_output, config, images_batch, reference, serving, text_model
from serving_support import trained_folder as make_trained_folder
from tritonclient.grpc import service_pb2 as pb

from kiln_cluster.controlplane import free_port
from kiln_serving import Server, layouts, protocol


@pytest.fixture(scope="module")
def folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_trained_folder(tmp_path_factory.mktemp("served") / "tiny")


@pytest.fixture(scope="module")
def server(folder: Path) -> Iterator[Server]:
    with serving(config(folder, grpc_port=free_port())) as running:
        yield running


def post(server: Server, body: bytes, header_length: int) -> httpx.Response:
    return httpx.post(f"{server.url}/v2/models/tiny/infer", content=body,
                      headers={"Inference-Header-Content-Length": str(header_length)})  # fmt: skip


def with_header(header: bytes, x: np.ndarray) -> tuple[bytes, int]:
    return header + x.astype("<f4").tobytes(), len(header)


def test_a_repeated_header_answers_each_request_from_its_own_tensors(server: Server, folder: Path) -> None:
    first = images_batch(2, seed=1)
    body, header_length = binary_body(first)
    header = body[:header_length]
    model = folder / "models" / "model.onnx"
    for seed in (1, 2, 3):  # the first parses the header, the others find it
        x = images_batch(2, seed=seed)
        answer = post(server, *with_header(header, x))
        assert answer.status_code == 200, answer.text
        header_size = int(answer.headers["inference-header-content-length"])
        np.testing.assert_allclose(binary_output(answer.content, header_size), reference(model, {"input": x})["logits"],
                                   rtol=1e-5, atol=1e-5)  # fmt: skip
    assert layouts.JSON + header in server.dataplane.layouts


def test_a_known_header_with_bad_tensor_bytes_is_refused_as_an_unknown_one_is(server: Server) -> None:
    x = images_batch(2, seed=4)
    body, header_length = binary_body(x)
    header = body[:header_length]
    assert post(server, body, header_length).status_code == 200
    assert layouts.JSON + header in server.dataplane.layouts
    bad = x.copy()
    bad[1, 0, 0, 0] = np.nan
    nan = post(server, *with_header(header, bad))
    assert nan.status_code == 400
    assert "input 'input' contains NaN or infinite values" in nan.json()["error"]
    short = post(server, body[:-4], header_length)
    assert short.status_code == 400
    size = len(body) - header_length
    assert f"binary_data_size {size} runs past the end of the body ({size - 4} bytes left)" in short.json()["error"]
    long = post(server, body + b"\0\0\0\0", header_length)
    assert long.status_code == 400
    assert "4 bytes of binary data after the last input's binary_data_size" in long.json()["error"]


def test_each_request_id_is_echoed_and_json_data_is_parsed_every_time(server: Server) -> None:
    x = images_batch(1, seed=5)
    for request_id in ("a", "a", "b"):
        tensor = triton.InferInput("input", list(x.shape), "FP32")
        tensor.set_data_from_numpy(x)
        result = triton.InferenceServerClient(server.address).infer("tiny", [tensor], request_id=request_id)
        assert result.get_response()["id"] == request_id
    seen = len(server.dataplane.layouts)
    text = json.dumps({"inputs": [{"name": "input", "shape": list(x.shape), "datatype": "FP32",
                                   "data": x.ravel().tolist()}]}).encode()  # fmt: skip
    for _ in range(2):
        answer = post(server, text, len(text))
        assert answer.status_code == 200, answer.text
    assert len(server.dataplane.layouts) == seen  # a header holding its tensors is not remembered


def test_a_known_header_of_a_text_input_checks_each_requests_strings(tmp_path: Path) -> None:
    def body(values: list[bytes]) -> tuple[bytes, int]:
        raw = b"".join(len(v).to_bytes(4, "little") + v for v in values)
        header = json.dumps({"inputs": [{"name": "text", "shape": [len(values)], "datatype": "BYTES",
                                         "parameters": {"binary_data_size": len(raw)}}]}).encode()  # fmt: skip
        return header + raw, len(header)

    with serving(config(text_model(tmp_path / "text" / "model.onnx").parent)) as running:
        url = f"{running.url}/v2/models/text/infer"
        for values, status, expected in (([b"1.5", b"2.5"], 200, [1.5, 2.5]), ([b"3.5", b"4.5"], 200, [3.5, 4.5]),
                                         ([b"3.5", b"\xff\xfe"], 400, None)):  # fmt: skip
            content, header_length = body(values)
            answer = httpx.post(url, content=content, headers={"Inference-Header-Content-Length": str(header_length)})
            assert answer.status_code == status, answer.text
            if expected is None:
                assert "input 'text': BYTES element 1: not valid UTF-8" in answer.json()["error"]
            else:
                assert answer.json()["outputs"][0]["data"] == expected
        assert len(running.dataplane.layouts) == 1


def grpc_call(server: Server, message: bytes) -> pb.ModelInferResponse:
    """A ModelInferRequest sent as the bytes given (as a client that writes its fields in another order would)."""
    with grpc.insecure_channel(server.grpc_address) as channel:
        infer = channel.unary_unary("/inference.GRPCInferenceService/ModelInfer", request_serializer=lambda m: m,
                                    response_deserializer=pb.ModelInferResponse.FromString)  # fmt: skip
        return infer(message, timeout=60)


def grpc_request(x: np.ndarray, raw: bytes | None = None) -> pb.ModelInferRequest:
    request = pb.ModelInferRequest(model_name="tiny", raw_input_contents=[x.tobytes() if raw is None else raw])
    request.inputs.add(name="input", datatype="FP32", shape=list(x.shape))
    request.outputs.add(name="logits")
    return request


def logits(response: pb.ModelInferResponse) -> np.ndarray:
    return np.frombuffer(response.raw_output_contents[0], "<f4").reshape(list(response.outputs[0].shape))


def test_a_repeated_grpc_description_answers_each_call_from_its_own_raw_contents(server: Server, folder: Path) -> None:
    model, seen = folder / "models" / "model.onnx", len(server.dataplane.layouts)
    client = triton_grpc.InferenceServerClient(server.grpc_address)
    for seed in (6, 7, 8):
        x = images_batch(3, seed=seed)
        tensor = triton_grpc.InferInput("input", list(x.shape), "FP32")
        tensor.set_data_from_numpy(x)
        result = client.infer("tiny", [tensor], outputs=[triton_grpc.InferRequestedOutput("logits")])
        np.testing.assert_allclose(result.as_numpy("logits"), reference(model, {"input": x})["logits"],
                                   rtol=1e-5, atol=1e-5)  # fmt: skip
    assert len(server.dataplane.layouts) == seen + 1
    x = images_batch(3, seed=9)
    np.testing.assert_allclose(logits(grpc_call(server, grpc_request(x).SerializeToString())),
                               reference(model, {"input": x})["logits"], rtol=1e-5, atol=1e-5)  # fmt: skip
    bad = x.copy()
    bad[2, 1, 0, 0] = np.inf
    with pytest.raises(grpc.RpcError) as nan:
        grpc_call(server, grpc_request(bad).SerializeToString())
    assert nan.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "input 'input' contains NaN or infinite values" in str(nan.value.details())
    with pytest.raises(grpc.RpcError) as short:  # the same description, a row's bytes short
        grpc_call(server, grpc_request(x, x[:2].tobytes()).SerializeToString())
    assert short.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert f"needs {x.nbytes} bytes, got {x[:2].nbytes}" in str(short.value.details())


def test_a_grpc_message_with_its_raw_contents_first_is_answered_and_not_remembered(
    server: Server, folder: Path
) -> None:
    seen = len(server.dataplane.layouts)
    for seed in (10, 11):
        x = images_batch(1, seed=seed)
        described = grpc_request(x)
        described.ClearField("raw_input_contents")
        raw_first = pb.ModelInferRequest(raw_input_contents=[x.tobytes()]).SerializeToString()
        message = raw_first + described.SerializeToString()
        np.testing.assert_allclose(logits(grpc_call(server, message)),
                                   reference(folder / "models" / "model.onnx", {"input": x})["logits"],
                                   rtol=1e-5, atol=1e-5)  # fmt: skip
    assert len(server.dataplane.layouts) == seen


def test_layouts_are_bounded_and_forget_the_oldest_first() -> None:
    known = layouts.Layouts()
    found = layouts.Layout((("x", "FP32", (1,), 4),), (protocol.Wanted("y"),), None)
    for i in range(layouts.MAX_LAYOUTS + 10):
        known.remember(json.dumps({"id": str(i)}).encode(), found)
    assert len(known) == layouts.MAX_LAYOUTS
    assert b'{"id": "0"}' not in known and json.dumps({"id": str(layouts.MAX_LAYOUTS + 9)}).encode() in known
    big = b" " * layouts.MAX_KEY_BYTES + b"{}"
    known.remember(big, found)
    assert big not in known
    assert known.get(b'{"id": "20"}') is found
    assert found.split(memoryview(b"\0" * 4)) and not found.split(memoryview(b"\0" * 3))
    assert not found.split(memoryview(b"\0" * 5))  # the binary section is not the length it said
