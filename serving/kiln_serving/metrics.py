"""Prometheus metrics of one server, in their own registry so two servers in one process never collide, and
the same numbers in the shape of Triton's statistics extension.

Names carry the `kiln_serving_` prefix and base units (seconds, items); labels are the model, its version,
the HTTP status and the provider: small fixed sets, never anything taken per request. A client that hung up
before its answer is counted under status CLIENT_CLOSED (nginx's 499), not as a server error.
"""

import time
from dataclasses import dataclass, field

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

LATENCY_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024)
CLIENT_CLOSED = 499
# A gRPC call whose deadline (grpc-timeout) passed before its answer: what grpc-gateway makes DEADLINE_EXCEEDED in
# HTTP terms. The server did not answer in time, so unlike CLIENT_CLOSED it counts as a failure.
DEADLINE_EXCEEDED = 504


@dataclass
class Duration:
    """A count and its total nanoseconds, as Triton's statistics report them."""

    count: int = 0
    ns: int = 0

    def add(self, seconds: float) -> None:
        self.count += 1
        self.ns += int(seconds * 1e9)

    def to_dict(self) -> dict[str, int]:
        return {"count": self.count, "ns": self.ns}


_PHASES = ("compute_input", "compute_infer", "compute_output")


@dataclass
class Statistics:
    """One model's totals for GET /v2/models/{name}/stats (Triton's statistics extension)."""

    success: Duration = field(default_factory=Duration)
    fail: Duration = field(default_factory=Duration)
    queue: Duration = field(default_factory=Duration)
    compute_input: Duration = field(default_factory=Duration)
    compute_infer: Duration = field(default_factory=Duration)
    compute_output: Duration = field(default_factory=Duration)
    # Per runtime call's batch size: its compute_input, compute_infer and compute_output (Triton's batch_stats).
    batches: dict[int, tuple[Duration, Duration, Duration]] = field(default_factory=dict)
    inference_count: int = 0
    execution_count: int = 0
    last_inference_ms: int = 0


class ServingMetrics:
    """Every series the server exports, registered on one CollectorRegistry."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry if registry is not None else CollectorRegistry()
        r = self.registry
        model = ["model", "version"]
        self.requests = Counter(
            "kiln_serving_requests_total",
            "Inference requests by outcome (HTTP status).",
            [*model, "status"],
            registry=r,
        )
        self.request_seconds = Histogram(
            "kiln_serving_request_duration_seconds",
            "Inference request latency, body read to response.",
            model,
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.queue_seconds = Histogram(
            "kiln_serving_queue_duration_seconds",
            "Time a request waited for the runtime (batching delay included).",
            model,
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.compute_seconds = Histogram(
            "kiln_serving_compute_duration_seconds",
            "Time of one runtime call (one batch).",
            model,
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.batch_size = Histogram(
            "kiln_serving_batch_size", "Items per runtime call.", model, buckets=BATCH_BUCKETS, registry=r
        )
        self.inferences = Counter(
            "kiln_serving_inferences_total", "Items inferred (batch elements).", model, registry=r
        )
        self.in_flight = Gauge(
            "kiln_serving_requests_in_flight", "Inference requests being handled.", model, registry=r
        )
        self.queue_depth = Gauge("kiln_serving_queue_depth", "Requests waiting for the runtime.", model, registry=r)
        self.load_seconds = Gauge(
            "kiln_serving_model_load_seconds", "Time to verify, load and warm up the model.", model, registry=r
        )
        self.ready = Gauge("kiln_serving_model_ready", "1 when the model serves requests.", model, registry=r)
        self.provider = Gauge(
            "kiln_serving_model_provider_info",
            "The execution provider the session really runs on (value 1).",
            [*model, "provider"],
            registry=r,
        )

    def for_model(self, name: str, version: str) -> "ModelMetrics":
        """The series of one model, labels bound once."""
        labels = {"model": name, "version": version}
        return ModelMetrics(
            parent=self,
            name=name,
            version=version,
            request_seconds=self.request_seconds.labels(**labels),
            queue_seconds=self.queue_seconds.labels(**labels),
            compute_seconds=self.compute_seconds.labels(**labels),
            batch_size=self.batch_size.labels(**labels),
            inferences=self.inferences.labels(**labels),
            in_flight=self.in_flight.labels(**labels),
            queue_depth=self.queue_depth.labels(**labels),
        )


@dataclass
class ModelMetrics:
    """One model's bound series; the batcher and the routes record into these."""

    parent: ServingMetrics
    name: str
    version: str
    request_seconds: Histogram
    queue_seconds: Histogram
    compute_seconds: Histogram
    batch_size: Histogram
    inferences: Counter
    in_flight: Gauge
    queue_depth: Gauge
    statistics: Statistics = field(default_factory=Statistics)
    # The requests counter's series by (status, known model), bound once: labels() per request was a lock and a
    # few dict operations on every request's path.
    _requests: dict[tuple[int, bool], Counter] = field(default_factory=dict)

    def request(self, status: int, seconds: float | None, known_model: bool = True) -> None:
        """Count one inference request; unknown model names are counted under empty labels, not their own."""
        series = self._requests.get((status, known_model))
        if series is None:
            model, version = (self.name, self.version) if known_model else ("", "")
            series = self._requests[status, known_model] = self.parent.requests.labels(model, version, str(status))
        series.inc()
        if seconds is not None and known_model:
            self.request_seconds.observe(seconds)
            if status != CLIENT_CLOSED:
                (self.statistics.success if status < 400 else self.statistics.fail).add(seconds)

    def queued(self, seconds: float) -> None:
        self.queue_seconds.observe(seconds)
        self.statistics.queue.add(seconds)

    def batch(self, items: int, seconds: float, input_seconds: float = 0.0, output_seconds: float = 0.0) -> None:
        """One runtime call of `seconds` (worker thread), with what merging its requests' inputs and splitting its
        outputs among them took (Triton's compute_input and compute_output)."""
        self.batch_size.observe(items)
        self.inferences.inc(items)
        self.compute_seconds.observe(seconds)
        stats = self.statistics
        by_size = stats.batches.setdefault(items, (Duration(), Duration(), Duration()))
        for durations in ((stats.compute_input, stats.compute_infer, stats.compute_output), by_size):
            for duration, spent in zip(durations, (input_seconds, seconds, output_seconds), strict=True):
                duration.add(spent)
        stats.inference_count += items
        stats.execution_count += 1
        stats.last_inference_ms = int(time.time() * 1000)

    def triton_statistics(self) -> dict[str, object]:
        """This model's entry of Triton's `model_stats` list."""
        stats = self.statistics
        zero = Duration().to_dict()
        return {
            "name": self.name,
            "version": self.version,
            "last_inference": stats.last_inference_ms,
            "inference_count": stats.inference_count,
            "execution_count": stats.execution_count,
            "inference_stats": {
                "success": stats.success.to_dict(),
                "fail": stats.fail.to_dict(),
                "queue": stats.queue.to_dict(),
                "compute_input": stats.compute_input.to_dict(),
                "compute_infer": stats.compute_infer.to_dict(),
                "compute_output": stats.compute_output.to_dict(),
                "cache_hit": zero,
                "cache_miss": zero,
            },
            "batch_stats": [
                {"batch_size": size, **{k: d.to_dict() for k, d in zip(_PHASES, durations, strict=True)}}
                for size, durations in sorted(stats.batches.items())  # one C call: the worker adds none meanwhile
            ],
        }

    def loaded(self, ready: bool, provider: str, seconds: float) -> None:
        labels = {"model": self.name, "version": self.version}
        self.parent.ready.labels(**labels).set(1 if ready else 0)
        if ready:
            self.parent.load_seconds.labels(**labels).set(seconds)
            self.parent.provider.labels(**labels, provider=provider).set(1)
