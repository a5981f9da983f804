"""Dynamic batching, backpressure and graceful shutdown, against a real server and real onnxruntime."""

import socket
import threading
import time
from collections.abc import Callable, Mapping
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import gevent
import httpx
import numpy as np
import pytest
import tritonclient.grpc as triton_grpc
import tritonclient.http as triton
from prometheus_client.parser import text_string_to_metric_families
from serving_support import (
    binary_body,
    binary_output,
    classifier,
    config,
    images_batch,
    reference,
    serving,
    trained_folder,
    wait_until,
)
from tritonclient.utils import InferenceServerException

from kiln_cluster.controlplane import free_port
from kiln_serving import Server, ServingConfig, batching, codec
from kiln_serving.model import OnnxModel


class GatedModel(OnnxModel):
    """The real ONNX model, but each request waits at a gate the test opens (warm-up passes freely)."""

    def __init__(self, cfg: ServingConfig) -> None:
        super().__init__(cfg)
        self.gate = threading.Event()
        self.entered = threading.Event()

    def predict(self, inputs: Mapping[str, codec.Array]) -> dict[str, codec.Array]:
        if self.ready:
            self.entered.set()
            self.gate.wait()
        return super().predict(inputs)


def batch_sizes(server: Server) -> dict[str, float]:
    """Cumulative bucket counts of kiln_serving_batch_size, by upper bound."""
    text = httpx.get(f"{server.url}/metrics").text
    return {s.labels["le"]: s.value for f in text_string_to_metric_families(text) if f.name == "kiln_serving_batch_size"
            for s in f.samples if s.name.endswith("_bucket")}  # fmt: skip


def metric(server: Server, name: str) -> float:
    text = httpx.get(f"{server.url}/metrics").text
    return sum(s.value for f in text_string_to_metric_families(text) for s in f.samples if s.name == name)


def json_infer(server: Server, x: np.ndarray) -> httpx.Response:
    body = {"inputs": [{"name": "input", "shape": list(x.shape), "datatype": "FP32", "data": x.reshape(-1).tolist()}]}
    return httpx.post(f"{server.url}/v2/models/tiny/infer", json=body, timeout=120)


def binary_infer(server: Server, x: np.ndarray) -> httpx.Response:
    """Like json_infer with the binary extension, which kiln answers without ASGI (direct.py)."""
    body, header_length = binary_body(x)
    return httpx.post(f"{server.url}/v2/models/tiny/infer", content=body, timeout=120,
                      headers={"Inference-Header-Content-Length": str(header_length)})  # fmt: skip


def test_200_concurrent_requests_all_succeed_match_unbatched_results_and_are_batched(tmp_path: Path) -> None:
    folder = trained_folder(tmp_path / "tiny")
    xs = [images_batch(1, seed=i) for i in range(200)]
    expected = [reference(folder / "models" / "model.onnx", {"input": x})["logits"] for x in xs]
    cfg = config(folder, max_batch_size=16)
    model = GatedModel(cfg)
    with serving(cfg, model) as server:
        client = triton.InferenceServerClient(server.address, concurrency=64, network_timeout=120)
        pending = []
        for x in xs:
            tensor = triton.InferInput("input", list(x.shape), "FP32")
            tensor.set_data_from_numpy(x)
            pending.append(client.async_infer("tiny", [tensor]))
        # Hold the model until requests pile up, so that batches must form whatever the machine's speed.
        # tritonclient sends from gevent greenlets: wait with gevent.sleep so they run meanwhile.
        wait_until(lambda: metric(server, "kiln_serving_queue_depth") >= 16, "requests queue up", pause=gevent.sleep)
        model.gate.set()
        results = [p.get_result().as_numpy("logits") for p in pending]
        for got, want in zip(results, expected, strict=True):
            assert np.abs(got - want).max() <= 1e-5
        buckets = batch_sizes(server)
        assert buckets["1.0"] < buckets["+Inf"] < 200, "every request ran alone: no batch was ever formed"
        assert buckets["16.0"] == buckets["+Inf"]  # never more than max_batch_size
        # Triton's statistics tell the same, a batch size at a time: runs, and the time merging and splitting took.
        (stats,) = client.get_inference_statistics("tiny")["model_stats"]
        runs = {int(b["batch_size"]): b for b in stats["batch_stats"]}
        assert sum(int(b["compute_infer"]["count"]) for b in runs.values()) == buckets["+Inf"]
        assert sum(size * int(b["compute_infer"]["count"]) for size, b in runs.items()) == 200
        merged = [b for size, b in runs.items() if size > 1]
        assert merged and all(int(b["compute_input"]["ns"]) > 0 and int(b["compute_output"]["ns"]) > 0 for b in merged)
        assert int(stats["inference_stats"]["compute_input"]["count"]) == buckets["+Inf"]
        assert metric(server, "kiln_serving_inferences_total") == 200  # warm-up runs are not counted
        assert metric(server, "kiln_serving_requests_total") == 200


def test_with_batching_off_or_a_fixed_batch_dimension_every_request_runs_alone(tmp_path: Path) -> None:
    folder = trained_folder(tmp_path / "tiny")
    fixed = classifier(tmp_path / "fixed" / "model.onnx", batch=1)
    cases = [(config(folder, max_queue_delay_microseconds=0), folder / "models" / "model.onnx"),
             (config(fixed.parent, model_name="tiny", max_queue_delay_microseconds=50_000), fixed)]  # fmt: skip
    for cfg, path in cases:
        with serving(cfg) as server, ThreadPoolExecutor(8) as pool:
            assert httpx.get(f"{server.url}/v2/models/tiny").json()["parameters"]["max_batch_size"] == 1
            xs = [images_batch(1, seed=i) for i in range(24)]
            answers = list(pool.map(lambda x: json_infer(server, x), xs))
            for x, answer in zip(xs, answers, strict=True):
                got = np.asarray(answer.json()["outputs"][0]["data"]).reshape(1, -1)
                assert np.abs(got - reference(path, {"input": x})["logits"]).max() <= 1e-5
            buckets = batch_sizes(server)
            assert buckets["1.0"] == buckets["+Inf"] == 24


def test_a_full_queue_answers_503_with_retry_after_and_the_server_recovers(tmp_path: Path) -> None:
    folder = trained_folder(tmp_path / "tiny")
    cfg = config(folder, max_queue_size=1, max_queue_delay_microseconds=0, grpc_port=free_port())
    model = GatedModel(cfg)
    with serving(cfg, model) as server, ThreadPoolExecutor(2) as pool:
        x = images_batch(1)
        running = pool.submit(json_infer, server, x)  # taken by the worker, held at the gate
        wait_until(model.entered.is_set, "first request reaches the model")
        queued = pool.submit(json_infer, server, x)  # fills the one queue slot
        wait_until(lambda: metric(server, "kiln_serving_queue_depth") == 1, "second request is queued")

        try:
            refused = json_infer(server, x)
            # Over gRPC, UNAVAILABLE (what Triton answers when its queue is full): the code clients retry.
            tensor = triton_grpc.InferInput("input", list(x.shape), "FP32")
            tensor.set_data_from_numpy(x)
            with pytest.raises(InferenceServerException) as busy:
                triton_grpc.InferenceServerClient(server.grpc_address).infer("tiny", [tensor])
        finally:
            model.gate.set()  # a failed check leaves no request held at the gate
        assert refused.status_code == 503
        assert refused.headers["Retry-After"] == "1"
        assert "1 requests already queued; retry later" in refused.json()["error"]
        assert busy.value.status() == "StatusCode.UNAVAILABLE" and "already queued" in str(busy.value.message())
        assert running.result().status_code == 200
        assert queued.result().status_code == 200
        assert json_infer(server, x).status_code == 200
        assert httpx.get(f"{server.url}/v2/health/ready").status_code == 200


@pytest.mark.parametrize("infer", [json_infer, binary_infer], ids=["json", "binary"])
def test_shutdown_stops_accepting_but_finishes_the_request_in_flight(
    tmp_path: Path, infer: Callable[[Server, np.ndarray], httpx.Response]
) -> None:
    folder = trained_folder(tmp_path / "tiny")
    cfg = config(folder)
    model = GatedModel(cfg)
    x = images_batch(1, seed=7)
    with serving(cfg, model) as server, ThreadPoolExecutor(2) as pool:
        in_flight = pool.submit(infer, server, x)
        wait_until(model.entered.is_set, "request reaches the model")
        server.uvicorn_server.should_exit = True  # what SIGTERM does

        def refuses_connections() -> bool:
            try:
                socket.create_connection(("127.0.0.1", server.port), timeout=1).close()
            except OSError:
                return True
            return False

        wait_until(refuses_connections, "listener closes")
        model.gate.set()
        answer = in_flight.result()
        assert answer.status_code == 200
        header_length = answer.headers.get("Inference-Header-Content-Length")
        if header_length is None:
            got = np.asarray(answer.json()["outputs"][0]["data"]).reshape(1, -1)
        else:
            got = binary_output(answer.content, int(header_length))
        assert np.abs(got - reference(folder / "models" / "model.onnx", {"input": x})["logits"]).max() <= 1e-5


class ThreadNoting(OnnxModel):
    """The real ONNX model, noting which thread ran each batch, each run held `seconds` longer."""

    def __init__(self, cfg: ServingConfig, seconds: float = 0.0) -> None:
        super().__init__(cfg)
        self.seconds = seconds
        self.threads: list[str] = []

    def predict(self, inputs: Mapping[str, codec.Array]) -> dict[str, codec.Array]:
        if self.ready:
            self.threads.append(threading.current_thread().name)
            time.sleep(self.seconds)
        return super().predict(inputs)


@pytest.mark.parametrize("delay", [0, 1000], ids=["batching off", "batching on"])
def test_a_full_batch_of_a_short_run_runs_on_the_event_loop_thread_and_the_rest_on_the_worker(
    tmp_path: Path, delay: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A bound no run here comes near, however loaded the machine: which thread runs what is tested, not the bound
    # (the next test is).
    monkeypatch.setattr(batching, "INLINE_SECONDS", 60.0)
    folder = trained_folder(tmp_path / "tiny")
    cfg = config(folder, max_batch_size=4, max_queue_delay_microseconds=delay)
    model = ThreadNoting(cfg)
    with serving(cfg, model) as server:
        for rows in (4, 4, 2, 8, 4):
            x = images_batch(rows, seed=rows)
            body, header_length = binary_body(x)
            answer = httpx.post(f"{server.url}/v2/models/tiny/infer", content=body,
                                headers={"Inference-Header-Content-Length": str(header_length)})  # fmt: skip
            assert answer.status_code == 200, answer.text
            output = binary_output(answer.content, int(answer.headers["inference-header-content-length"]))
            expected = reference(folder / "models" / "model.onnx", {"input": x})["logits"]
            np.testing.assert_allclose(output, expected, rtol=1e-5, atol=1e-5)
    # The first full batch has no run time to go by; a batch of 2 rows could have been joined by others.
    first, loop, partial, eight, last = model.threads
    assert (first, partial) == ("kiln-inference", "kiln-inference")
    assert loop == eight == last != "kiln-inference"


def test_a_full_batch_of_a_longer_run_stays_on_the_worker(tmp_path: Path) -> None:
    folder = trained_folder(tmp_path / "tiny")
    cfg = config(folder, max_batch_size=4, max_queue_delay_microseconds=0)
    model = ThreadNoting(cfg, seconds=0.02)  # 5 ms a row, past batching.INLINE_SECONDS for 4 rows
    with serving(cfg, model) as server:
        body, header_length = binary_body(images_batch(4))
        for _ in range(3):
            answer = httpx.post(f"{server.url}/v2/models/tiny/infer", content=body,
                                headers={"Inference-Header-Content-Length": str(header_length)})  # fmt: skip
            assert answer.status_code == 200, answer.text
    assert model.threads == ["kiln-inference"] * 3
