"""Leader election over a coordination.k8s.io Lease, as client-go's leaderelection does it.

With several operator replicas (`kiln operator --leader-elect`, chart value operator.replicas > 1) only the
holder of the Lease runs kopf; the others wait. The holder renews every RENEW_SECONDS; a Lease not renewed for
its leaseDurationSeconds may be taken over. Every write carries the resourceVersion read, so of two replicas
racing for an expired Lease exactly one wins (the other gets 409 Conflict). A leader that cannot renew before
its Lease expires exits at once (non-zero; the Deployment restarts it as a candidate), so two replicas never
act together for longer than one renew period.
"""

import contextlib
import http.server
import logging
import os
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from datetime import UTC, datetime, timedelta
from typing import Any, Final, Literal

from kiln_operator import kube

log = logging.getLogger(__name__)

LEASE_NAME: Final = "kiln-operator"
LEASE_SECONDS: Final = 15
RENEW_SECONDS: Final = 5
MICRO_TIME: Final = "%Y-%m-%dT%H:%M:%S.%fZ"
Action = Literal["create", "renew", "take", "wait"]


def decide(lease: Mapping[str, Any] | None, identity: str, now: datetime) -> Action:
    """What a candidate does with the Lease as read: create it, renew its own, take an expired one, or wait."""
    if lease is None:
        return "create"
    spec = lease.get("spec") or {}
    if spec.get("holderIdentity") == identity:
        return "renew"
    renewed = spec.get("renewTime")
    duration = int(spec.get("leaseDurationSeconds") or LEASE_SECONDS)
    if not spec.get("holderIdentity") or not renewed:
        return "take"
    expires = datetime.strptime(renewed, MICRO_TIME).replace(tzinfo=UTC) + timedelta(seconds=duration)
    return "take" if now >= expires else "wait"


def lease_body(namespace: str, identity: str, now: datetime, previous: Mapping[str, Any] | None) -> dict[str, Any]:
    """The Lease this candidate writes: itself as holder, renewed now (resourceVersion kept for the update)."""
    stamp = now.strftime(MICRO_TIME)
    before = (previous or {}).get("spec") or {}
    mine = before.get("holderIdentity") == identity
    meta: dict[str, Any] = {"name": LEASE_NAME, "namespace": namespace}
    if previous is not None:
        meta["resourceVersion"] = previous["metadata"]["resourceVersion"]
    return {
        "apiVersion": "coordination.k8s.io/v1",
        "kind": "Lease",
        "metadata": meta,
        "spec": {
            "holderIdentity": identity,
            "leaseDurationSeconds": LEASE_SECONDS,
            "acquireTime": before.get("acquireTime") if mine else stamp,
            "renewTime": stamp,
            "leaseTransitions": int(before.get("leaseTransitions") or 0) + (0 if mine or previous is None else 1),
        },
    }


@contextlib.contextmanager
def standby_health(host: str, port: int) -> Iterator[None]:
    """Answer the liveness probe (200 on any path) while waiting to lead, so a standby replica is not
    restarted; the port is free again for kopf's own endpoint once this returns."""
    if not port:
        yield
        return

    class Healthy(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            self.send_response(200)
            self.end_headers()
            self.wfile.write(b"standby\n")

        def log_message(self, *args: Any) -> None:
            pass

    server = http.server.ThreadingHTTPServer((host, port), Healthy)
    threading.Thread(target=server.serve_forever, name="kiln-standby-health", daemon=True).start()
    try:
        yield
    finally:
        server.shutdown()
        server.server_close()


class LeaderElector:
    """Acquire, then keep, the operator's Lease in `namespace` under `identity` (the pod's name)."""

    def __init__(self, client: kube.Kube, namespace: str, identity: str | None = None) -> None:
        self.client, self.namespace = client, namespace
        self.identity = identity or os.environ.get("POD_NAME") or os.uname().nodename

    def try_acquire(self) -> bool:
        """One round: True if this candidate holds the Lease afterwards."""
        lease = self.client.get("coordination.k8s.io/v1", "Lease", self.namespace, LEASE_NAME)
        now = datetime.now(UTC)
        action = decide(lease, self.identity, now)
        if action == "wait":
            return False
        body = lease_body(self.namespace, self.identity, now, lease)
        url = kube.path("coordination.k8s.io/v1", "Lease", self.namespace, None if lease is None else LEASE_NAME)
        try:
            self.client.request("POST" if lease is None else "PUT", url, body)
        except Exception as err:
            if kube.is_conflict(err):  # another candidate wrote first
                return False
            raise
        if action != "renew":
            log.info("became the leader (Lease %s/%s) as %s", self.namespace, LEASE_NAME, self.identity)
        return True

    def wait_until_leader(self) -> None:
        """Block until this candidate holds the Lease."""
        while not self._attempt():
            time.sleep(RENEW_SECONDS)

    def keep(self, on_lost: Callable[[], None]) -> threading.Thread:
        """Renew in the background; call `on_lost` once the Lease went unrenewed so long that another replica may
        take it over. A watcher keeps that deadline on its own clock: a renew call hanging on an unresponsive API
        server (up to kube.REQUEST_TIMEOUT) must not keep a lapsed leader acting beside the new one."""
        renewed = [time.monotonic()]
        lost = threading.Event()

        def renew() -> None:
            while not lost.wait(RENEW_SECONDS):
                started = time.monotonic()  # the Lease's renewTime is stamped before the write, not after it
                if self._attempt():
                    renewed[0] = started

        def watch() -> None:
            while (left := renewed[0] + LEASE_SECONDS - RENEW_SECONDS - time.monotonic()) > 0:
                time.sleep(left)
            lost.set()
            log.error("lost the Lease %s/%s; stopping", self.namespace, LEASE_NAME)
            on_lost()

        threading.Thread(target=renew, name="kiln-leader", daemon=True).start()
        watcher = threading.Thread(target=watch, name="kiln-leader-deadline", daemon=True)
        watcher.start()
        return watcher

    def _attempt(self) -> bool:
        try:
            return self.try_acquire()
        except Exception as err:  # the API server unreachable: not the leader this round
            log.warning("leader election: %s", err)
            return False
