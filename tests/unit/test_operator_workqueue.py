"""The reconcile work queue: keys coalesce while queued, repair sticks, runs are bounded, context travels."""

import contextvars
import threading
import time
from collections.abc import Callable

from kiln_operator import workqueue

SEEN: contextvars.ContextVar[str] = contextvars.ContextVar("SEEN")


class Recorder:
    def __init__(self, hold: threading.Event | None = None) -> None:
        self.runs: list[tuple[tuple[str, str], bool, str]] = []
        self.hold = hold
        self.lock = threading.Lock()
        self.running = self.peak = 0

    def __call__(self, key: tuple[str, str], repair: bool) -> None:
        with self.lock:
            self.running += 1
            self.peak = max(self.peak, self.running)
        if self.hold is not None:
            self.hold.wait(10)
        with self.lock:
            self.running -= 1
            self.runs.append((key, repair, SEEN.get("none")))


def wait_for(predicate: Callable[[], bool], timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.01)


def test_events_for_one_key_while_it_waits_cost_one_run_and_repair_sticks() -> None:
    work = Recorder()
    queue = workqueue.WorkQueue(work, workers=2, delay=0.0)
    for repair in (False, True, False):  # queued before the workers start: all still waiting
        queue.add(("team", "a"), repair)
    queue.add(("team", "b"))
    assert len(queue) == 2
    queue.start()
    try:
        wait_for(lambda: len(work.runs) == 2)
        time.sleep(0.4)  # nothing else comes
        assert sorted(run[:2] for run in work.runs) == [(("team", "a"), True), (("team", "b"), False)]
    finally:
        queue.stop()


def test_no_more_runs_at_once_than_workers_however_many_keys() -> None:
    release = threading.Event()
    work = Recorder(hold=release)
    queue = workqueue.WorkQueue(work, workers=3, delay=0.0)
    queue.start()
    try:
        for index in range(20):
            queue.add(("team", f"job-{index}"))
        wait_for(lambda: work.running == 3)
        time.sleep(0.2)
        assert work.peak == 3 and len(work.runs) == 0
        release.set()
        wait_for(lambda: len(work.runs) == 20)
        assert work.peak == 3
    finally:
        queue.stop()


def test_a_run_sees_the_context_of_the_handler_that_queued_it_and_a_bare_thread_gets_the_last_one() -> None:
    work = Recorder()
    queue = workqueue.WorkQueue(work, workers=1, delay=0.0)
    queue.start()
    try:

        def handler() -> None:  # what kopf does: context variables set for the object being handled
            SEEN.set("kopf handler")
            queue.add(("team", "from-handler"))

        contextvars.copy_context().run(handler)
        wait_for(lambda: len(work.runs) == 1)
        bare = threading.Thread(target=queue.add, args=(("team", "from-resync"), True))  # starts with no context
        bare.start()
        bare.join()
        wait_for(lambda: len(work.runs) == 2)
        assert [run[2] for run in work.runs] == ["kopf handler", "kopf handler"]
    finally:
        queue.stop()


def test_a_failing_run_is_logged_and_the_workers_go_on() -> None:
    done: list[str] = []

    def work(key: tuple[str, str], repair: bool) -> None:
        if key[1] == "bad":
            raise RuntimeError("API server said no")
        done.append(key[1])

    queue = workqueue.WorkQueue(work, workers=1, delay=0.0)
    queue.start()
    try:
        queue.add(("team", "bad"))
        queue.add(("team", "good"))
        wait_for(lambda: done == ["good"])
    finally:
        queue.stop()
