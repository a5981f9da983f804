"""Benchmark: N TrainingJobs applied at once; how fast does the running operator turn each into a trainer Job?

Needs a running API server (KUBECONFIG) with the TrainingJob CRD installed and the operator already running.
The TrainingJobs are created suspended with serving disabled, so no trainer pod runs: this measures the
operator's apply -> Job path (watch, handler, six API writes), not scheduling or training.

Job creationTimestamp has 1 s resolution, so latency is measured locally: a watch on the Jobs (opened before
the first apply, from a known resourceVersion, so no event is missed) records when each Job arrives, and
latency is that arrival minus the moment its TrainingJob's POST was sent. Operator memory is sampled from
/proc/<pid>/status (VmRSS) when its pid is given.

    python bench/operator_apply.py --quick --kubeconfig ~/.kube/config --operator-pid 12345
"""

import argparse
import concurrent.futures
import os
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, cast

MANAGED_BY = "app.kubernetes.io/managed-by=kiln-operator"
SPEC: dict[str, Any] = {
    "data": {"dataset": "fake", "maxSamples": 64},
    "training": {"epochs": 1},
    "runPolicy": {"suspend": True},
    "serving": {"enabled": False},
}


def percentile(values: list[float], pct: float) -> float:
    """Nearest-rank percentile (no interpolation), so p99 of 50 samples is the largest but none."""
    if not values:
        return float("nan")
    ordered = sorted(values)
    rank = max(1, min(len(ordered), round(pct / 100 * len(ordered) + 0.5)))
    return ordered[rank - 1]


def rss_bytes(pid: int) -> int | None:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def cpu_seconds(pid: int) -> float | None:
    """User + system CPU time of a process so far."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return None
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


class RssSampler(threading.Thread):
    """Samples a process's resident memory every `interval` seconds; keeps the first, peak and last."""

    def __init__(self, pid: int, interval: float = 0.25) -> None:
        super().__init__(daemon=True)
        self.pid, self.interval = pid, interval
        self.first = self.peak = self.last = rss_bytes(pid)
        self.stopped = threading.Event()

    def run(self) -> None:
        while not self.stopped.wait(self.interval):
            value = rss_bytes(self.pid)
            if value is not None:
                self.last = value
                self.peak = max(self.peak or 0, value)


def _watch_events(batch: Any, namespace: str, resource_version: str) -> Iterator[dict[str, Any]]:
    """One watch of the kiln-managed Jobs in ``namespace`` from ``resource_version`` (ends after 5 s idle). The
    kubernetes client's watch module is untyped: its events are dicts with "type", "object" and "raw_object"."""
    from kubernetes import watch

    new_watch = cast(Callable[[], Any], watch.Watch)
    events: Iterator[dict[str, Any]] = new_watch().stream(
        batch.list_namespaced_job, namespace, label_selector=MANAGED_BY,
        resource_version=resource_version, timeout_seconds=5,
    )  # fmt: skip
    return events


class JobWatcher(threading.Thread):
    """Records the local arrival time of every kiln-managed Job in one namespace."""

    def __init__(self, batch: Any, namespace: str, resource_version: str) -> None:
        super().__init__(daemon=True)
        self.batch, self.namespace, self.resource_version = batch, namespace, resource_version
        self.seen: dict[str, float] = {}
        self.stopped = threading.Event()
        self.error: BaseException | None = None

    def run(self) -> None:
        try:
            while not self.stopped.is_set():
                for event in _watch_events(self.batch, self.namespace, self.resource_version):
                    arrived = time.perf_counter()
                    obj = event["raw_object"]
                    self.resource_version = obj["metadata"]["resourceVersion"]
                    if event["type"] == "ADDED":
                        self.seen.setdefault(obj["metadata"]["name"].removesuffix("-trainer"), arrived)
        except BaseException as err:  # reported in the results rather than lost in a thread
            self.error = err


def _trainingjob(name: str, namespace: str) -> dict[str, Any]:
    return {"apiVersion": "kiln.dev/v1alpha1", "kind": "TrainingJob",
            "metadata": {"name": name, "namespace": namespace, "labels": {"kiln.dev/bench": "operator-apply"}},
            "spec": SPEC}  # fmt: skip


def main(quick: bool, kubeconfig: str, operator_pid: int | None) -> str:
    """Apply 50 (quick) or 200 TrainingJobs at once; return the results as Markdown."""
    from kubernetes import client, config

    count, timeout = (50, 120.0) if quick else (200, 600.0)
    new_client = cast(Callable[..., client.ApiClient], config.new_client_from_config)  # untyped in the client
    api_client = new_client(config_file=kubeconfig)
    api_client.configuration.connection_pool_maxsize = 32
    core, batch, custom = (
        client.CoreV1Api(api_client),
        client.BatchV1Api(api_client),
        client.CustomObjectsApi(api_client),
    )
    namespace = f"kiln-bench-{uuid.uuid4().hex[:6]}"
    meta = client.V1ObjectMeta(name=namespace)
    core.create_namespace(client.V1Namespace(api_version="v1", kind="Namespace", metadata=meta))
    sampler = RssSampler(operator_pid) if operator_pid else None
    try:
        # Open the watch first, from the namespace's current resourceVersion, so no Job can be missed.
        listed = batch.list_namespaced_job(namespace, label_selector=MANAGED_BY)
        if listed.metadata is None or not listed.metadata.resource_version:
            raise RuntimeError(f"listing Jobs in {namespace} returned no resourceVersion to watch from")
        watcher = JobWatcher(batch, namespace, listed.metadata.resource_version)
        watcher.start()
        if sampler:
            sampler.start()
        names = [f"bench-{i:04d}" for i in range(count)]
        applied: dict[str, float] = {}

        def apply(name: str) -> None:
            applied[name] = time.perf_counter()
            custom.create_namespaced_custom_object("kiln.dev", "v1alpha1", namespace, "trainingjobs",
                                                   _trainingjob(name, namespace))  # fmt: skip

        cpu_before = cpu_seconds(operator_pid) if operator_pid else None
        began = time.perf_counter()
        with concurrent.futures.ThreadPoolExecutor(max_workers=16) as pool:
            list(pool.map(apply, names))
        all_applied = time.perf_counter() - began
        deadline = time.monotonic() + timeout
        while len(watcher.seen) < count and time.monotonic() < deadline and watcher.error is None:
            time.sleep(0.05)
        latencies = [watcher.seen[n] - applied[n] for n in names if n in watcher.seen]
        last_job = max(watcher.seen.values(), default=began) - began
        cpu_after = cpu_seconds(operator_pid) if operator_pid else None
    finally:
        if sampler:
            sampler.stopped.set()
        try:
            custom.delete_collection_namespaced_custom_object("kiln.dev", "v1alpha1", namespace, "trainingjobs")
            core.delete_namespace(namespace)
        except Exception:  # a control plane without a namespace controller keeps it Terminating; not an error
            pass
    watcher.stopped.set()

    def mib(value: int | None) -> str:
        return f"{value / 2**20:.0f} MiB" if value else "n/a"

    rows = [
        ("TrainingJobs applied at once", f"{count}"),
        ("time to apply all", f"{all_applied:.2f} s"),
        ("time until every Job exists", f"{last_job:.2f} s" if len(latencies) == count else
         f"{len(latencies)}/{count} Jobs after {timeout:.0f} s"),
        ("apply -> Job p50", f"{percentile(latencies, 50) * 1000:.0f} ms"),
        ("apply -> Job p99", f"{percentile(latencies, 99) * 1000:.0f} ms"),
        ("apply -> Job max", f"{max(latencies, default=float('nan')) * 1000:.0f} ms"),
        ("operator RSS before / peak / after", " / ".join(mib(v) for v in (sampler.first, sampler.peak, sampler.last))
         if sampler else "n/a (no --operator-pid)"),
    ]  # fmt: skip
    if cpu_before is not None and cpu_after is not None:
        rows.append(("operator CPU time until every Job exists", f"{cpu_after - cpu_before:.1f} s"))
    if watcher.error is not None:
        rows.append(("watch error", repr(watcher.error)))
    lines = [f"### Operator: {count} TrainingJobs applied at once", "", "| measure | value |", "|---|---|"]
    lines += [f"| {k} | {v} |" for k, v in rows]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="50 TrainingJobs instead of 200")
    parser.add_argument("--kubeconfig", default=os.environ.get("KUBECONFIG", os.path.expanduser("~/.kube/config")))
    parser.add_argument("--operator-pid", type=int, default=None, help="sample this process's RSS")
    cli = parser.parse_args()
    print(main(cli.quick, cli.kubeconfig, cli.operator_pid))
