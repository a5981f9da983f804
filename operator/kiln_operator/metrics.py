"""The operator's Prometheus metrics (prefix kiln_operator_, base units, small fixed label sets).

kopf exports no metrics of its own; `serve` starts prometheus_client's HTTP server from the startup handler.
"""

import contextlib
import functools
import inspect
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from typing import Any, Final, ParamSpec, TypeVar, cast

import kopf
import prometheus_client
from prometheus_client import Counter, Gauge, Histogram

from kiln import api

P = ParamSpec("P")
R = TypeVar("R")

TRAININGJOBS: Final = Gauge("kiln_operator_trainingjobs", "TrainingJobs by phase.", ["phase"])
PHASE_TRANSITIONS: Final = Counter("kiln_operator_phase_transitions", "TrainingJob phase transitions.", ["from", "to"])
HANDLER_DURATION: Final = Histogram(
    "kiln_operator_handler_duration_seconds", "Time spent in a kopf handler.", ["handler"]
)
HANDLER_ERRORS: Final = Counter(
    "kiln_operator_handler_errors",
    "Handler failures: unexpected exceptions and permanent errors (kopf.TemporaryError is a planned retry).",
    ["handler"],
)
TIME_TO_SERVING: Final = Histogram(
    "kiln_operator_time_to_serving_seconds",
    "From a TrainingJob's creation to its first available serving replica.",
    buckets=(30, 60, 120, 300, 600, 1200, 1800, 3600, 7200, 14400, 43200, 86400),
)

# Per TrainingJob, like kube-state-metrics' kube_pod_status_*: what the PrometheusRule alerts read, so an alert
# stops once its condition clears, the job is acknowledged (annotation kiln.dev/acknowledged: "true") or deleted.
CONDITIONS: Final = Gauge(
    "kiln_operator_trainingjob_condition",
    "1 while the TrainingJob's condition of this type is True, else 0.",
    ["namespace", "trainingjob", "type"],
)
INFO: Final = Gauge(
    "kiln_operator_trainingjob_info",
    "Always 1; the labels say the TrainingJob's phase and whether its owner acknowledged it.",
    ["namespace", "trainingjob", "phase", "acknowledged"],
)

_phases: dict[tuple[str, str], str] = {}
_info: dict[tuple[str, str], tuple[str, str]] = {}
_conditions: dict[tuple[str, str], set[str]] = {}
_phases_lock = threading.Lock()


def serve(port: int, host: str = "0.0.0.0") -> None:
    """Expose /metrics on host:port from a background thread."""
    prometheus_client.disable_created_metrics()  # type: ignore[no-untyped-call]
    prometheus_client.start_http_server(port, addr=host)


def instrumented(handler: str) -> Callable[[Callable[P, R]], Callable[P, R]]:
    """Time a handler (sync or async, as kopf calls either) and count its failures under one label."""

    def decorate(fn: Callable[P, R]) -> Callable[P, R]:
        @contextlib.contextmanager
        def measured() -> Iterator[None]:
            start = time.monotonic()
            try:
                yield
            except kopf.TemporaryError:
                raise
            except Exception:
                HANDLER_ERRORS.labels(handler).inc()
                raise
            finally:
                HANDLER_DURATION.labels(handler).observe(time.monotonic() - start)

        if inspect.iscoroutinefunction(fn):

            @functools.wraps(fn)
            async def awaited(*args: P.args, **kwargs: P.kwargs) -> Any:
                with measured():
                    return await fn(*args, **kwargs)

            return cast(Callable[P, R], awaited)

        @functools.wraps(fn)
        def wrapper(*args: P.args, **kwargs: P.kwargs) -> R:
            with measured():
                return fn(*args, **kwargs)

        return wrapper

    return decorate


def _publish_phases() -> None:
    counts = dict.fromkeys(api.phases(), 0)
    for phase in _phases.values():
        if phase in counts:
            counts[phase] += 1
    for phase, count in counts.items():
        TRAININGJOBS.labels(phase).set(count)


def record_phase(namespace: str, name: str, phase: str | None) -> None:
    """Remember a job's current phase (None forgets it) and refresh the by-phase gauge."""
    with _phases_lock:
        if phase:
            _phases[(namespace, name)] = phase
        else:
            _phases.pop((namespace, name), None)
        _publish_phases()


def record_conditions(
    namespace: str, name: str, phase: str, conditions: Mapping[str, bool], acknowledged: bool
) -> None:
    """Publish one job's conditions (True/False) and its phase and acknowledgement."""
    key, labels = (namespace, name), (phase, "true" if acknowledged else "false")
    with _phases_lock:
        if _info.get(key, labels) != labels:
            INFO.remove(namespace, name, *_info[key])
        INFO.labels(namespace, name, *labels).set(1)
        _info[key] = labels
        for type_ in _conditions.get(key, set()) - set(conditions):
            CONDITIONS.remove(namespace, name, type_)
        for type_, true in conditions.items():
            CONDITIONS.labels(namespace, name, type_).set(1 if true else 0)
        _conditions[key] = set(conditions)


def forget_job(namespace: str, name: str) -> None:
    """Drop every series of a deleted TrainingJob, so its alerts end with it."""
    key = (namespace, name)
    with _phases_lock:
        if key in _info:
            INFO.remove(namespace, name, *_info.pop(key))
        for type_ in _conditions.pop(key, set()):
            CONDITIONS.remove(namespace, name, type_)
    record_phase(namespace, name, None)


def tracked_jobs() -> int:
    with _phases_lock:
        return len(_phases)


def record_transition(old: str | None, new: api.Phase) -> None:
    PHASE_TRANSITIONS.labels(old or "None", new).inc()
