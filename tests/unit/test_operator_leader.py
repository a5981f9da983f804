"""Leader election's decisions over the Lease as read: one holder at a time, takeover only after expiry, and a
leader that stops at its Lease deadline even when the API server hangs."""

import http.server
import json
import threading
from datetime import UTC, datetime, timedelta

import pytest
from kubernetes import client

from kiln_operator import kube, leader

NOW = datetime(2026, 11, 28, 10, 0, 0, tzinfo=UTC)


def lease(holder: str, renewed: datetime, transitions: int = 0) -> dict[str, object]:
    return {
        "metadata": {"name": leader.LEASE_NAME, "namespace": "kiln-system", "resourceVersion": "42"},
        "spec": {"holderIdentity": holder, "leaseDurationSeconds": leader.LEASE_SECONDS,
                 "acquireTime": renewed.strftime(leader.MICRO_TIME), "renewTime": renewed.strftime(leader.MICRO_TIME),
                 "leaseTransitions": transitions},
    }  # fmt: skip


def test_a_fresh_lease_is_created_and_the_holder_renews_it() -> None:
    assert leader.decide(None, "kiln-a", NOW) == "create"
    assert leader.decide(lease("kiln-a", NOW - timedelta(seconds=60)), "kiln-a", NOW) == "renew"


def test_another_replica_waits_while_the_lease_is_fresh_and_takes_it_once_expired() -> None:
    fresh = lease("kiln-a", NOW - timedelta(seconds=leader.LEASE_SECONDS - 1))
    expired = lease("kiln-a", NOW - timedelta(seconds=leader.LEASE_SECONDS))
    assert leader.decide(fresh, "kiln-b", NOW) == "wait"
    assert leader.decide(expired, "kiln-b", NOW) == "take"


def test_a_takeover_writes_against_the_version_read_and_counts_a_transition() -> None:
    before = lease("kiln-a", NOW - timedelta(minutes=5), transitions=2)
    taken = leader.lease_body("kiln-system", "kiln-b", NOW, before)
    assert taken["metadata"]["resourceVersion"] == "42"  # a racing candidate's write then conflicts (409)
    assert taken["spec"]["holderIdentity"] == "kiln-b" and taken["spec"]["leaseTransitions"] == 3
    assert taken["spec"]["acquireTime"] == taken["spec"]["renewTime"] == NOW.strftime(leader.MICRO_TIME)
    renewed = leader.lease_body("kiln-system", "kiln-a", NOW, before)
    assert renewed["spec"]["acquireTime"] == before["spec"]["acquireTime"]  # type: ignore[index]
    assert renewed["spec"]["leaseTransitions"] == 2
    assert "resourceVersion" not in leader.lease_body("kiln-system", "kiln-a", NOW, None)["metadata"]


def test_a_standby_answers_the_liveness_probe_and_frees_the_port_for_kopf() -> None:
    import socket
    import urllib.request

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    with leader.standby_health("127.0.0.1", port):
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=10) as answer:
            assert answer.status == 200
    with socket.socket() as again:
        again.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        again.bind(("127.0.0.1", port))  # free again: kopf can serve its own endpoint


class _HungApiServer(http.server.ThreadingHTTPServer):
    """A loopback API server that answers the client's start-up calls (version, discovery) and then hangs on
    every other request, as an overloaded or partitioned kube-apiserver does."""

    def __init__(self) -> None:
        self.release = threading.Event()
        self.hanging = threading.Event()  # a request is being held
        answers = {"/version": {"gitVersion": "v1.36.3"}, "/api": {"kind": "APIVersions", "versions": ["v1"]},
                   "/apis": {"kind": "APIGroupList", "apiVersion": "v1", "groups": []}}  # fmt: skip
        server = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def _answer(self) -> None:
                path = self.path.split("?")[0]
                if path not in answers:
                    server.hanging.set()
                    server.release.wait(60)
                    return
                body = json.dumps(answers[path]).encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            do_GET = do_PUT = do_POST = _answer

            def log_message(self, *_: object) -> None:
                pass

        super().__init__(("127.0.0.1", 0), Handler)
        self.daemon_threads = True


def test_a_leader_whose_renewal_hangs_gives_up_at_the_lease_deadline_not_when_the_call_returns(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(leader, "LEASE_SECONDS", 1.2)
    monkeypatch.setattr(leader, "RENEW_SECONDS", 0.2)
    api = _HungApiServer()
    threading.Thread(target=api.serve_forever, daemon=True).start()
    try:
        configuration = client.Configuration()
        configuration.host = f"http://127.0.0.1:{api.server_address[1]}"
        elector = leader.LeaderElector(kube.Kube(configuration), "kiln-system", "kiln-a")
        lost = threading.Event()
        elector.keep(on_lost=lost.set)
        assert api.hanging.wait(20), "the renewal never reached the API server"
        # The renewal now waits on kube.REQUEST_TIMEOUT (30 s read); the Lease lapses long before that.
        assert lost.wait(20), "the leader kept acting while its renewal hung past the Lease deadline"
        assert not api.release.is_set()
    finally:
        api.release.set()
        api.shutdown()
        api.server_close()
