"""The Open Inference Protocol over gRPC, as tritonclient.grpc speaks it: same model, batching, metrics and
errors as HTTP, on the gRPC port beside the HTTP one."""

import contextlib
import queue
from collections.abc import Iterator
from pathlib import Path

import grpc
import httpx
import numpy as np
import pytest
import tritonclient.grpc as triton_grpc
from google.protobuf import json_format
from grpc_health.v1 import health_pb2, health_pb2_grpc
from serving_support import CLASSES, all_datatypes, config, images_batch, reference, serving, statuses
from serving_support import trained_folder as make_trained_folder
from tritonclient.grpc import service_pb2 as pb
from tritonclient.grpc import service_pb2_grpc as service_grpc
from tritonclient.utils import InferenceServerException
from tritonclient.utils import triton_to_np_dtype as triton_np_dtype

from kiln_cluster.controlplane import free_port
from kiln_serving import Server

PATIENCE = 30


@pytest.fixture(scope="module")
def folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_trained_folder(tmp_path_factory.mktemp("grpc") / "tiny")


@pytest.fixture(scope="module")
def server(folder: Path) -> Iterator[Server]:
    with serving(config(folder, grpc_port=free_port())) as running:
        yield running


@pytest.fixture(scope="module")
def client(server: Server) -> Iterator[triton_grpc.InferenceServerClient]:
    c = triton_grpc.InferenceServerClient(server.grpc_address)
    yield c
    c.close()


def test_tritonclient_grpc_sees_health_and_metadata(client: triton_grpc.InferenceServerClient) -> None:
    assert client.is_server_live() and client.is_server_ready()
    assert client.is_model_ready("tiny") and client.is_model_ready("tiny", "1")
    assert client.get_server_metadata(as_json=True)["name"] == "kiln"
    meta = client.get_model_metadata("tiny", as_json=True)
    assert meta["platform"] == "onnxruntime_onnx" and meta["versions"] == ["1"]
    assert meta["inputs"][0]["name"] == "input" and meta["inputs"][0]["shape"] == ["-1", "3", "8", "8"]


def test_grpc_inference_with_raw_contents_matches_onnxruntime_and_is_counted(
    server: Server, client: triton_grpc.InferenceServerClient, folder: Path
) -> None:
    before = statuses(server).get("200", 0.0)
    x = images_batch(3, seed=31)
    tensor = triton_grpc.InferInput("input", list(x.shape), "FP32")
    tensor.set_data_from_numpy(x)
    result = client.infer("tiny", [tensor], request_id="7")
    assert result.get_response().id == "7"
    expected = reference(folder / "models" / "model.onnx", {"input": x})["logits"]
    assert np.abs(result.as_numpy("logits") - expected).max() <= 1e-5
    top = client.infer("tiny", [tensor], outputs=[triton_grpc.InferRequestedOutput("logits", class_count=1)])
    labels = [v.decode().split(":")[2] for v in top.as_numpy("logits").reshape(-1)]
    assert labels == [CLASSES[i] for i in expected.argmax(axis=1)]
    assert statuses(server)["200"] >= before + 2


def test_grpc_errors_carry_the_protocols_status_codes(
    server: Server, client: triton_grpc.InferenceServerClient
) -> None:
    wrong = np.zeros((1, 3, 5, 5), dtype=np.float32)
    tensor = triton_grpc.InferInput("input", list(wrong.shape), "FP32")
    tensor.set_data_from_numpy(wrong)
    with pytest.raises(InferenceServerException) as bad:
        client.infer("tiny", [tensor])
    assert bad.value.status() == "StatusCode.INVALID_ARGUMENT"
    assert "expected shape [-1,3,8,8], got [1,3,5,5]" in bad.value.message()
    with pytest.raises(InferenceServerException) as missing:
        client.get_model_metadata("resnet")
    assert missing.value.status() == "StatusCode.NOT_FOUND"
    nan = np.full((1, 3, 8, 8), np.nan, dtype=np.float32)
    tensor.set_shape(list(nan.shape))
    tensor.set_data_from_numpy(nan)
    with pytest.raises(InferenceServerException) as not_finite:
        client.infer("tiny", [tensor])
    assert not_finite.value.status() == "StatusCode.INVALID_ARGUMENT"
    assert statuses(server).get("400", 0) >= 2
    # Checked as Triton checks them: typed contents beside raw ones (silently ignored before), and a request
    # parameter named as Triton's reserved ones.
    x = images_batch(1)
    both = pb.ModelInferRequest(model_name="tiny", raw_input_contents=[x.tobytes()])
    both.inputs.add(name="input", datatype="FP32", shape=list(x.shape)).contents.fp32_contents.extend(x.reshape(-1))
    reserved = pb.ModelInferRequest(model_name="tiny", raw_input_contents=[x.tobytes()])
    reserved.inputs.add(name="input", datatype="FP32", shape=list(x.shape))
    reserved.parameters["triton_enable_empty_final_response"].bool_param = True
    with grpc.insecure_channel(server.grpc_address) as channel:
        stub = service_grpc.GRPCInferenceServiceStub(channel)
        for request, message in ((both, "input 'input': contents must not be given with raw_input_contents"),
                                 (reserved, "names starting with 'triton_' are reserved")):  # fmt: skip
            with pytest.raises(grpc.RpcError) as refused:
                stub.ModelInfer(request, timeout=PATIENCE)
            assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT and message in str(refused.value.details())


def test_a_tensor_in_shared_memory_is_refused_not_answered_in_the_response(
    client: triton_grpc.InferenceServerClient,
) -> None:
    """kiln serves no shared-memory extension: answered in the response, the client would read its region's
    stale bytes as the output."""
    x = images_batch(2, seed=33)
    tensor = triton_grpc.InferInput("input", list(x.shape), "FP32")
    tensor.set_data_from_numpy(x)
    output = triton_grpc.InferRequestedOutput("logits")
    output.set_shared_memory("out", 40)
    placed = triton_grpc.InferInput("input", list(x.shape), "FP32")
    placed.set_shared_memory("in", x.nbytes)
    for inputs, outputs, what in (([tensor], [output], "output 'logits'"), ([placed], None, "input 'input'")):
        with pytest.raises(InferenceServerException) as refused:
            client.infer("tiny", inputs, outputs=outputs)
        assert refused.value.status() == "StatusCode.INVALID_ARGUMENT"
        assert f"{what}: shared memory (parameters.shared_memory_region) is not supported" in refused.value.message()
    with pytest.raises(InferenceServerException) as unserved:
        client.get_system_shared_memory_status()
    assert unserved.value.status() == "StatusCode.UNIMPLEMENTED"


def test_grpc_statistics_after_n_inferences_match_the_http_statistics_endpoint(
    server: Server, client: triton_grpc.InferenceServerClient
) -> None:
    def counts(stats: pb.ModelStatisticsResponse) -> tuple[int, int, int]:
        entry = stats.model_stats[0]
        return entry.inference_stats.success.count, entry.inference_count, entry.execution_count

    before = client.get_inference_statistics("tiny")
    x = images_batch(2, seed=32)
    tensor = triton_grpc.InferInput("input", list(x.shape), "FP32")
    tensor.set_data_from_numpy(x)
    for _ in range(5):
        client.infer("tiny", [tensor])
    after = client.get_inference_statistics("tiny")
    # One at a time, so every request is its own runtime call of 2 items.
    assert [a - b for a, b in zip(counts(after), counts(before), strict=True)] == [5, 10, 5]
    assert after.model_stats[0].name == "tiny" and after.model_stats[0].version == "1"
    # Nothing ran in between, so both protocols report the same totals, field for field.
    http = httpx.get(f"{server.url}/v2/models/tiny/stats").json()
    assert after == json_format.ParseDict(http, pb.ModelStatisticsResponse())
    assert client.get_inference_statistics() == client.get_inference_statistics("tiny", "1") == after


def test_grpc_statistics_of_an_unknown_model_is_not_found_and_unserved_rpcs_are_unimplemented(
    server: Server, client: triton_grpc.InferenceServerClient
) -> None:
    for name, version in (("resnet", ""), ("tiny", "2")):
        with pytest.raises(InferenceServerException) as missing:
            client.get_inference_statistics(name, version)
        assert missing.value.status() == "StatusCode.NOT_FOUND"
    for unserved in (lambda: client.get_model_config("tiny"), client.get_model_repository_index):
        with pytest.raises(InferenceServerException) as err:
            unserved()
        assert err.value.status() == "StatusCode.UNIMPLEMENTED"
        assert "kiln does not serve" in err.value.message() and "ModelStatistics" in err.value.message()
    extensions = client.get_server_metadata(as_json=True)["extensions"]
    assert "statistics" in extensions and extensions == httpx.get(f"{server.url}/v2").json()["extensions"]


def test_a_model_that_cannot_load_answers_unavailable_over_grpc(tmp_path: Path) -> None:
    (tmp_path / "empty").mkdir()
    with serving(config(tmp_path / "empty", grpc_port=free_port())) as running:
        channel = triton_grpc.InferenceServerClient(running.grpc_address)
        assert channel.is_server_live() and not channel.is_server_ready()
        x = images_batch(1)
        tensor = triton_grpc.InferInput("input", list(x.shape), "FP32")
        tensor.set_data_from_numpy(x)
        with pytest.raises(InferenceServerException) as err:
            channel.infer("empty", [tensor])
        assert err.value.status() == "StatusCode.UNAVAILABLE"
        channel.close()
        with grpc.insecure_channel(running.grpc_address) as plain:
            health = health_pb2_grpc.HealthStub(plain).Check(health_pb2.HealthCheckRequest(), timeout=PATIENCE)
        assert health.status == health_pb2.HealthCheckResponse.NOT_SERVING


def test_the_standard_grpc_health_check_answers_as_kubernetes_grpc_probes_ask(server: Server) -> None:
    with grpc.insecure_channel(server.grpc_address) as channel:
        health = health_pb2_grpc.HealthStub(channel)
        for service in ("", "inference.GRPCInferenceService"):
            answer = health.Check(health_pb2.HealthCheckRequest(service=service), timeout=PATIENCE)
            assert answer.status == health_pb2.HealthCheckResponse.SERVING
        with pytest.raises(grpc.RpcError) as unknown:
            health.Check(health_pb2.HealthCheckRequest(service="resnet"), timeout=PATIENCE)
        assert unknown.value.code() == grpc.StatusCode.NOT_FOUND and "resnet" in str(unknown.value.details())
        with pytest.raises(grpc.RpcError) as watch:
            next(health.Watch(health_pb2.HealthCheckRequest(), timeout=PATIENCE))
        assert watch.value.code() == grpc.StatusCode.UNIMPLEMENTED


def test_an_unserved_rpc_is_refused_from_its_headers_while_its_client_still_streams(folder: Path) -> None:
    # A streaming call (tritonclient's stream_infer) keeps its request open: refused only once its body ended, it
    # waited out the body timeout (here far longer than this test waits) and then lost its connection.
    answers: queue.Queue[object] = queue.Queue()
    with serving(config(folder, grpc_port=free_port(), body_timeout_seconds=600)) as running:
        client = triton_grpc.InferenceServerClient(running.grpc_address)
        client.start_stream(callback=lambda result, error: answers.put(error or result))
        x = images_batch(1)
        tensor = triton_grpc.InferInput("input", list(x.shape), "FP32")
        tensor.set_data_from_numpy(x)
        with contextlib.suppress(InferenceServerException):  # the client's own, once the refusal has come
            client.async_stream_infer("tiny", [tensor])
        try:
            refused = answers.get(timeout=PATIENCE)
        finally:
            client.stop_stream(cancel_requests=True)
            client.close()
    assert isinstance(refused, InferenceServerException), refused
    assert refused.status() == "StatusCode.UNIMPLEMENTED" and "ModelStreamInfer" in str(refused.message())


def test_grpc_port_zero_turns_grpc_off(folder: Path) -> None:
    with serving(config(folder, grpc_port=0)) as running:
        assert running.grpc_port is None
        assert httpx.get(f"{running.url}/v2/health/ready").status_code == 200


# InferTensorContents' field for each datatype that may travel typed (FP16 and BF16 travel raw only).
TYPED = {"BOOL": "bool_contents", "UINT8": "uint_contents", "UINT16": "uint_contents", "UINT32": "uint_contents",
         "UINT64": "uint64_contents", "INT8": "int_contents", "INT16": "int_contents", "INT32": "int_contents",
         "INT64": "int64_contents", "FP32": "fp32_contents", "FP64": "fp64_contents"}  # fmt: skip


def test_typed_contents_of_every_datatype_arrive_as_sent_and_bad_ones_are_invalid_arguments(tmp_path: Path) -> None:
    # KServe's InferenceGRPCClient and hand-written clients send InferTensorContents instead of raw bytes.
    model = all_datatypes(tmp_path / "types" / "model.onnx", list(TYPED))
    sent = {t: np.array([[0, 1, 1], [1, 0, 1]]) * 100 for t in TYPED}  # 100: fits every type but BOOL's 1
    request = pb.ModelInferRequest(model_name="types")
    for t, x in sent.items():
        tensor = request.inputs.add(name=f"in_{t}", datatype=t, shape=[2, 3])
        getattr(tensor.contents, TYPED[t]).extend((x > 0).ravel().tolist() if t == "BOOL" else x.ravel().tolist())
    with (serving(config(model.parent, grpc_port=free_port())) as running,
          grpc.insecure_channel(running.grpc_address) as channel):  # fmt: skip
        stub = service_grpc.GRPCInferenceServiceStub(channel)
        answer = stub.ModelInfer(request)
        for output, raw in zip(answer.outputs, answer.raw_output_contents, strict=True):
            t = output.datatype
            expected = (sent[t] > 0) if t == "BOOL" else sent[t]
            got = np.frombuffer(raw, dtype=triton_np_dtype(t)).reshape(list(output.shape))
            assert np.array_equal(got, expected.astype(triton_np_dtype(t))), t
        for t, value in (("INT8", 300), ("INT16", -40_000), ("UINT8", 256), ("UINT16", 70_000)):  # past the type
            bad = pb.ModelInferRequest()
            bad.CopyFrom(request)
            getattr(bad.inputs[list(TYPED).index(t)].contents, TYPED[t])[0] = value
            with pytest.raises(grpc.RpcError) as refused:
                stub.ModelInfer(bad)
            assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT, (t, refused.value.details())
            assert f"in_{t}" in refused.value.details()
        misplaced = pb.ModelInferRequest()
        misplaced.CopyFrom(request)
        fp32 = misplaced.inputs[list(TYPED).index("FP32")]
        fp32.contents.ClearField("fp32_contents")
        fp32.contents.int_contents.extend([1] * 6)
        with pytest.raises(grpc.RpcError) as refused:
            stub.ModelInfer(misplaced)
        assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        expected = "input 'in_FP32': FP32 values go in contents.fp32_contents, not contents.int_contents"
        assert refused.value.details() == expected
