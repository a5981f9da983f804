"""Server settings, and the CPU budget a container really has (its cgroup quota, not the host's cores)."""

import dataclasses
import math
import os
from dataclasses import dataclass
from pathlib import Path

from kiln import api
from kiln.api import constants


@dataclass(frozen=True)
class ServingConfig:
    """Everything `kiln serve` can be told; defaults match the TrainingJob's ServingSpec."""

    # A trainer output folder (model-card.json + models/) or a folder holding a plain model.onnx.
    model_dir: Path
    # Variant to serve from the card; None = the card's selected one.
    variant: str | None = None
    # Name clients address; None = the card's name, else the folder's.
    model_name: str | None = None
    host: str = "0.0.0.0"
    port: int = constants.SERVING_HTTP_PORT
    # The Open Inference Protocol over gRPC (tritonclient.grpc, KServe's InferenceGRPCClient); 0 = off.
    grpc_port: int = constants.SERVING_GRPC_PORT
    # Dynamic batching: most items in one session run, and how long the oldest request may wait for
    # others (0 = batching off, every request runs alone).
    max_batch_size: int = 32
    max_queue_delay_microseconds: int = 2000
    # Requests waiting for the runtime beyond which the server answers 503 + Retry-After.
    max_queue_size: int = 512
    # Largest request body accepted (after decompression); larger ones get 413.
    max_body_bytes: int = 64 * 1024 * 1024
    # Large bodies (JSON decode, image decode, gunzip) handled at once; more wait, so memory stays bounded.
    max_concurrent_large_requests: int = 2
    # Accept NaN and infinities in float inputs (refused with 400 by default: a quantised model answers
    # them confidently and wrongly).
    allow_non_finite: bool = False
    # onnxruntime intra-op threads; None = the container's CPU quota.
    intra_op_threads: int | None = None
    # Let idle onnxruntime threads spin-wait: lower latency on dedicated cores, wasted CPU on shared ones.
    ort_spinning: bool = False
    # Execution providers in order of preference (e.g. ("tensorrt", "cuda", "cpu")); None = auto.
    providers: tuple[str, ...] | None = None
    # Serve on CPU when an accelerator was asked for but is not really active (else: not ready).
    allow_cpu_fallback: bool = False
    # Where the TensorRT provider caches built engines (they take minutes to build).
    trt_cache_dir: Path | None = None
    # Load the card's offline-optimised graph when it has one.
    use_optimized: bool = False
    # Connection hygiene (connections.py): largest request head (431 above), how long a head may take to
    # arrive (the first one counted from connecting) and a body may pause (408 after), how long an idle
    # keep-alive connection stays open, and the most open connections (503 at once above; also kept below the
    # file-descriptor limit).
    max_header_bytes: int = 64 * 1024
    header_timeout_seconds: float = 10.0
    body_timeout_seconds: float = 30.0
    keep_alive_timeout_seconds: float = 30.0
    max_connections: int = 2048
    # How long shutdown waits for in-flight requests before closing connections.
    graceful_shutdown_seconds: float = 30.0
    access_log: bool = False

    def __post_init__(self) -> None:
        # Fail with the flag's name, so a typo in a Deployment's args reads as one.
        checks = {
            "max_batch_size": self.max_batch_size >= 1,
            "max_queue_delay_microseconds": self.max_queue_delay_microseconds >= 0,
            "max_queue_size": self.max_queue_size >= 1,
            "max_body_bytes": self.max_body_bytes >= 1,
            "max_concurrent_large_requests": self.max_concurrent_large_requests >= 1,
            "intra_op_threads": self.intra_op_threads is None or self.intra_op_threads >= 1,
            "port": 0 <= self.port <= 65535,
            "grpc_port": 0 <= self.grpc_port <= 65535,
            "max_header_bytes": self.max_header_bytes >= 1024,
            "header_timeout_seconds": self.header_timeout_seconds > 0,
            "body_timeout_seconds": self.body_timeout_seconds > 0,
            "keep_alive_timeout_seconds": self.keep_alive_timeout_seconds > 0,
            "max_connections": self.max_connections >= 1,
        }
        for field, ok in checks.items():
            if not ok:
                raise ValueError(f"{field}: invalid value {getattr(self, field)!r}")

    @classmethod
    def from_spec(cls, model_dir: Path, serving: api.ServingSpec, **settings: object) -> "ServingConfig":
        """The one ServingSpec -> ServingConfig mapping. `auto` leaves the choice to the model card, which
        records the variant the compile step selected; `settings` are the fields a spec does not carry."""
        variant = None if serving.variant == "auto" else serving.variant
        base = cls(
            model_dir=model_dir,
            variant=variant,
            max_batch_size=serving.max_batch_size,
            max_queue_delay_microseconds=serving.max_queue_delay_microseconds,
        )
        return dataclasses.replace(base, **settings)  # type: ignore[arg-type]

    @property
    def batching(self) -> bool:
        """Whether requests are merged at all."""
        return self.max_queue_delay_microseconds > 0 and self.max_batch_size > 1

    def threads(self) -> int:
        """The intra-op thread count actually used."""
        return self.intra_op_threads or cpu_quota()


def _cgroup_paths(proc_cgroup: Path) -> dict[str, str]:
    """Controller -> this process's cgroup path, from /proc/self/cgroup ("" is the unified v2 hierarchy)."""
    paths: dict[str, str] = {}
    try:
        lines = proc_cgroup.read_text().splitlines()
    except OSError:
        return paths
    for line in lines:
        parts = line.split(":", 2)
        if len(parts) == 3:
            for controller in parts[1].split(","):
                paths[controller] = parts[2]
    return paths


def _read_v2(path: Path) -> float | None:
    """CPUs allowed by a cgroup v2 `cpu.max` ("max 100000" = unlimited, "150000 100000" = 1.5)."""
    try:
        quota, period = path.read_text().split()[:2]
    except (OSError, ValueError):
        return None
    if quota == "max" or float(period) <= 0:
        return None
    return float(quota) / float(period)


def _read_v1(folder: Path) -> float | None:
    """CPUs allowed by cgroup v1 `cpu.cfs_quota_us` / `cpu.cfs_period_us` (-1 = unlimited)."""
    try:
        quota = int((folder / "cpu.cfs_quota_us").read_text())
        period = int((folder / "cpu.cfs_period_us").read_text())
    except (OSError, ValueError):
        return None
    if quota <= 0 or period <= 0:
        return None
    return quota / period


def cpu_quota(cgroup_root: Path = Path("/sys/fs/cgroup"), proc_cgroup: Path = Path("/proc/self/cgroup")) -> int:
    """CPUs this process may use: the cgroup CPU quota (v2, then v1), capped by the CPU affinity mask.

    os.cpu_count() reports the host's cores: a pod limited to 2 CPUs on a 64-core node would start 64 threads
    and be throttled by the CFS scheduler, which is slower than using 2.
    """
    try:
        cpus = len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        cpus = os.cpu_count() or 1
    own = _cgroup_paths(proc_cgroup)
    candidates: list[float | None] = []
    # v2: the process's own cgroup first, then the namespace root a container usually sees.
    if "" in own:
        candidates.append(_read_v2(cgroup_root / own[""].lstrip("/") / "cpu.max"))
    candidates.append(_read_v2(cgroup_root / "cpu.max"))
    # v1: the cpu controller is mounted as cpu, cpu,cpuacct or cpuacct,cpu.
    for mount in ("cpu", "cpu,cpuacct", "cpuacct,cpu"):
        if "cpu" in own:
            candidates.append(_read_v1(cgroup_root / mount / own["cpu"].lstrip("/")))
        candidates.append(_read_v1(cgroup_root / mount))
    quotas = [q for q in candidates if q is not None]
    if quotas:
        cpus = min(cpus, math.ceil(min(quotas)))
    return max(1, cpus)
