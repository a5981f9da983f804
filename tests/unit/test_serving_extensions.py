"""Triton's and KServe's extras answer as those servers do: classification, statistics, raw binary requests,
GET / liveness; text models become ready; images of every common mode are scaled by their real range; and
every response is RFC 8259 JSON, also when outputs are NaN."""

import io
import json
from collections.abc import Iterator
from pathlib import Path

import grpc
import httpx
import numpy as np
import pytest
import tritonclient.grpc as triton_grpc
import tritonclient.http as triton
from PIL import Image
from serving_support import (
    CLASSES,
    SIZE,
    all_datatypes,
    binary_output,
    config,
    images_batch,
    labelled,
    reference,
    serving,
    statuses,
    text_model,
)
from serving_support import trained_folder as make_trained_folder
from tritonclient.grpc import service_pb2 as pb
from tritonclient.grpc import service_pb2_grpc as service_grpc
from tritonclient.utils import InferenceServerException

from kiln import api
from kiln_cluster.controlplane import free_port
from kiln_serving import Server, images
from kiln_serving.dataplane import LARGE_BYTES


@pytest.fixture(scope="module")
def folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_trained_folder(tmp_path_factory.mktemp("extensions") / "tiny")


@pytest.fixture(scope="module")
def server(folder: Path) -> Iterator[Server]:
    with serving(config(folder)) as running:
        yield running


def strict_json(text: str) -> object:
    """json.loads that refuses NaN and Infinity tokens, as RFC 8259 does."""

    def refuse(token: str) -> object:
        raise ValueError(f"{token} is not JSON")

    return json.loads(text, parse_constant=refuse)


def test_classification_extension_returns_tritons_score_index_label_strings(server: Server, folder: Path) -> None:
    x = images_batch(2, seed=21)
    tensor = triton.InferInput("input", list(x.shape), "FP32")
    tensor.set_data_from_numpy(x)
    client = triton.InferenceServerClient(server.address)
    logits = reference(folder / "models" / "model.onnx", {"input": x})["logits"]
    for as_binary in (True, False):
        wanted = [triton.InferRequestedOutput("logits", binary_data=as_binary, class_count=2)]
        got = client.infer("tiny", [tensor], outputs=wanted).as_numpy("logits")
        assert got.shape == (2, 2)
        for row in range(2):
            best = np.argsort(-logits[row])[:2]
            entries = [(v.decode() if isinstance(v, bytes) else v).split(":") for v in got[row]]
            assert [int(e[1]) for e in entries] == best.tolist()
            assert [e[2] for e in entries] == [CLASSES[i] for i in best]
            assert [float(e[0]) for e in entries] == pytest.approx(logits[row][best].tolist(), abs=1e-5)


def test_statistics_extension_counts_successes_and_executions(server: Server) -> None:
    client = triton.InferenceServerClient(server.address)
    x = images_batch(3, seed=22)
    tensor = triton.InferInput("input", list(x.shape), "FP32")
    tensor.set_data_from_numpy(x)
    before = client.get_inference_statistics("tiny")["model_stats"][0]
    client.infer("tiny", [tensor])
    after = client.get_inference_statistics("tiny")["model_stats"][0]
    assert after["name"] == "tiny" and after["version"] == "1"
    assert int(after["inference_stats"]["success"]["count"]) == int(before["inference_stats"]["success"]["count"]) + 1
    assert int(after["inference_count"]) == int(before["inference_count"]) + 3
    assert int(after["execution_count"]) >= int(before["execution_count"]) + 1
    assert "statistics" in client.get_server_metadata()["extensions"]
    assert httpx.get(f"{server.url}/v2/models/stats").json()["model_stats"][0]["name"] == "tiny"


def test_a_raw_binary_request_is_the_single_inputs_tensor_and_is_answered_binary(server: Server, folder: Path) -> None:
    # As Triton's L0_http test_raw_binary reads it: the answer's outputs are binary, after its JSON header.
    x = images_batch(3, seed=23)
    response = httpx.post(f"{server.url}/v2/models/tiny/infer", content=x.astype("<f4").tobytes(),
                          headers={"Inference-Header-Content-Length": "0"})  # fmt: skip
    assert response.status_code == 200, response.text
    out = binary_output(response.content, int(response.headers["Inference-Header-Content-Length"]))
    expected = reference(folder / "models" / "model.onnx", {"input": x})["logits"]
    assert out.shape == (3, len(CLASSES)) and np.abs(out - expected).max() <= 1e-5


def test_a_raw_binary_request_to_a_text_model_is_its_one_element(tmp_path: Path) -> None:
    # Triton's test_byte: the body is the one BYTES element; an input of more elements is refused, naming why.
    with serving(config(text_model(tmp_path / "text" / "model.onnx").parent)) as running:
        response = httpx.post(f"{running.url}/v2/models/text/infer", content=b"427",
                              headers={"Inference-Header-Content-Length": "0"})  # fmt: skip
    assert response.status_code == 200, response.text
    header_length = int(response.headers["Inference-Header-Content-Length"])
    assert np.frombuffer(response.content[header_length:], "<f4").tolist() == [427.0]
    with serving(config(text_model(tmp_path / "pairs" / "model.onnx", width=2).parent)) as running:
        response = httpx.post(f"{running.url}/v2/models/pairs/infer", content=b"427",
                              headers={"Inference-Header-Content-Length": "0"})  # fmt: skip
    assert response.status_code == 400
    assert response.json()["error"] == ("a raw binary request for a BYTES input is its one element (under 4 GiB); "
                                        "'text' is BYTES [-1,2]: send a JSON header")  # fmt: skip


def test_text_no_utf8_can_carry_is_refused_as_bytes_that_are_not_utf8_are(tmp_path: Path) -> None:
    # A JSON string may hold a lone surrogate (the escape \ud800): onnxruntime failed on it, a 500.
    with serving(config(text_model(tmp_path / "text" / "model.onnx").parent)) as running:
        for path, body in (("v2/models/text/infer", {"inputs": [{"name": "text", "datatype": "BYTES", "shape": [2],
                                                                 "data": ["fine", "\ud800"]}]}),
                           ("v1/models/text:predict", {"instances": ["\udfff"]})):  # fmt: skip
            response = httpx.post(f"{running.url}/{path}", content=json.dumps(body).encode(),
                                  headers={"content-type": "application/json"})  # fmt: skip
            assert response.status_code == 400, response.text
            assert "not valid Unicode text (a lone surrogate)" in response.json()["error"]
        assert statuses(running, "text").get("500", 0.0) == 0.0


def test_classification_ranks_integers_and_batch_rows_as_triton_and_refuses_text_outputs(tmp_path: Path) -> None:
    with serving(config(all_datatypes(tmp_path / "ints" / "model.onnx", ["INT32"]).parent)) as running:
        client = triton.InferenceServerClient(running.address)
        tensor = triton.InferInput("in_INT32", [2, 3], "INT32")
        tensor.set_data_from_numpy(np.array([[5, 1, 9], [-2, 7, 0]], dtype=np.int32))
        wanted = [triton.InferRequestedOutput("out_INT32", binary_data=False, class_count=2)]
        got = client.infer("ints", [tensor], outputs=wanted).as_numpy("out_INT32")
    assert got.tolist() == [["9:2", "5:0"], ["7:1", "0:2"]]  # an integer score as itself, not 9.000000
    with serving(config(text_model(tmp_path / "text" / "model.onnx").parent)) as running:
        client = triton.InferenceServerClient(running.address)
        tensor = triton.InferInput("text", [3], "BYTES")
        tensor.set_data_from_numpy(np.array([b"1.5", b"-2", b"8"], dtype=np.object_))
        wanted = [triton.InferRequestedOutput("value", binary_data=False, class_count=3)]
        got = client.infer("text", [tensor], outputs=wanted).as_numpy("value")
    assert got.tolist() == [["1.500000:0"], ["-2.000000:0"], ["8.000000:0"]]  # each batch row ranked alone
    with serving(config(labelled(tmp_path / "labelled" / "model.onnx").parent, grpc_port=free_port())) as running:
        body = {"inputs": [{"name": "x", "datatype": "FP32", "shape": [1, 3], "data": [1, 2, 3]}],
                "outputs": [{"name": "label", "parameters": {"classification": 2}}]}  # fmt: skip
        response = httpx.post(f"{running.url}/v2/models/labelled/infer", json=body)
        tensor = triton_grpc.InferInput("x", [1, 3], "FP32")
        tensor.set_data_from_numpy(np.array([[1, 2, 3]], dtype=np.float32))
        with pytest.raises(InferenceServerException) as refused:
            triton_grpc.InferenceServerClient(running.grpc_address).infer(
                "labelled", [tensor], outputs=[triton_grpc.InferRequestedOutput("label", class_count=2)]
            )
        assert statuses(running, "labelled").get("500", 0.0) == 0.0
    assert response.status_code == 400
    assert response.json()["error"].startswith("output 'label': class result not available for its type 'BYTES'")
    assert refused.value.status() == "StatusCode.INVALID_ARGUMENT" and "'BYTES'" in str(refused.value.message())


def test_get_root_answers_kserve_liveness(server: Server) -> None:
    response = httpx.get(f"{server.url}/")
    assert response.status_code == 200 and response.json() == {"status": "alive"}


def test_non_finite_inputs_are_accepted_with_the_flag_and_answered_in_valid_json(tmp_path: Path) -> None:
    model = all_datatypes(tmp_path / "types" / "model.onnx")
    with serving(config(model.parent, allow_non_finite=True)) as running:
        inputs = []
        for t in ("FP32", "FP64"):
            x = np.array([[np.nan, np.inf, 1.5]] * 2, dtype=triton.triton_to_np_dtype(t))
            tensor = triton.InferInput(f"in_{t}", list(x.shape), t)
            tensor.set_data_from_numpy(x)
            inputs.append(tensor)
        for t in ("BOOL", "UINT8", "UINT16", "UINT32", "UINT64", "INT8", "INT16", "INT32", "INT64", "FP16"):
            x = np.zeros((2, 3), dtype=triton.triton_to_np_dtype(t))
            tensor = triton.InferInput(f"in_{t}", list(x.shape), t)
            tensor.set_data_from_numpy(x)
            inputs.append(tensor)
        body = {"inputs": [{"name": i.name(), "shape": i.shape(), "datatype": i.datatype(),
                            "parameters": {"binary_data_size": len(i._get_binary_data())}} for i in inputs],
                "outputs": [{"name": "out_FP32"}, {"name": "out_FP64"}]}  # fmt: skip
        head = json.dumps(body).encode()
        response = httpx.post(f"{running.url}/v2/models/types/infer",
                              content=head + b"".join(i._get_binary_data() for i in inputs),
                              headers={"Inference-Header-Content-Length": str(len(head))})  # fmt: skip
        assert response.status_code == 200, response.text
        answer = strict_json(response.text)
        assert isinstance(answer, dict)
        assert [o["data"][:3] for o in answer["outputs"]] == [[None, None, 1.5]] * 2


def test_a_text_model_becomes_ready_and_reads_its_bytes_input(tmp_path: Path) -> None:
    model = text_model(tmp_path / "text" / "model.onnx")
    with serving(config(model.parent, grpc_port=free_port())) as running:
        client = triton.InferenceServerClient(running.address)
        assert client.is_model_ready("text")
        tensor = triton.InferInput("text", [2], "BYTES")
        tensor.set_data_from_numpy(np.array([b"1.5", b"-2"], dtype=np.object_))
        assert client.infer("text", [tensor]).as_numpy("value").tolist() == [1.5, -2.0]
        # Over gRPC as bytes_contents, in a message large enough that its contents are lifted out unparsed until
        # the input is known to take BYTES (grpc_tensors._contents).
        values = [f"{i % 1000}.5".encode() for i in range(60_000)]
        request = pb.ModelInferRequest(model_name="text")
        request.inputs.add(name="text", datatype="BYTES", shape=[len(values)]).contents.bytes_contents.extend(values)
        assert request.ByteSize() > LARGE_BYTES
        with grpc.insecure_channel(running.grpc_address) as channel:
            answer = service_grpc.GRPCInferenceServiceStub(channel).ModelInfer(request)
        assert np.frombuffer(answer.raw_output_contents[0], np.float32).tolist() == [float(v) for v in values]


def encoded(image: Image.Image, fmt: str = "PNG") -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt)
    return buffer.getvalue()


PRE = api.Preprocessing(image_size=SIZE, mean=[0.5, 0.5, 0.5], std=[0.25, 0.25, 0.25])


def tensor_of(data: bytes) -> np.ndarray:
    return images.to_tensor(images.decode(data), PRE, np.dtype(np.float32))


def test_sixteen_bit_palette_cmyk_alpha_and_grey_images_scale_like_their_8_bit_rgb_twin() -> None:
    rgb = np.random.default_rng(0).integers(0, 256, size=(SIZE, SIZE, 3), dtype=np.uint8)
    grey = rgb[:, :, 0]
    expected_rgb = tensor_of(encoded(Image.fromarray(rgb)))
    expected_grey = tensor_of(encoded(Image.fromarray(grey)))
    wide = Image.fromarray(grey.astype(np.uint16) * 257)  # the same greys over the full 16-bit range
    assert wide.mode.startswith("I;16")
    cases = {
        "16-bit grey": (encoded(wide), expected_grey),
        "palette": (encoded(Image.fromarray(rgb).quantize(256, method=Image.Quantize.FASTOCTREE)), None),
        "alpha": (encoded(Image.fromarray(np.dstack([rgb, np.full(grey.shape, 255, np.uint8)]))), expected_rgb),
        "grey and alpha": (encoded(Image.fromarray(grey).convert("LA")), expected_grey),
        "cmyk jpeg": (encoded(Image.fromarray(rgb).convert("CMYK"), "JPEG"), None),
    }
    for case, (data, expected) in cases.items():
        got = tensor_of(data)
        assert got.shape == (1, 3, SIZE, SIZE), case
        # Palette and JPEG are lossy; every case must stay near its twin, not jump to white or black.
        tolerance = 0.02 if expected is not None else 0.6
        assert np.abs(got - (expected if expected is not None else expected_rgb)).mean() <= tolerance, case


def test_classify_sees_a_mid_grey_16_bit_png_as_mid_grey(server: Server) -> None:
    grey16 = encoded(Image.fromarray(np.full((SIZE, SIZE), 32768, dtype=np.uint16)))
    grey8 = encoded(Image.fromarray(np.full((SIZE, SIZE), 128, dtype=np.uint8)))
    wide, narrow = (httpx.post(f"{server.url}/v2/models/tiny/classify", content=b).json() for b in (grey16, grey8))
    assert [p["label"] for p in wide["predictions"]] == [p["label"] for p in narrow["predictions"]]
    for a, b in zip(wide["predictions"], narrow["predictions"], strict=True):
        assert a["probability"] == pytest.approx(b["probability"], abs=0.02)
