"""Prometheus metrics of one server, in their own registry so two servers in one process never collide.

Names carry the `kiln_serving_` prefix and base units (seconds, items); labels are the model, its version,
the HTTP status and the provider: small fixed sets, never anything taken per request.
"""

from dataclasses import dataclass

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

LATENCY_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024)


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

    def request(self, status: int, seconds: float | None, known_model: bool = True) -> None:
        """Count one inference request; unknown model names are counted under empty labels, not their own."""
        model, version = (self.name, self.version) if known_model else ("", "")
        self.parent.requests.labels(model=model, version=version, status=str(status)).inc()
        if seconds is not None and known_model:
            self.request_seconds.observe(seconds)

    def batch(self, items: int, seconds: float) -> None:
        self.batch_size.observe(items)
        self.inferences.inc(items)
        self.compute_seconds.observe(seconds)

    def loaded(self, ready: bool, provider: str, seconds: float) -> None:
        labels = {"model": self.name, "version": self.version}
        self.parent.ready.labels(**labels).set(1 if ready else 0)
        if ready:
            self.parent.load_seconds.labels(**labels).set(seconds)
            self.parent.provider.labels(**labels, provider=provider).set(1)
