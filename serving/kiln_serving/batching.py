"""Dynamic batching: requests waiting together are merged into one runtime call, then split back.

Requests queue on the event loop; one worker thread owns the model, so inference never blocks the loop and
the runtime's own thread pool is not oversubscribed by concurrent calls. While the worker runs a batch the
next requests pile up, and the moment it is free they go together (up to max_batch_size items with the same
inner shapes). When the worker is idle, the oldest request waits up to max_delay for company (Triton's rule),
but only while more requests are on their way into the server: a lone client never pays the delay. Only
models whose first dimension is dynamic are batched; with a delay of 0 every request runs alone. The queue is
bounded: when full, submit raises ServerBusy at once instead of letting latency grow without limit.

Everything here except `_execute` runs on the event loop thread; the loop and the worker meet once per batch.
One exception: a request that fills a batch by itself, of a model whose last full batch ran under INLINE_SECONDS,
runs on the event loop thread (`_runs_inline`): nothing could join it, and handing it to the worker and its answer
back cost more than the loop is held (batch 32, four clients: +7% throughput). A health check may wait for one
such run; should one take longer than that, it is timed too, and the next full batch goes to the worker.
"""

import asyncio
import contextlib
import contextvars
import functools
import itertools
import logging
import queue
import threading
import time
from collections import deque
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

import numpy as np

from kiln_serving import codec, errors, metrics
from kiln_serving.model import Model

log = logging.getLogger(__name__)

Outputs = dict[str, codec.Array]
Result = Outputs | errors.ServingError

# A full batch whose run is estimated under this runs on the event loop thread (see the module docstring).
INLINE_SECONDS = 0.005

# Set while a request is inside the server but has not reached submit() yet (see Batcher.arriving).
_arrival: contextvars.ContextVar[list[bool] | None] = contextvars.ContextVar("kiln_arrival", default=None)


@dataclass
class _Request:
    inputs: Mapping[str, codec.Array]
    rows: int
    # Requests merge only with requests of the same signature; None never merges.
    signature: tuple[object, ...] | None
    future: "asyncio.Future[Outputs]"
    # Rows run at a time for large string inputs (_string_rows); None: all at once. Such requests never merge.
    string_rows: int | None = None
    enqueued: float = field(default_factory=time.perf_counter)


class _Worker:
    """The one inference thread, running the calls handed to it in order. A ThreadPoolExecutor's future, work item
    and idle count cost a few more steps holding the GIL around each batch, all of which the loop waited for."""

    def __init__(self) -> None:
        self._calls: queue.SimpleQueue[tuple[Callable[..., None], tuple[object, ...]] | None] = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._serve, name="kiln-inference", daemon=True)
        self._thread.start()

    def submit(self, call: Callable[..., None], *args: object) -> None:
        self._calls.put((call, args))

    def shutdown(self) -> None:
        """Run the calls already handed over, then end the thread."""
        self._calls.put(None)
        self._thread.join()

    def _serve(self) -> None:
        while (item := self._calls.get()) is not None:
            call, args = item
            try:
                call(*args)
            except Exception:
                log.exception("inference worker: %s failed", getattr(call, "__qualname__", call))
            del item, call, args  # the batch is let go now, not when the next one comes


class Batcher:
    """The request queue and the worker thread in front of one model."""

    def __init__(
        self,
        model: Model,
        metrics: metrics.ModelMetrics,
        max_batch_size: int,
        max_queue_delay_seconds: float,
        max_queue_size: int,
    ) -> None:
        self.model = model
        self.metrics = metrics
        self.max_batch_size = max_batch_size
        self.max_delay = max_queue_delay_seconds
        self.max_queue_size = max_queue_size
        self._pending: deque[_Request] = deque()
        self._worker: _Worker | None = None
        self._running = False
        self._timer: asyncio.TimerHandle | None = None
        self._idle = asyncio.Event()
        self._closed = False
        # Inference requests inside the server that have not been queued yet (reading, decoding).
        self.incoming = 0
        # Seconds per row of the last full batch (max_batch_size rows or more); None until one ran.
        self._seconds_per_row: float | None = None

    @property
    def enabled(self) -> bool:
        return self.max_delay > 0 and self.max_batch_size > 1 and self.model.batchable

    def start(self) -> None:
        self._worker = _Worker()

    async def stop(self) -> None:
        """Refuse new requests, finish the queued ones, then end the worker."""
        self._closed = True
        while self._pending or self._running:
            self._idle.clear()
            self._dispatch(force=True)
            await self._idle.wait()
        if self._worker is not None:
            self._worker.shutdown()
            self._worker = None

    def arriving(self) -> "_Arriving":
        """Count an inference request as on its way to the queue, from its first byte until submit()."""
        return _Arriving(self)

    async def submit(self, inputs: Mapping[str, codec.Array]) -> Outputs:
        """Run inputs through the model (merged with others when possible) and return all outputs."""
        flag = _arrival.get()
        if flag is not None and flag[0]:
            flag[0] = False
            self.incoming -= 1
        if self._closed or self._worker is None:
            raise errors.ModelNotReady(f"model '{self.model.name}' is not ready: the server is shutting down")
        if len(self._pending) >= self.max_queue_size:
            raise errors.ServerBusy(
                f"model '{self.model.name}': {self.max_queue_size} requests already queued; retry later"
            )
        first_dims = {a.shape[0] if a.ndim else -1 for a in inputs.values()}
        rows = first_dims.pop() if len(first_dims) == 1 else -1
        string_rows = _string_rows(inputs) if self.model.batchable else None
        signature = None
        if self.enabled and 1 <= rows <= self.max_batch_size and string_rows is None:
            signature = tuple((n, a.dtype.str, a.shape[1:]) for n, a in sorted(inputs.items()))
        request = _Request(inputs, max(rows, 1), signature, asyncio.get_running_loop().create_future(), string_rows)
        self._pending.append(request)
        self.metrics.queue_depth.set(len(self._pending))
        self._dispatch()
        try:
            return await request.future
        except asyncio.CancelledError:  # the client went away: free its place unless it already runs
            with contextlib.suppress(ValueError):
                self._pending.remove(request)
                self.metrics.queue_depth.set(len(self._pending))
                if self._worker is not None:  # never to run: its strings let go on the worker, as _work does
                    self._worker.submit(codec.release, list(inputs.values()))
            raise

    # -- scheduling (event loop) -----------------------------------------------------------------------------

    def _dispatch(self, force: bool = False) -> None:
        """Start the next batch if the worker is free and waiting longer would not help."""
        if self._running or not self._pending:
            return
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        batch, full = self._next_batch()
        first = batch[0]
        if not (force or full or first.signature is None or self.incoming == 0):
            wait = first.enqueued + self.max_delay - time.perf_counter()
            if wait > 0:
                self._timer = asyncio.get_running_loop().call_later(wait, self._dispatch, True)
                return
        for _ in batch:
            self._pending.popleft()
        self.metrics.queue_depth.set(len(self._pending))
        started = time.perf_counter()
        for r in batch:
            self.metrics.queued(started - r.enqueued)
        self._running = True
        if self._runs_inline(batch):
            self._work(batch, functools.partial(self._finished, batch, inline=True))
            return
        assert self._worker is not None
        self._worker.submit(self._work, batch, functools.partial(self._hand_back, asyncio.get_running_loop(), batch))

    def _runs_inline(self, batch: list[_Request]) -> bool:
        """Whether this batch runs here, on the event loop thread (see the module docstring)."""
        first, per_row = batch[0], self._seconds_per_row
        return (len(batch) == 1 and first.rows >= self.max_batch_size and first.string_rows is None
                and per_row is not None and first.rows * per_row <= INLINE_SECONDS)  # fmt: skip

    def _next_batch(self) -> tuple[list[_Request], bool]:
        """The requests at the head of the queue that can run together, and whether nothing more fits."""
        first = self._pending[0]
        if first.signature is None:
            return [first], True
        batch, rows = [first], first.rows
        for r in itertools.islice(self._pending, 1, None):
            if r.signature != first.signature or rows + r.rows > self.max_batch_size:
                return batch, True
            batch.append(r)
            rows += r.rows
        return batch, rows >= self.max_batch_size

    def _finished(self, batch: list[_Request], results: list[Result], inline: bool = False) -> None:
        """The batch's results to its requests, and the next batch started: at once when the worker finished this
        one, on the loop's next turn when it ran inline (its requests' answers and other reads go first)."""
        self._running = False
        for request, result in zip(batch, results, strict=True):
            if request.future.done():  # the client went away
                continue
            if isinstance(result, errors.ServingError):
                request.future.set_exception(result)
            else:
                request.future.set_result(result)
        if self._pending and inline:
            asyncio.get_running_loop().call_soon(self._dispatch, self._closed)
        elif self._pending:
            self._dispatch(force=self._closed)
        else:
            self._idle.set()

    # -- inference (worker thread) ---------------------------------------------------------------------------

    def _work(self, batch: list[_Request], finish: Callable[[list[Result]], None]) -> None:
        """Run the batch, let go of the strings its inputs hold where it ran (codec.release: on the worker, not the
        loop, unless it ran inline), and give the results to `finish`."""
        try:
            results = self._execute(batch)
        except Exception as err:  # _execute catches everything; this is a safety net
            results = [errors.InferenceFailed(f"inference failed: {err}")] * len(batch)
        try:
            for request in batch:
                codec.release(request.inputs.values())
        finally:  # whatever happens here, the loop learns the batch ended (else no other batch would start)
            finish(results)

    def _hand_back(self, loop: asyncio.AbstractEventLoop, batch: list[_Request], results: list[Result]) -> None:
        """From the worker: the results to the loop with one call_soon_threadsafe (run_in_executor's chain of
        futures cost the loop two more turns per batch, each on caches the run has just cooled)."""
        with contextlib.suppress(RuntimeError):  # the loop has closed: nobody waits for these results
            loop.call_soon_threadsafe(self._finished, batch, results)

    def _execute(self, batch: list[_Request]) -> list[Result]:
        if len(batch) == 1:
            return [self._run_alone(batch[0])]
        started = time.perf_counter()
        rows = sum(r.rows for r in batch)
        merged = {n: np.concatenate([r.inputs[n] for r in batch], axis=0) for n in batch[0].inputs}
        inferring = time.perf_counter()
        try:
            outputs = self.model.predict(merged)
        except Exception as err:  # isolate the request that broke it: run each on its own
            log.warning("batch of %d failed (%s); running its requests one by one", len(batch), err)
            return [self._run_alone(r) for r in batch]
        if not follow_rows(outputs, rows):
            log.warning("model outputs do not follow the batch dimension; running requests one by one")
            return [self._run_alone(r) for r in batch]
        splitting = time.perf_counter()
        results: list[Result] = []
        offset = 0
        for r in batch:
            results.append({n: o[offset : offset + r.rows] for n, o in outputs.items()})
            offset += r.rows
        self._timed(rows, splitting - inferring)
        self.metrics.batch(rows, splitting - inferring, inferring - started, time.perf_counter() - splitting)
        return results

    def _timed(self, rows: int, seconds: float) -> None:
        if rows >= self.max_batch_size:
            self._seconds_per_row = seconds / rows

    def _run_alone(self, request: _Request) -> Result:
        started = time.perf_counter()
        try:
            outputs = self._predict(request.inputs, request.string_rows)
        except errors.ServingError as err:
            return err
        except Exception as err:
            log.error("inference failed", exc_info=err)
            return errors.InferenceFailed(f"inference failed: {err}")
        seconds = time.perf_counter() - started
        self._timed(request.rows, seconds)
        self.metrics.batch(request.rows, seconds)  # nothing to merge or split
        return outputs

    def _predict(self, inputs: Mapping[str, codec.Array], step: int | None) -> Outputs:
        """model.predict, `step` rows at a time when string inputs are large (_string_rows; None: all at once):
        onnxruntime turns numpy's strings into its own, and its string outputs back, holding the GIL (5 M strings:
        0.22 s). The rows are split as the batcher merges them, so the answer is the same; if the outputs do not
        follow the rows, the whole batch runs at once after all."""
        if step is None:
            return self.model.predict(inputs)
        rows = next(iter(inputs.values())).shape[0]
        pieces: dict[str, list[codec.Array]] = {}
        for at in range(0, rows, step):
            outputs = self.model.predict({name: array[at : at + step] for name, array in inputs.items()})
            if not follow_rows(outputs, min(step, rows - at)):
                break
            for name, array in outputs.items():
                pieces.setdefault(name, []).append(array)
            del outputs
        else:
            with contextlib.suppress(ValueError):  # outputs of other inner shapes in other slices
                return {name: codec.joined(parts) for name, parts in pieces.items()}
        log.warning("model outputs do not follow the rows of its string inputs; running them all at once")
        return self.model.predict(inputs)


class _Arriving:
    """Batcher.arriving's context manager, a class: contextlib's generator-based one took 0.9 us of every request
    (measured warm), this 0.3."""

    __slots__ = ("batcher", "flag", "token")

    def __init__(self, batcher: Batcher) -> None:
        self.batcher = batcher

    def __enter__(self) -> None:
        self.flag = [True]  # cleared by submit(), which counts the request as arrived
        self.token = _arrival.set(self.flag)
        self.batcher.incoming += 1

    def __exit__(self, *_: object) -> None:
        _arrival.reset(self.token)
        if self.flag[0]:
            self.batcher.incoming -= 1


def follow_rows(outputs: Outputs, rows: int) -> bool:
    """Whether every output has the rows of the inputs that made it (else they cannot be split or joined by row)."""
    return all(o.ndim and o.shape[0] == rows for o in outputs.values())


def _string_rows(inputs: Mapping[str, codec.Array]) -> int | None:
    """How many rows to run at a time so that no string input has more than codec.SLICE_VALUES elements in one
    call; None when one call is fine, or the inputs share no first dimension to split."""
    strings = [a for a in inputs.values() if a.dtype.kind == "O"]
    if not strings or max(a.size for a in strings) <= codec.SLICE_VALUES:
        return None
    first = {a.shape[0] if a.ndim else -1 for a in inputs.values()}
    rows = first.pop()
    if first or rows < 2:
        return None
    per_row = max(a.size // rows for a in strings)
    step = max(1, codec.SLICE_VALUES // max(per_row, 1))
    return step if step < rows else None
