"""Compressed gRPC requests, as tritonclient.grpc sends them with compression_algorithm (Triton takes gzip and
deflate): inflated within the body limit and answered; refused with the protocol's status codes, the connection
left usable, when they cannot be taken."""

import gzip
import zlib
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import tritonclient.grpc as triton_grpc
from http2_support import LIVE, Client, infer_body
from serving_support import config, images_batch, reference, serving
from serving_support import trained_folder as make_trained_folder

from kiln_cluster.controlplane import free_port
from kiln_serving import Server

LIMIT = 200_000


@pytest.fixture(scope="module")
def folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_trained_folder(tmp_path_factory.mktemp("grpc-compression") / "tiny")


@pytest.fixture(scope="module")
def server(folder: Path) -> Iterator[Server]:
    with serving(config(folder, grpc_port=free_port(), max_body_bytes=LIMIT)) as running:
        yield running


@pytest.mark.parametrize("algorithm", ["gzip", "deflate"])
def test_a_request_tritonclient_compresses_is_inflated_and_answered(
    server: Server, folder: Path, algorithm: str
) -> None:
    x = images_batch(4, seed=51)
    tensor = triton_grpc.InferInput("input", list(x.shape), "FP32")
    tensor.set_data_from_numpy(x)
    client = triton_grpc.InferenceServerClient(server.grpc_address)
    try:
        result = client.infer("tiny", [tensor], compression_algorithm=algorithm)
    finally:
        client.close()
    expected = reference(folder / "models" / "model.onnx", {"input": x})["logits"]
    assert np.abs(result.as_numpy("logits") - expected).max() <= 1e-5


MESSAGE = infer_body(images_batch(2, seed=52))[5:]  # a ModelInferRequest, unframed


@pytest.mark.parametrize(
    ("encoding", "payload", "status", "says"),
    [
        ("snappy", gzip.compress(MESSAGE), 12, "compressed with 'snappy', which kiln does not take"),
        ("identity", gzip.compress(MESSAGE), 13, "flagged compressed but grpc-encoding names no compression"),
        ("gzip", zlib.compress(MESSAGE), 3, "not valid gzip data"),
        ("deflate", zlib.compress(MESSAGE)[:-20], 3, "ends before the compressed stream does"),
        ("gzip", gzip.compress(b"\0" * (LIMIT + 1)), 8, f"over the limit of {LIMIT} bytes"),
    ],
    ids=["unknown-encoding", "no-encoding", "not-gzip", "truncated", "inflates-past-the-limit"],
)
def test_a_compressed_message_that_cannot_be_taken_gets_the_protocols_status(
    server: Server, encoding: str, payload: bytes, status: int, says: str
) -> None:
    framed = b"\x01" + len(payload).to_bytes(4, "big") + payload
    with Client(server) as client:
        answer = client.wait(client.call("ModelInfer", framed, headers=[("grpc-encoding", encoding)]))
        assert answer.status == status, answer.headers
        assert says in answer.headers["grpc-message"]
        assert answer.headers["grpc-accept-encoding"] == "identity,gzip,deflate"
        assert client.wait(client.call("ServerLive", LIVE)).status == 0
