"""The server speaks the Open Inference Protocol the way tritonclient and KServe clients expect.

Every test talks HTTP to a real uvicorn server on a free local port, running real onnxruntime.
"""

import json
from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import pytest
import tritonclient.http as triton
from prometheus_client.parser import text_string_to_metric_families
from serving_support import (
    CLASSES,
    DATATYPES,
    SIZE,
    all_datatypes,
    config,
    images_batch,
    labelled,
    png,
    reference,
    serving,
    shape_of,
)
from serving_support import trained_folder as make_trained_folder

from kiln_serving import Server, images


@pytest.fixture(scope="module")
def folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_trained_folder(tmp_path_factory.mktemp("served") / "tiny")


@pytest.fixture(scope="module")
def server(folder: Path) -> Iterator[Server]:
    with serving(config(folder)) as running:
        yield running


@pytest.fixture(scope="module")
def client(server: Server) -> triton.InferenceServerClient:
    return triton.InferenceServerClient(server.address)


def fp32_model(folder: Path) -> Path:
    return folder / "models" / "model.onnx"


def test_tritonclient_sees_the_server_live_and_ready_and_its_metadata(client: triton.InferenceServerClient) -> None:
    assert client.is_server_live()
    assert client.is_server_ready()
    assert client.is_model_ready("tiny")
    assert client.is_model_ready("tiny", "1")
    meta = client.get_server_metadata()
    assert meta["name"] == "kiln"
    assert "binary_tensor_data" in meta["extensions"]


def test_model_metadata_gives_platform_versions_tensors_with_dynamic_dims_and_the_provider(
    client: triton.InferenceServerClient,
) -> None:
    for meta in (client.get_model_metadata("tiny"), client.get_model_metadata("tiny", "1")):
        assert meta["name"] == "tiny"
        assert meta["platform"] == "onnxruntime_onnx"
        assert meta["versions"] == ["1"]
        assert meta["inputs"] == [{"name": "input", "datatype": "FP32", "shape": [-1, 3, SIZE, SIZE]}]
        assert meta["outputs"] == [{"name": "logits", "datatype": "FP32", "shape": [-1, len(CLASSES)]}]
        assert meta["parameters"]["provider"] == "CPUExecutionProvider"
        assert meta["parameters"]["variant"] == "fp32"


def test_binary_inference_as_tritonclient_sends_by_default_matches_in_process_onnxruntime(
    client: triton.InferenceServerClient, folder: Path
) -> None:
    x = images_batch(3, seed=1)
    tensor = triton.InferInput("input", list(x.shape), "FP32")
    tensor.set_data_from_numpy(x)
    result = client.infer("tiny", [tensor])
    expected = reference(fp32_model(folder), {"input": x})["logits"]
    assert np.abs(result.as_numpy("logits") - expected).max() <= 1e-5


def test_a_large_binary_request_with_an_odd_header_length_is_read_in_place_correctly(
    server: Server, folder: Path
) -> None:
    # Over 64 KB arrives in several chunks; a header length that is not a multiple of 4 misaligns the tensor
    # in the body, which the server's buffer placement (or, failing that, a copy) must make up for.
    x = images_batch(-(-200_000 // (3 * SIZE * SIZE * 4)), seed=11)
    raw = x.astype("<f4").tobytes()
    tensor = {"name": "input", "shape": list(x.shape), "datatype": "FP32", "parameters": {"binary_data_size": len(raw)}}
    header = b""
    for pad in range(4):
        header = json.dumps({"id": "x" * pad, "inputs": [tensor]}).encode()
        if len(header) % 4 == 1:
            break
    response = httpx.post(
        f"{server.url}/v2/models/tiny/infer",
        content=header + raw,
        headers={"Inference-Header-Content-Length": str(len(header)), "Content-Type": "application/octet-stream"},
    )
    assert response.status_code == 200, response.text
    got = np.asarray(response.json()["outputs"][0]["data"], dtype=np.float32).reshape(len(x), len(CLASSES))
    expected = reference(fp32_model(folder), {"input": x})["logits"]
    assert np.abs(got - expected).max() <= 1e-5


def test_json_inference_echoes_the_request_id_and_matches_in_process_onnxruntime(
    client: triton.InferenceServerClient, folder: Path
) -> None:
    x = images_batch(2, seed=2)
    tensor = triton.InferInput("input", list(x.shape), "FP32")
    tensor.set_data_from_numpy(x, binary_data=False)
    wanted = [triton.InferRequestedOutput("logits", binary_data=False)]
    result = client.infer("tiny", [tensor], outputs=wanted, request_id="42", model_version="1")
    response = result.get_response()
    assert response["id"] == "42"
    assert response["model_name"] == "tiny" and response["model_version"] == "1"
    assert "data" in response["outputs"][0]
    expected = reference(fp32_model(folder), {"input": x})["logits"]
    assert np.abs(result.as_numpy("logits") - expected).max() <= 1e-5


def test_nested_json_data_is_read_row_major_like_flat_data(server: Server) -> None:
    x = images_batch(1, seed=3)
    bodies = [{"inputs": [{"name": "input", "shape": list(x.shape), "datatype": "FP32", "data": data}]}
              for data in (x.tolist(), x.reshape(-1).tolist())]  # fmt: skip
    nested, flat = (httpx.post(f"{server.url}/v2/models/tiny/infer", json=b).json() for b in bodies)
    assert nested["outputs"] == flat["outputs"]
    assert nested["outputs"][0]["shape"] == [1, len(CLASSES)]


def test_gzip_compressed_requests_are_inflated(client: triton.InferenceServerClient, folder: Path) -> None:
    x = images_batch(2, seed=4)
    tensor = triton.InferInput("input", list(x.shape), "FP32")
    tensor.set_data_from_numpy(x)
    result = client.infer("tiny", [tensor], request_compression_algorithm="gzip")
    expected = reference(fp32_model(folder), {"input": x})["logits"]
    assert np.abs(result.as_numpy("logits") - expected).max() <= 1e-5


@pytest.mark.parametrize("rows", [2, 40_000], ids=["small", "arrays over 64 KiB of JSON, parsed in slices"])
def test_every_datatype_round_trips_as_json_and_as_binary_and_only_requested_outputs_come_back(
    tmp_path: Path, rows: int
) -> None:
    model = all_datatypes(tmp_path / "types" / "model.onnx")
    rng = np.random.default_rng(0)
    arrays = {t: (rng.integers(0, 2, size=(rows, 3)).astype(bool) if t == "BOOL" else
                  (rng.normal(size=(rows, 3)) * 50).astype(triton.triton_to_np_dtype(t)) if t.startswith("FP") else
                  rng.integers(0, 100, size=(rows, 3)).astype(triton.triton_to_np_dtype(t)))
              for t in DATATYPES}  # fmt: skip
    with serving(config(model.parent)) as server:
        client = triton.InferenceServerClient(server.address)
        for as_binary in (True, False):
            inputs = []
            for t, array in arrays.items():
                tensor = triton.InferInput(f"in_{t}", list(array.shape), t)
                tensor.set_data_from_numpy(array, binary_data=as_binary or t == "FP16")
                inputs.append(tensor)
            wanted = [triton.InferRequestedOutput(f"out_{t}", binary_data=as_binary) for t in ("INT8", "FP64")]
            result = client.infer("types", inputs, outputs=wanted)
            assert [o["name"] for o in result.get_response()["outputs"]] == ["out_INT8", "out_FP64"]
            assert np.array_equal(result.as_numpy("out_INT8"), arrays["INT8"])
            assert np.array_equal(result.as_numpy("out_FP64"), arrays["FP64"])
            everything = client.infer("types", inputs)
            for t, array in arrays.items():
                out = everything.as_numpy(f"out_{t}")
                assert out.dtype == array.dtype and np.array_equal(out, array), t


# (datatype, JSON data of 3 values, a part of the 400's message): what numpy alone would have cast silently.
REFUSED_JSON = [
    ("INT32", [1, 1.5, 2], "INT32 data holds 1.5; it takes integers"),
    ("INT8", [1.0, 2, 3], "INT8 data holds 1.0; it takes integers"),
    ("UINT64", [1e3, 2, 3], "UINT64 data holds 1000.0; it takes integers"),
    ("INT64", ["7", 2, 3], "INT64 data holds a string; it takes integers"),
    ("INT16", [True, 2, 3], "INT16 data holds true; it takes integers"),
    ("UINT8", [1, 2, 256], "is not a list of UINT8 values"),
    ("BOOL", [1, 0, 1], "BOOL data holds 1; it takes true or false"),
    ("BOOL", [True, "no", False], "BOOL data holds a string; it takes true or false"),
    ("FP32", [1.5, None, 2], "FP32 data holds null; it takes numbers"),
    ("FP64", [False, 1, 2], "FP64 data holds false; it takes numbers"),
    ("FP32", [[1.5], [2, "3"]], "FP32 data holds a string; it takes numbers"),
    ("FP32", [1.5, 1e39, 2], "'data' holds a value out of FP32's range"),
]


def test_json_values_a_datatype_does_not_take_are_refused_as_triton_refuses_them(tmp_path: Path) -> None:
    datatypes = ["BOOL", "UINT8", "UINT64", "INT8", "INT16", "INT32", "INT64", "FP32", "FP64"]
    model = all_datatypes(tmp_path / "types" / "model.onnx", datatypes)
    accepted = {"BOOL": [True, False, True], "FP32": [1, 2.5, -3], "FP64": [0, 1e300, -2]}
    body = [{"name": f"in_{t}", "shape": [1, 3], "datatype": t, "data": accepted.get(t, [1, 2, 3])} for t in datatypes]
    with serving(config(model.parent)) as server:
        answer = httpx.post(f"{server.url}/v2/models/types/infer", json={"inputs": body})
        assert answer.status_code == 200, answer.text
        outputs = {o["name"]: o["data"] for o in answer.json()["outputs"]}
        assert outputs["out_FP32"] == [1, 2.5, -3] and outputs["out_BOOL"] == [True, False, True]
        for datatype, data, message in REFUSED_JSON:
            tensor = {"name": f"in_{datatype}", "shape": [1, 3], "datatype": datatype, "data": data}
            bad = [tensor if item["name"] == tensor["name"] else item for item in body]
            answer = httpx.post(f"{server.url}/v2/models/types/infer", json={"inputs": bad})
            assert answer.status_code == 400 and message in answer.json()["error"], (datatype, data, answer.text)


def test_irregularly_nested_data_is_read_in_document_order_small_or_large_as_triton_reads_it(server: Server) -> None:
    # Triton flattens JSON data whatever its nesting, and so does kiln's fast path for numbers in large bodies: a
    # small body refused nesting the same body took at 64 KiB and more. Now both take it, and answer as to flat data.
    for n in (1, 200):
        flat = images_batch(n, seed=9).reshape(-1).tolist()
        ragged = [flat[:5], [flat[5:7], flat[7:100]], *flat[100:]]  # lists of unequal lengths beside numbers
        answers = []
        for data in (flat, ragged):
            body = {"inputs": [{"name": "input", "shape": [n, 3, SIZE, SIZE], "datatype": "FP32", "data": data}]}
            response = httpx.post(f"{server.url}/v2/models/tiny/infer", json=body)
            assert response.status_code == 200, response.text
            answers.append(response.json()["outputs"])
        assert answers[0] == answers[1] and len(answers[1][0]["data"]) == n * len(CLASSES)


def test_kserve_v1_predict_answers_one_prediction_per_instance(server: Server, folder: Path) -> None:
    x = images_batch(3, seed=5)
    assert httpx.get(f"{server.url}/v1/models/tiny").json() == {"name": "tiny", "ready": True}
    response = httpx.post(f"{server.url}/v1/models/tiny:predict", json={"instances": x.tolist()})
    assert response.status_code == 200
    predictions = np.asarray(response.json()["predictions"])
    expected = reference(fp32_model(folder), {"input": x})["logits"]
    assert predictions.shape == (3, len(CLASSES))
    assert np.abs(predictions - expected).max() <= 1e-5


def test_kserve_v1_predict_answers_an_object_per_instance_for_several_outputs_text_included(tmp_path: Path) -> None:
    # Two outputs, one of them text (BYTES): each prediction is an object of the outputs' rows, text as strings.
    model = labelled(tmp_path / "labelled" / "model.onnx")
    x = np.array([[1.5, -2.0, 0.25], [3.0, 4.0, 5.0]], dtype=np.float32)
    with serving(config(model.parent)) as running:
        response = httpx.post(f"{running.url}/v1/models/labelled:predict", json={"instances": x.tolist()})
    assert response.status_code == 200, response.text
    predictions = response.json()["predictions"]
    assert [p["value"] for p in predictions] == x.tolist()
    labels = [[float(v) for v in p["label"]] for p in predictions]  # onnxruntime's own number text, read back
    assert labels == x.tolist() and all(isinstance(v, str) for p in predictions for v in p["label"])


def test_kserve_v1_predict_refuses_to_answer_when_an_output_has_no_row_per_instance(tmp_path: Path) -> None:
    # Three instances, one output of two values: the rows cannot be told apart (was an IndexError's 500).
    model = shape_of(tmp_path / "shape" / "model.onnx")
    with serving(config(model.parent)) as running:
        response = httpx.post(f"{running.url}/v1/models/shape:predict", json={"instances": [[1.0, 2.0, 3.0]] * 3})
    assert response.status_code == 500
    assert response.json() == {
        "error": "model 'shape' answered outputs that do not have a row per instance: {'shape': [2]} for 3 instances"
    }


def test_classify_applies_the_cards_preprocessing_to_a_png_and_returns_top_k_softmax(
    server: Server, folder: Path
) -> None:
    from kiln import api

    image = png(seed=6)
    card = api.ModelCard.read(folder / "model-card.json")
    tensor = images.to_tensor(images.decode(image), card.preprocessing, np.dtype(np.float32))
    probabilities = images.softmax(reference(fp32_model(folder), {"input": tensor})["logits"][0])
    best = np.argsort(probabilities)[::-1][:3]

    raw = httpx.post(f"{server.url}/v2/models/tiny/classify?top_k=3", content=image).json()
    upload = httpx.post(f"{server.url}/v2/models/tiny/classify", params={"top_k": 3},
                        files={"file": ("cat.png", image, "image/png")}).json()  # fmt: skip
    other_field = httpx.post(f"{server.url}/v2/models/tiny/classify?top_k=3",
                             files={"picture": ("cat.png", image, "image/png")}).json()  # fmt: skip
    for answer in (raw, upload, other_field):
        predictions = answer["predictions"]
        assert [p["label"] for p in predictions] == [CLASSES[i] for i in best]
        assert [p["probability"] for p in predictions] == pytest.approx(probabilities[best].tolist(), abs=1e-6)
    default = httpx.post(f"{server.url}/v2/models/tiny/classify", content=image).json()
    assert len(default["predictions"]) == len(CLASSES)  # top 5 by default, all 5 classes here
    assert sum(p["probability"] for p in default["predictions"]) == pytest.approx(1.0)


def test_metrics_parse_as_prometheus_text_and_carry_the_documented_series(
    server: Server, client: triton.InferenceServerClient
) -> None:
    x = images_batch(4)
    tensor = triton.InferInput("input", list(x.shape), "FP32")
    tensor.set_data_from_numpy(x)
    client.infer("tiny", [tensor])
    with pytest.raises(triton.InferenceServerException):
        client.infer("tiny", [tensor], model_version="7")

    text = httpx.get(f"{server.url}/metrics").text
    samples = {(s.name, frozenset(s.labels.items())): s.value
               for family in text_string_to_metric_families(text) for s in family.samples}  # fmt: skip

    def value(name: str, **labels: str) -> float:
        return samples[(f"kiln_serving_{name}", frozenset({"model": "tiny", "version": "1", **labels}.items()))]

    assert value("requests_total", status="200") >= 1
    assert value("requests_total", model="", version="", status="404") >= 1  # unknown names get no label of their own
    for histogram in ("request_duration_seconds", "queue_duration_seconds", "compute_duration_seconds", "batch_size"):
        assert value(f"{histogram}_count") >= 1, histogram
    assert value("inferences_total") >= 4
    assert value("requests_in_flight") >= 0
    assert value("queue_depth") >= 0
    assert value("model_load_seconds") > 0
    assert value("model_ready") == 1
    assert value("model_provider_info", provider="CPUExecutionProvider") == 1
