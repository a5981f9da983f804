"""A small coalescing work queue for reconciles triggered by child events, after client-go's workqueue.

Watch events of a TrainingJob's children (its Job, pods, Deployment, helpers) do not reconcile in kopf's
handler threads: they add the TrainingJob's key here and return. A key is run once `delay` seconds after it
was first added, by one of a fixed number of worker threads, however many events named it meanwhile (a new
Job's ADDED and the Job controller's first MODIFIED cost one reconcile, not two). So, when many
TrainingJobs are applied at once, kopf's threads stay free to create their Jobs first, and the status
reads and writes follow with bounded concurrency instead of competing with them for the API server.
"""

import contextvars
import heapq
import logging
import threading
import time
from collections.abc import Callable
from typing import Final

log = logging.getLogger(__name__)

Key = tuple[str, str]  # (namespace, name)
Work = Callable[[Key, bool], object]  # (key, repair)
DELAY_SECONDS: Final = 0.1
WORKERS: Final = 4


class WorkQueue:
    """`add(key, repair)` from any thread; `start()` the workers, `stop()` them."""

    def __init__(self, work: Work, workers: int = WORKERS, delay: float = DELAY_SECONDS) -> None:
        self._work, self._workers, self._delay = work, workers, delay
        # Each run gets the context variables of the thread that queued it: kopf.event finds kopf's event
        # poster through those a kopf handler has, so a reconcile's Events are posted from a worker thread
        # too. A key queued from elsewhere (the resync) gets the last handler's.
        self._contexts: dict[Key, contextvars.Context] = {}
        self._last_context = contextvars.copy_context()
        self._lock = threading.Condition()
        self._pending: dict[Key, bool] = {}  # key -> repair, while queued
        self._due: list[tuple[float, int, Key]] = []  # heap of (due time, sequence, key)
        self._sequence = 0
        self._stopped = False
        self._threads: list[threading.Thread] = []

    def add(self, key: Key, repair: bool = False) -> None:
        """Queue a reconcile of `key` (merged with one already queued; `repair` sticks once asked for)."""
        context = contextvars.copy_context()
        from_handler = len(context) > 0  # a thread of its own (the resync) starts with an empty context
        with self._lock:
            if from_handler:
                self._last_context = context
            if key in self._pending:
                self._pending[key] = self._pending[key] or repair
                return
            self._pending[key] = repair
            self._contexts[key] = context if from_handler else self._last_context
            self._sequence += 1
            heapq.heappush(self._due, (time.monotonic() + self._delay, self._sequence, key))
            self._lock.notify()

    def __len__(self) -> int:
        with self._lock:
            return len(self._pending)

    def start(self) -> None:
        for index in range(self._workers):
            thread = threading.Thread(target=self._run, name=f"kiln-reconcile-{index}", daemon=True)
            thread.start()
            self._threads.append(thread)

    def stop(self) -> None:
        with self._lock:
            self._stopped = True
            self._lock.notify_all()

    def _next(self) -> tuple[Key, bool, contextvars.Context] | None:
        """The next due key (waiting for it), or None once stopped."""
        with self._lock:
            while not self._stopped:
                if self._due:
                    wait = self._due[0][0] - time.monotonic()
                    if wait <= 0:
                        _, _, key = heapq.heappop(self._due)
                        return key, self._pending.pop(key), self._contexts.pop(key)
                    self._lock.wait(wait)
                else:
                    self._lock.wait()
            return None

    def _run(self) -> None:
        while (item := self._next()) is not None:
            key, repair, context = item
            try:
                context.copy().run(self._work, key, repair)  # a copy: one context may serve several runs
            except Exception as err:  # one job's trouble must not stop the others; the resync retries it
                log.warning("reconcile of %s/%s failed: %s", *key, err)
