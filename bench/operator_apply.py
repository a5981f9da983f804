"""Benchmark: N TrainingJobs applied at once, side by side with Kubernetes' own Job controller and bare Jobs.

Three bursts of N objects, one after the other, on the same control plane, each created the same way (16
client threads):

- **kiln**: N TrainingJobs (suspended, serving disabled, so no trainer pod runs): apply -> the operator's Job.
- **Job controller**: N plain Jobs -> the first Pod each (no scheduler, so the Pods stay Pending): the peer
  reactive controller, with client-go's default rate limit.
- **bare Jobs**: N suspended Jobs nothing reacts to: the API server's own limit, POST to answer.
- **bare TrainingJobs** (bench/cluster.py runs it before starting the operator): N TrainingJobs with no
  operator: what the API server alone needs to accept them.

Object creationTimestamps have 1 s resolution, so latency is measured locally: a watch opened before the first
create (from a known resourceVersion, so no event is missed) records when each object arrives, and latency is
that arrival minus the moment its POST was sent. Operator memory is sampled from /proc/<pid>/status.

    python bench/operator_apply.py --quick --kubeconfig ~/.kube/config --operator-pid 12345
"""

import argparse
import concurrent.futures
import dataclasses
import os
import threading
import time
import uuid
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any, cast

from machine import cpu_seconds

MANAGED_BY = "app.kubernetes.io/managed-by=kiln-operator"
JOB_NAME_LABEL = "batch.kubernetes.io/job-name"
THREADS = 16
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


Lister = Callable[..., Any]


class ArrivalWatcher(threading.Thread):
    """Records the local arrival time of each watched object, keyed by `key(object)` (None: not counted)."""

    def __init__(self, lister: Lister, namespace: str, selector: str, key: Callable[[dict[str, Any]], str | None]):
        super().__init__(daemon=True)
        self.lister, self.namespace, self.selector, self.key = lister, namespace, selector, key
        listed = lister(namespace, label_selector=selector)
        if listed.metadata is None or not listed.metadata.resource_version:
            raise RuntimeError(f"listing in {namespace} returned no resourceVersion to watch from")
        self.resource_version: str = listed.metadata.resource_version
        self.seen: dict[str, float] = {}
        self.stopped = threading.Event()
        self.error: BaseException | None = None

    def _events(self) -> Iterator[dict[str, Any]]:
        """One watch from the last resourceVersion (ends after 5 s idle). The kubernetes client's watch module
        is untyped: its events are dicts with "type", "object" and "raw_object"."""
        from kubernetes import watch

        new_watch = cast(Callable[[], Any], watch.Watch)
        events: Iterator[dict[str, Any]] = new_watch().stream(
            self.lister, self.namespace, label_selector=self.selector,
            resource_version=self.resource_version, timeout_seconds=5,
        )  # fmt: skip
        return events

    def run(self) -> None:
        try:
            while not self.stopped.is_set():
                for event in self._events():
                    arrived = time.perf_counter()
                    obj = event["raw_object"]
                    self.resource_version = obj["metadata"]["resourceVersion"]
                    key = self.key(obj) if event["type"] == "ADDED" else None
                    if key is not None:
                        self.seen.setdefault(key, arrived)
        except BaseException as err:  # reported in the results rather than lost in a thread
            self.error = err


@dataclasses.dataclass
class Burst:
    """One column: N creates and, per object, the latency to what answers it."""

    count: int
    create_all: float  # seconds from the first POST sent to the last answered
    post_seconds: list[float]  # each POST's round trip
    latencies: list[float]  # POST sent -> the answering object seen (for bare Jobs: the POST's own answer)
    last: float | None  # seconds from the first POST until the last answering object (None: not all came)
    error: str = ""

    def row(self, measure: str) -> str:
        if measure == "all":
            return (
                f"{self.last:.2f} s" if self.last is not None else f"{len(self.latencies)}/{self.count} after timeout"
            )
        pct = {"p50": 50.0, "p99": 99.0, "max": 100.0}[measure]
        return f"{percentile(self.latencies, pct) * 1000:.0f} ms"


def burst(names: list[str], create: Callable[[str], object], watcher: ArrivalWatcher | None, timeout: float) -> Burst:
    """POST one object per name from THREADS threads; wait until `watcher` has seen an answer to each."""
    sent: dict[str, float] = {}
    took: dict[str, float] = {}

    def post(name: str) -> None:
        sent[name] = time.perf_counter()
        create(name)
        took[name] = time.perf_counter() - sent[name]

    if watcher is not None:
        watcher.start()
    began = time.perf_counter()
    with concurrent.futures.ThreadPoolExecutor(max_workers=THREADS) as pool:
        list(pool.map(post, names))
    create_all = time.perf_counter() - began
    posts = [took[n] for n in names]
    if watcher is None:
        return Burst(len(names), create_all, posts, posts, create_all)
    deadline = time.monotonic() + timeout
    while len(watcher.seen) < len(names) and time.monotonic() < deadline and watcher.error is None:
        time.sleep(0.05)
    watcher.stopped.set()
    latencies = [watcher.seen[n] - sent[n] for n in names if n in watcher.seen]
    last = max(watcher.seen.values()) - began if len(latencies) == len(names) else None
    return Burst(len(names), create_all, posts, latencies, last, repr(watcher.error) if watcher.error else "")


def _trainingjob(name: str, namespace: str) -> dict[str, Any]:
    return {"apiVersion": "kiln.dev/v1alpha1", "kind": "TrainingJob",
            "metadata": {"name": name, "namespace": namespace, "labels": {"kiln.dev/bench": "operator-apply"}},
            "spec": SPEC}  # fmt: skip


def plain_job(name: str, suspend: bool) -> dict[str, Any]:
    """A one-pod Job whose Pod is never scheduled (the bench runs no scheduler and no node)."""
    container = {"name": "main", "image": "kiln-bench.invalid/none:1", "command": ["true"]}
    return {"apiVersion": "batch/v1", "kind": "Job", "metadata": {"name": name},
            "spec": {"suspend": suspend, "backoffLimit": 0,
                     "template": {"spec": {"restartPolicy": "Never", "containers": [container]}}}}  # fmt: skip


@dataclasses.dataclass
class Results:
    kiln: Burst
    job_controller: Burst
    bare: Burst
    namespace: str  # the kiln burst's: where the audit log's TrainingJob writes are
    names: list[str]
    operator_rss: tuple[int | None, int | None, int | None] | None
    cpu: dict[str, float]  # CPU seconds each process used during the kiln burst


def _default_account_exists(core: Any, namespace: str) -> bool:
    try:
        core.read_namespaced_service_account("default", namespace)
        return True
    except Exception:
        return False


def _settled(custom: Any, namespace: str, count: int) -> bool:
    """Every TrainingJob of the burst has a phase: the operator has written the first status of each."""
    items = custom.list_namespaced_custom_object("kiln.dev", "v1alpha1", namespace, "trainingjobs")["items"]
    return len(items) == count and all((tj.get("status") or {}).get("phase") for tj in items)


def _clients(kubeconfig: str) -> tuple[Any, Any, Any]:
    """Core, batch and custom-objects APIs on one pool (Any: they take plain dicts, which their stubs deny)."""
    from kubernetes import client, config

    new_client = cast(Callable[..., client.ApiClient], config.new_client_from_config)  # untyped in the client
    api_client = new_client(config_file=kubeconfig)
    api_client.configuration.connection_pool_maxsize = 2 * THREADS
    return client.CoreV1Api(api_client), client.BatchV1Api(api_client), client.CustomObjectsApi(api_client)


def bare_trainingjobs(quick: bool, kubeconfig: str) -> Burst:
    """N TrainingJobs POSTed while no operator runs: what the API server alone needs to accept them (schema and
    CEL validation included). They are deleted again, and gone, before this returns."""
    core, _, custom = _clients(kubeconfig)
    namespace = f"kiln-bench-tj-{uuid.uuid4().hex[:6]}"
    core.create_namespace({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": namespace}})
    names = [f"bench-{i:04d}" for i in range(50 if quick else 200)]

    def apply(name: str) -> None:
        custom.create_namespaced_custom_object(
            "kiln.dev", "v1alpha1", namespace, "trainingjobs", _trainingjob(name, namespace)
        )

    result = burst(names, apply, None, 0.0)
    custom.delete_collection_namespaced_custom_object("kiln.dev", "v1alpha1", namespace, "trainingjobs")
    while custom.list_namespaced_custom_object("kiln.dev", "v1alpha1", namespace, "trainingjobs")["items"]:
        time.sleep(0.1)
    core.delete_namespace(namespace)
    return result


def measure(quick: bool, kubeconfig: str, operator_pid: int | None, pids: Mapping[str, int] | None = None) -> Results:
    """The three bursts, N = 50 (quick) or 200, in their own namespaces, deleted afterwards. `pids` (the
    operator and the control plane's processes, by name) get their CPU time during the kiln burst reported."""
    count, timeout = (50, 120.0) if quick else (200, 600.0)
    core, batch, custom = _clients(kubeconfig)
    run = uuid.uuid4().hex[:6]
    spaces = {column: f"kiln-bench-{column}-{run}" for column in ("kiln", "jobs", "bare")}
    for namespace in spaces.values():
        core.create_namespace({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": namespace}})
    names = [f"bench-{i:04d}" for i in range(count)]
    try:
        ns = spaces["kiln"]
        watcher = ArrivalWatcher(batch.list_namespaced_job, ns, MANAGED_BY,
                                 lambda job: job["metadata"]["name"].removesuffix("-trainer"))  # fmt: skip
        sampler = RssSampler(operator_pid) if operator_pid else None
        if sampler:
            sampler.start()
        pids = (
            dict(pids or {}) | ({"kiln operator": operator_pid} if operator_pid else {}) | {"bench client": os.getpid()}
        )
        cpu_before = {name: cpu_seconds(pid) for name, pid in pids.items()}

        def apply(name: str) -> None:
            custom.create_namespaced_custom_object("kiln.dev", "v1alpha1", ns, "trainingjobs", _trainingjob(name, ns))

        kiln = burst(names, apply, watcher, timeout)
        cpu_after = {name: cpu_seconds(pid) for name, pid in pids.items()}
        if sampler:
            sampler.stopped.set()
        # Let the operator finish its follow-up writes (first status of each) before the next burst.
        deadline = time.monotonic() + timeout
        while not _settled(custom, ns, count) and time.monotonic() < deadline:
            time.sleep(0.2)

        bare_ns = spaces["bare"]
        bare = burst(names, lambda n: batch.create_namespaced_job(bare_ns, plain_job(n, True)), None, timeout)

        jobs_ns = spaces["jobs"]
        while not _default_account_exists(core, jobs_ns):  # pods of a namespace need its default account
            time.sleep(0.1)
        pods = ArrivalWatcher(core.list_namespaced_pod, jobs_ns, JOB_NAME_LABEL,
                              lambda pod: pod["metadata"]["labels"].get(JOB_NAME_LABEL))  # fmt: skip
        job_controller = burst(names, lambda n: batch.create_namespaced_job(jobs_ns, plain_job(n, False)), pods,
                               timeout)  # fmt: skip
    finally:
        for namespace in spaces.values():
            try:
                core.delete_namespace(namespace)
            except Exception:  # a control plane without a namespace controller keeps it Terminating
                pass
    rss = (sampler.first, sampler.peak, sampler.last) if sampler else None
    cpu = {name: after - before for name, before in cpu_before.items()
           if before is not None and (after := cpu_after[name]) is not None}  # fmt: skip
    return Results(kiln, job_controller, bare, spaces["kiln"], names, rss, cpu)


def render(results: Results, writes: Mapping[str, str] | None = None, alone: Burst | None = None) -> str:
    """The side-by-side table (with `alone`, bare_trainingjobs' burst, as a fourth column), then kiln's own
    rows (memory, CPU, and the API writes counted by `writes`)."""
    k, j, b = results.kiln, results.job_controller, results.bare
    columns = [("kiln: TrainingJob → Job", k), ("Job controller: Job → first Pod", j), ("API server: bare Job POST", b)]
    if alone is not None:
        columns.append(("API server, no operator: bare TrainingJob POST", alone))
    lines = [
        f"### {k.count} objects created at once, side by side",
        "",
        "| measure | " + " | ".join(title for title, _ in columns) + " |",
        "|---|" + "---|" * len(columns),
        "| time to create all | " + " | ".join(f"{c.create_all:.2f} s" for _, c in columns) + " |",
    ]
    measures = {"all": "time until every answer exists", "p50": "p50", "p99": "p99", "max": "max"}
    lines += [f"| {label} | " + " | ".join(c.row(m) for _, c in columns) + " |" for m, label in measures.items()]
    median_ratio = percentile(j.latencies, 50) / percentile(k.latencies, 50)
    lines += ["", f"kiln's median is {median_ratio:.1f}× faster than the Job controller's.", ""]

    def mib(value: int | None) -> str:
        return f"{value / 2**20:.0f} MiB" if value else "n/a"

    rows = [("operator RSS before / peak / after", " / ".join(mib(v) for v in results.operator_rss)
             if results.operator_rss else "n/a (no --operator-pid)")]  # fmt: skip
    if results.cpu:
        used = ", ".join(f"{name} {seconds:.1f}" for name, seconds in results.cpu.items())
        rows.append(("CPU seconds until every Job exists", f"{used} (in {k.last or float('nan'):.1f} s wall)"))
    rows += list((writes or {}).items())
    rows += [(f"{name} error", burst_.error) for name, burst_ in (("kiln", k), ("Job controller", j)) if burst_.error]
    lines += ["| kiln | value |", "|---|---|", *[f"| {key} | {value} |" for key, value in rows]]
    return "\n".join(lines) + "\n"


def main(quick: bool, kubeconfig: str, operator_pid: int | None) -> str:
    return render(measure(quick, kubeconfig, operator_pid))


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="50 objects per burst instead of 200")
    parser.add_argument("--kubeconfig", default=os.environ.get("KUBECONFIG", os.path.expanduser("~/.kube/config")))
    parser.add_argument("--operator-pid", type=int, default=None, help="sample this process's RSS")
    cli = parser.parse_args()
    print(main(cli.quick, cli.kubeconfig, cli.operator_pid))
