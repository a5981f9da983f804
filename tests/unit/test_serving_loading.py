"""What gets loaded and when the server says it is ready: card variants, plain ONNX files, sha256, providers."""

import shutil
from pathlib import Path

import httpx
import numpy as np
import onnxruntime as ort
import pytest
import tritonclient.http as triton
from serving_support import classifier, config, images_batch, png, reference, serving, trained_folder

from kiln import api
from kiln.api import constants
from kiln_serving import Server


def infer(server: Server, name: str, x: np.ndarray) -> np.ndarray:
    client = triton.InferenceServerClient(server.address)
    tensor = triton.InferInput("input", list(x.shape), "FP32")
    tensor.set_data_from_numpy(x)
    result: np.ndarray = client.infer(name, [tensor]).as_numpy("logits")
    return result


def test_a_model_whose_sha256_does_not_match_its_card_is_live_but_never_ready(tmp_path: Path) -> None:
    folder = trained_folder(tmp_path / "tiny")
    # Swap in another valid model: onnxruntime would load it happily; only the digest tells.
    shutil.copy(folder / "models" / "model.alt.onnx", folder / "models" / "model.onnx")
    with serving(config(folder)) as server:
        assert httpx.get(f"{server.url}/v2/health/live").status_code == 200
        ready = httpx.get(f"{server.url}/v2/health/ready")
        assert ready.status_code == 503
        assert "sha256 mismatch" in ready.json()["error"]
        assert "refusing to serve a corrupted or replaced model" in ready.json()["error"]
        assert httpx.get(f"{server.url}/v2/models/tiny/ready").status_code == 503
        attempt = httpx.post(f"{server.url}/v2/models/tiny/infer", json={"inputs": []})
        assert attempt.status_code == 503
        assert "sha256 mismatch" in attempt.json()["error"]
        assert 'kiln_serving_model_ready{model="tiny",version="1"} 0.0' in httpx.get(f"{server.url}/metrics").text


def test_a_plain_model_onnx_without_a_card_is_served_under_its_folders_name(tmp_path: Path) -> None:
    model = classifier(tmp_path / "my-model" / "model.onnx", seed=3)
    x = images_batch(2)
    with serving(config(model.parent)) as server:
        client = triton.InferenceServerClient(server.address)
        assert client.is_model_ready("my-model")
        assert "variant" not in client.get_model_metadata("my-model")["parameters"]
        assert np.abs(infer(server, "my-model", x) - reference(model, {"input": x})["logits"]).max() <= 1e-5
        classify = httpx.post(f"{server.url}/v2/models/my-model/classify", content=png())
        assert classify.status_code == 400
        assert "classify needs a model card" in classify.json()["error"]


def test_model_name_flag_renames_the_model_and_any_single_onnx_file_is_found(tmp_path: Path) -> None:
    classifier(tmp_path / "folder" / "exported-by-someone.onnx")
    with serving(config(tmp_path / "folder", model_name="resnet")) as server:
        assert triton.InferenceServerClient(server.address).is_model_ready("resnet")
        assert httpx.get(f"{server.url}/v2/models/folder").status_code == 404


def test_a_folder_without_any_model_is_live_and_not_ready_with_the_reason(tmp_path: Path) -> None:
    (tmp_path / "empty").mkdir()
    with serving(config(tmp_path / "empty")) as server:
        assert httpx.get(f"{server.url}/v2/health/live").status_code == 200
        ready = httpx.get(f"{server.url}/v2/health/ready")
        assert ready.status_code == 503
        assert "no model-card.json and no single ONNX file to serve" in ready.json()["error"]


def test_variant_flag_serves_that_variant_and_an_unknown_one_names_those_that_exist(tmp_path: Path) -> None:
    folder = trained_folder(tmp_path / "tiny")
    x = images_batch(2)
    with serving(config(folder, variant="int8-static")) as server:
        expected = reference(folder / "models" / "model.alt.onnx", {"input": x})["logits"]
        assert np.abs(infer(server, "tiny", x) - expected).max() <= 1e-5
        assert httpx.get(f"{server.url}/v2/models/tiny").json()["parameters"]["variant"] == "int8-static"
    with serving(config(folder, variant="fp16")) as server:
        ready = httpx.get(f"{server.url}/v2/health/ready")
        assert ready.status_code == 503
        assert "variant 'fp16' not in model card (have: fp32, int8-static)" in ready.json()["error"]


def test_use_optimized_serves_the_cards_optimized_graph_after_verifying_the_variant(tmp_path: Path) -> None:
    folder = trained_folder(tmp_path / "tiny")
    with serving(config(folder, use_optimized=True)) as server:
        meta = httpx.get(f"{server.url}/v2/models/tiny").json()
        assert meta["parameters"]["file"] == "model.optimized.onnx"
        assert meta["parameters"]["variant"] == "fp32"


@pytest.mark.skipif("CUDAExecutionProvider" in ort.get_available_providers(), reason="a CUDA build is installed")
def test_asking_for_cuda_on_a_cpu_only_build_is_not_ready_unless_cpu_fallback_is_allowed(tmp_path: Path) -> None:
    folder = trained_folder(tmp_path / "tiny")
    with serving(config(folder, providers=("CUDAExecutionProvider", "CPUExecutionProvider"))) as server:
        assert httpx.get(f"{server.url}/v2/health/live").status_code == 200
        ready = httpx.get(f"{server.url}/v2/health/ready")
        assert ready.status_code == 503
        assert "requested CUDAExecutionProvider but the session runs on CPUExecutionProvider" in ready.json()["error"]
        assert "--allow-cpu-fallback" in ready.json()["error"]
    with serving(config(folder, providers=("CUDAExecutionProvider",), allow_cpu_fallback=True)) as server:
        assert httpx.get(f"{server.url}/v2/health/ready").status_code == 200
        assert httpx.get(f"{server.url}/v2/models/tiny").json()["parameters"]["provider"] == "CPUExecutionProvider"
        assert 'provider="CPUExecutionProvider"' in httpx.get(f"{server.url}/metrics").text


def test_without_a_variant_flag_the_cards_selected_variant_is_served(tmp_path: Path) -> None:
    folder = trained_folder(tmp_path / "tiny")
    card = api.ModelCard.read(folder / constants.MODEL_CARD_FILE)
    card.model_copy(update={"selected": "int8-static"}).write(folder / constants.MODEL_CARD_FILE)
    with serving(config(folder)) as server:
        assert httpx.get(f"{server.url}/v2/models/tiny").json()["parameters"]["variant"] == "int8-static"
