"""Peers notice a lost worker within seconds, not after the 30-minute collective timeout.

Every rank of a process group runs a small thread that bumps its own counter in the rendezvous store
(torch's TCPStore at MASTER_ADDR:MASTER_PORT) every second and reads everyone else's. A peer whose counter
has not moved for `timeout` seconds, or a store that stays unreachable that long (rank 0, which hosts it,
is gone), means the group is broken: the main thread is then usually blocked in a collective that would only
fail after distributed.TIMEOUT, so the watchdog ends the process at once with EXIT_PEER_LOST. The operator's
Job ignores that exit code in its backoff count (podFailurePolicy), so one lost worker costs the group one
retry, and every replacement resumes from the last checkpoint.
"""

import datetime
import logging
import os
import sys
import threading
import time
from collections.abc import Callable

import torch.distributed as dist

from kiln.api import constants

log = logging.getLogger(__name__)

ENV_PEER_TIMEOUT = "KILN_PEER_TIMEOUT_SECONDS"
DEFAULT_PEER_TIMEOUT = 15.0
INTERVAL = 1.0
PREFIX = "kiln/heartbeat/"


def peer_timeout() -> float:
    value = os.environ.get(ENV_PEER_TIMEOUT, "")
    return float(value) if value else DEFAULT_PEER_TIMEOUT


class Watchdog:
    """Heartbeats of one rank, and the verdict on its peers; `stop()` before the group is torn down."""

    def __init__(
        self,
        rank: int,
        world_size: int,
        host: str,
        port: int,
        timeout: float,
        on_lost: Callable[[str], None] | None = None,
    ) -> None:
        self.rank, self.world_size, self.timeout = rank, world_size, timeout
        wait = datetime.timedelta(seconds=max(timeout, 5.0))
        self._store = dist.TCPStore(host, port, world_size, is_master=False, timeout=wait)  # type: ignore[attr-defined]
        self._on_lost = on_lost or _exit
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="kiln-peer-watchdog", daemon=True)

    def start(self) -> "Watchdog":
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        if self._thread.is_alive() and threading.current_thread() is not self._thread:
            self._thread.join(INTERVAL * 5)

    def _run(self) -> None:
        now = time.monotonic()
        seen: dict[int, tuple[int, float]] = {peer: (-1, now) for peer in range(self.world_size) if peer != self.rank}
        reachable = now
        while not self._stop.wait(INTERVAL):
            now = time.monotonic()
            try:
                self._store.add(f"{PREFIX}{self.rank}", 1)
                for peer, (count, since) in seen.items():
                    current = self._store.add(f"{PREFIX}{peer}", 0)
                    seen[peer] = (current, now) if current != count else (count, since)
                reachable = now
            except Exception as err:  # the store's host (rank 0) is gone, or the network is
                if now - reachable > self.timeout and not self._stop.is_set():
                    self._on_lost(f"the rendezvous store has been unreachable for {now - reachable:.0f}s ({err})")
                    return
                continue
            stale = [peer for peer, (_, since) in seen.items() if now - since > self.timeout]
            if stale and not self._stop.is_set():
                self._on_lost(f"no heartbeat from rank(s) {', '.join(map(str, stale))} for {self.timeout:.0f}s")
                return


def _exit(reason: str) -> None:
    """Leave now: the main thread is stuck in a collective, so no exception could reach it."""
    log.error("distributed: lost a peer: %s; exiting so the group restarts from the last checkpoint", reason)
    sys.stderr.flush()
    os._exit(constants.EXIT_PEER_LOST)
