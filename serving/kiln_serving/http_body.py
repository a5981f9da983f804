"""Request bodies and hang-ups for the HTTP routes: read within the size limit (inflating gzip and deflate
bodies), binary bodies straight into an aligned buffer, and work cancelled when its client goes away."""

import asyncio
import zlib
from collections.abc import Coroutine
from typing import Any, TypeVar

from starlette.requests import Request

from kiln_serving import binary, connections, errors
from kiln_serving.dataplane import DataPlane

T = TypeVar("T")


def declared_length(request: Request) -> int | None:
    """The Content-Length, if it is a plain number."""
    declared = request.headers.get("content-length")
    return None if declared is None else binary.digits(declared)


# The compressions a request may come in (HTTP Content-Encoding, gRPC grpc-encoding): gzip, and zlib's deflate.
ENCODINGS = ("gzip", "deflate")


def inflate(body: bytes | memoryview, encoding: str, limit: int) -> bytes:
    """tritonclient's request_compression_algorithm (HTTP) and compression_algorithm (gRPC), one of ENCODINGS;
    decompress no further than the limit (zip bombs)."""
    inflater = zlib.decompressobj(wbits=31 if encoding == "gzip" else 15)
    try:
        body = inflater.decompress(body, limit + 1)
    except zlib.error as err:
        raise errors.InvalidInput(f"body is not valid {encoding} data: {err}") from None
    if len(body) > limit:
        raise errors.PayloadTooLarge(f"decompressed request body is over the limit of {limit} bytes")
    if not inflater.eof:
        raise errors.InvalidInput(f"body is not valid {encoding} data: it ends before the compressed stream does")
    return body


def check_declared(declared: int | None, limit: int) -> None:
    """PayloadTooLarge for a Content-Length over the limit, before any of the body is read."""
    if declared is not None and declared > limit:
        raise errors.PayloadTooLarge(f"request body of {declared} bytes is over the limit of {limit} bytes")


async def read_body(request: Request, dataplane: DataPlane) -> bytes:
    """The whole body, refused with errors.PayloadTooLarge as soon as it (or its decompressed form) passes the
    limit; a large body is joined, and inflated if compressed, on a codec thread."""
    limit = dataplane.config.max_body_bytes
    check_declared(declared_length(request), limit)
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise errors.PayloadTooLarge(f"request body is over the limit of {limit} bytes")
        chunks.append(chunk)
    body = await dataplane.offload(size, b"".join, chunks)  # 60 MB took 40-90 ms of the event loop
    del chunks
    encoding = request.headers.get("content-encoding", "identity").lower()
    if encoding in ENCODINGS:
        body = await dataplane.offload(len(body) * 8, inflate, body, encoding, limit)
    elif encoding != "identity":
        raise errors.InvalidInput(f"unsupported Content-Encoding {encoding!r} (use gzip, deflate or none)")
    return body


async def read_tensor_body(request: Request, dataplane: DataPlane, align_at: int) -> bytes | memoryview:
    """Like read_body, but a plain body with a Content-Length is copied once, chunk by chunk, into an aligned
    buffer (binary.aligned_buffer) whose byte `align_at` is where the binary tensors start."""
    length = declared_length(request)
    encoding = request.headers.get("content-encoding", "identity").lower()
    if length is None or length > dataplane.config.max_body_bytes or encoding != "identity":
        return await read_body(request, dataplane)
    buffer = binary.aligned_buffer(length, align_at)
    size = 0
    async for chunk in request.stream():
        # The HTTP parser frames the body by its Content-Length, so the chunks never run past it.
        buffer[size : size + len(chunk)] = chunk
        size += len(chunk)
    return buffer[:size]


async def _disconnect(request: Request) -> None:
    """Returns when the client of a request whose body was read goes away."""
    while (await request.receive())["type"] != "http.disconnect":
        pass


def hang_up_of(request: Request) -> asyncio.Future[int | None] | None:
    """The hang-up future of the request's connection under kiln's own HTTP protocol (connections.HANG_UP)."""
    hang_up: asyncio.Future[int | None] | None = request.scope.get("extensions", {}).get(connections.HANG_UP)
    return hang_up


async def unless_disconnected(request: Request, work: Coroutine[Any, Any, T]) -> T:
    """unless_gone for a route: under kiln's own HTTP protocol the request's scope carries its connection's
    hang-up future (connections.HANG_UP); other ASGI servers get a task watching receive() instead."""
    hang_up = hang_up_of(request)
    if hang_up is None:
        return await _watched(request, work)
    return await unless_gone(hang_up, work)


async def unless_gone(hang_up: asyncio.Future[int | None], work: Coroutine[Any, Any, T]) -> T:
    """Await `work` (the body already read), cancelling it when `hang_up` (done once the client's connection is
    lost) completes meanwhile: a request still queued leaves the batcher's queue (its place freed) and is counted
    as ClientClosed. The task is cancelled from the future's callback: no watcher task per request."""
    if hang_up.done():
        work.close()
        raise errors.ClientClosed("the client went away")
    task = asyncio.current_task()
    assert task is not None
    # Callbacks of a done future are already scheduled when it completes, so removing ours in `finally` may be too
    # late: `waiting` keeps a cancel that runs after the work ended from hitting whatever the task does next.
    waiting, cancelled = True, False

    def cancel(_: object) -> None:
        nonlocal cancelled
        if waiting:
            cancelled = task.cancel()

    hang_up.add_done_callback(cancel)
    try:
        return await work
    except asyncio.CancelledError:
        if not cancelled:  # a cancellation of someone else's (shutdown): not ours to swallow
            raise
        task.uncancel()
        raise errors.ClientClosed("the client went away") from None
    finally:
        waiting = False
        hang_up.remove_done_callback(cancel)


async def _watched(request: Request, work: Coroutine[Any, Any, T]) -> T:
    """unless_disconnected under another ASGI server: a task watching receive() for the disconnect."""
    task = asyncio.ensure_future(work)
    watch = asyncio.ensure_future(_disconnect(request))
    try:
        await asyncio.wait({task, watch}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        watch.cancel()
    if not task.done():
        task.cancel()
        raise errors.ClientClosed("the client went away")
    return task.result()
