"""gRPC calls' memory and event-loop cost before they run: a large call's body is read only once admitted
(--max-concurrent-large-requests, as the HTTP server reads large bodies), waiting meanwhile with no more than
HTTP/2's first window; and a ModelInferRequest whose structure is absurd is refused before protobuf parses it."""

from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from http2_support import LIVE, Answer, Client, infer_body, output, request_fields
from serving_support import config, images_batch, reference, serving
from serving_support import trained_folder as make_trained_folder
from tritonclient.grpc import service_pb2 as pb

from kiln_cluster.controlplane import free_port
from kiln_serving import Server
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


def test_a_model_infer_of_absurdly_many_top_level_fields_is_refused_before_it_is_parsed(
    one_at_a_time: Server,
) -> None:
    # Empty `inputs` entries, 2 bytes each, in a message large enough to be walked (a small one is just parsed).
    message = pb.ModelInferRequest(model_name="tiny").SerializeToString() + b"\x2a\x00" * (LARGE_BYTES // 2)
    with Client(one_at_a_time) as client:
        answer = client.wait(client.call("ModelInfer", b"\x00" + len(message).to_bytes(4, "big") + message))
    assert answer.status == 3 and "refused unparsed" in answer.headers["grpc-message"]
