"""A binary request whose JSON header the server has seen before skips parsing it (layouts.py), and is answered and
refused exactly as the first was: what varies between such requests, the tensors' bytes, is checked every time.

Real servers on free local ports, real onnxruntime, tritonclient and raw HTTP."""

import json
from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import pytest
import tritonclient.http as triton
from serving_support import binary_body, binary_output, config, images_batch, reference, serving, text_model
from serving_support import trained_folder as make_trained_folder

from kiln_serving import Server, layouts, protocol


@pytest.fixture(scope="module")
def folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_trained_folder(tmp_path_factory.mktemp("served") / "tiny")


@pytest.fixture(scope="module")
def server(folder: Path) -> Iterator[Server]:
    with serving(config(folder)) as running:
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
    assert header in server.dataplane.layouts


def test_a_known_header_with_bad_tensor_bytes_is_refused_as_an_unknown_one_is(server: Server) -> None:
    x = images_batch(2, seed=4)
    body, header_length = binary_body(x)
    header = body[:header_length]
    assert post(server, body, header_length).status_code == 200
    assert header in server.dataplane.layouts
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


def test_layouts_are_bounded_and_forget_the_oldest_first() -> None:
    known = layouts.Layouts()
    found = layouts.Layout((("x", "FP32", (1,), 4),), (protocol.Wanted("y"),), None, 4)
    for i in range(layouts.MAX_LAYOUTS + 10):
        header = json.dumps({"id": str(i)}).encode()
        known.remember(header + b"\0" * 4, len(header), found)
    assert len(known) == layouts.MAX_LAYOUTS
    assert b'{"id": "0"}' not in known and json.dumps({"id": str(layouts.MAX_LAYOUTS + 9)}).encode() in known
    big = b" " * layouts.MAX_HEADER_BYTES + b"{}"
    known.remember(big + b"\0" * 4, len(big), found)
    assert big not in known
    assert known.get(b'{"id": "20"}\0\0\0\0', 12) is found
    assert known.get(b'{"id": "20"}\0\0\0', 12) is None  # the binary section is not the length it said
