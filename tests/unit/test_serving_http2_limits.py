"""kiln's own HTTP/2 transport for gRPC against peers that send too much, too slowly or not HTTP/2 at all: bodies
and header blocks over the limits, a missing preface, a stalled body, an idle connection and the connection cap,
with the h2 library as a client and frames built by hand."""

import contextlib
from collections.abc import Iterator
from pathlib import Path

import hpack
import numpy as np
import pytest
from http2_support import (
    CANCEL,
    ENHANCE_YOUR_CALM,
    LIVE,
    NO_ERROR,
    PATIENCE,
    PROTOCOL_ERROR,
    Client,
    Frames,
    goaway_codes,
    infer_body,
    output,
    raw,
    request_fields,
    strict_config,
)
from serving_support import config, images_batch, reference, serving
from serving_support import trained_folder as make_trained_folder

from kiln_cluster.controlplane import free_port
from kiln_serving import Server
from kiln_serving.http2_wire import CONTINUATION, END_HEADERS, GOAWAY, HEADERS, PREFACE, SETTINGS, frame


@pytest.fixture(scope="module")
def folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_trained_folder(tmp_path_factory.mktemp("http2") / "tiny")


@pytest.fixture(scope="module")
def strict(folder: Path) -> Iterator[Server]:
    with serving(strict_config(folder, keep_alive_timeout_seconds=0.5, max_connections=8)) as running:
        yield running


def test_a_body_over_the_limit_is_answered_resource_exhausted_and_the_connection_stays_usable(folder: Path) -> None:
    with serving(config(folder, grpc_port=free_port(), max_body_bytes=1024)) as small, Client(small) as client:
        # The stream's window holds the 1024 bytes, the 64 KiB envelope and one byte more: the server answers
        # that byte and resets the stream, and the client stops sending.
        too_big = infer_body(images_batch(100))
        assert len(too_big) > 1024 + 64 * 1024 + 1
        refused = client.wait(client.call("ModelInfer", too_big))
        assert refused.status == 8 and "max_body_bytes" in refused.headers["grpc-message"]
        while refused.reset is None:  # and RST_STREAM(NO_ERROR) follows, which tells the client to stop sending
            client.pump()
        assert refused.reset == NO_ERROR
        x = images_batch(1, seed=42)
        fits = client.wait(client.call("ModelInfer", infer_body(x)))
        assert fits.status == 0
        assert np.allclose(output(fits.body), reference(folder / "models" / "model.onnx", {"input": x})["logits"])


@pytest.mark.parametrize("sent", [b"", b"GET /v2/health/live HTTP/1.1\r\nHost: x\r\n\r\n"], ids=["nothing", "http1"])
def test_a_connection_without_the_preface_gets_settings_then_goaway_protocol_error_and_is_closed(
    strict: Server, sent: bytes
) -> None:
    with raw(strict) as sock:
        sock.sendall(sent)
        frames = Frames(sock).until_closed()
    assert frames[0][0] == SETTINGS and frames[-1][0] == GOAWAY and goaway_codes(frames) == [PROTOCOL_ERROR]


def test_a_request_whose_body_stops_halfway_is_closed_after_the_body_timeout(strict: Server) -> None:
    with Client(strict) as client:
        client.call("ModelInfer", b"\x00\x00\x00\x03\xe8" + b"\x00" * 10, end=False)  # 10 of 1000 bytes
        client.until_closed()
        assert client.terminated is not None and client.terminated.error_code == CANCEL


def test_an_idle_connection_after_its_answer_gets_goaway_no_error_and_is_closed(strict: Server) -> None:
    with Client(strict) as client:
        assert client.wait(client.call("ServerLive", LIVE)).status == 0
        client.until_closed()
        assert client.terminated is not None and client.terminated.error_code == NO_ERROR


@pytest.mark.parametrize("continued", [False, True], ids=["one-headers-frame", "headers-and-continuation"])
def test_a_header_block_over_the_limit_ends_the_connection_with_enhance_your_calm(
    strict: Server, continued: bool
) -> None:
    block = hpack.Encoder().encode(request_fields("ServerLive", ("x-padding", "a" * 20_000)), huffman=False)
    if continued:  # 12 KiB of a block that has not ended: the server stops buffering it at the limit
        sent = [frame(CONTINUATION if i else HEADERS, 0, 1, block[i : i + 4096]) for i in range(0, 12_288, 4096)]
    else:
        sent = [frame(HEADERS, END_HEADERS, 1, block)]
    with raw(strict) as sock:
        sock.sendall(PREFACE + frame(SETTINGS, 0, 0) + b"".join(sent))
        assert goaway_codes(Frames(sock).until_closed()) == [ENHANCE_YOUR_CALM]


def test_past_the_connection_cap_a_new_connection_is_closed_at_once_while_open_ones_still_answer(
    folder: Path,
) -> None:
    cfg = config(folder, grpc_port=free_port(), max_connections=8, header_timeout_seconds=PATIENCE,
                 keep_alive_timeout_seconds=PATIENCE)  # fmt: skip
    with serving(cfg) as capped, Client(capped) as client, contextlib.ExitStack() as others:
        assert client.wait(client.call("ServerLive", LIVE)).status == 0
        for _ in range(7):  # each is taken in: the server's SETTINGS come
            sock = others.enter_context(raw(capped))
            sock.sendall(PREFACE + frame(SETTINGS, 0, 0))
            assert Frames(sock).until(lambda f: True)[0][0] == SETTINGS
        with raw(capped) as extra:
            assert Frames(extra).until_closed() == []  # not even a SETTINGS frame
        assert client.wait(client.call("ServerLive", LIVE)).status == 0
