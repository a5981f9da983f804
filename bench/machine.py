"""What the benchmark numbers depend on: the machine, the versions, the commit, and how busy the machine was.

Read without importing torch or onnxruntime (package versions come from their metadata), so the runner stays
small; used by bench/run.py for the report's header and each table's load line.
"""

import datetime
import importlib.metadata
import os
import platform
import resource
import shlex
import subprocess
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
MAKE_TARGETS = {(): " (`make bench`)", ("--quick",): " (`make bench-quick`)"}


def cpu_model() -> str:
    """The CPU model name, for report headers."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def nproc() -> int:
    """The cores this process may use (its CPU affinity), which is what thread counts should follow."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def _memory() -> str:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                return f"{int(line.split()[1]) / 2**20:.1f} GiB"
    except OSError:
        pass
    return "unknown"


def _version(distribution: str) -> str:
    """The installed version without importing the package (torch alone takes seconds and memory)."""
    for name in (distribution, distribution.replace("-", "_")):
        try:
            return importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            continue
    return "not installed"


def _onnxruntime() -> str:
    gpu = _version("onnxruntime-gpu")
    return f"onnxruntime-gpu {gpu}" if gpu != "not installed" else f"onnxruntime {_version('onnxruntime')}"


def _command(argv: list[str], timeout: float = 10) -> str | None:
    """First line of a command's output, or None when it is missing or fails."""
    try:
        done = subprocess.run(argv, capture_output=True, text=True, timeout=timeout)
    except (OSError, subprocess.SubprocessError):
        return None
    lines = done.stdout.strip().splitlines()
    return lines[0].strip() if done.returncode == 0 and lines else None


def gpu() -> str | None:
    return _command(["nvidia-smi", "--query-gpu=name,memory.total,driver_version", "--format=csv,noheader"])


def _control_plane() -> str:
    folder = os.environ.get("KILN_TEST_BIN", "").strip()
    apiserver = Path(folder) / "kube-apiserver" if folder else None
    if apiserver is None or not apiserver.exists():
        return "not found (KILN_TEST_BIN unset)"
    found = _command([str(apiserver), "--version"]) or "kube-apiserver (version unknown)"
    etcd = _command([str(Path(folder) / "etcd"), "--version"]) or ""
    return f"{found}{', ' + etcd if etcd else ''}"


def _commit() -> str:
    commit = _command(["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"]) or "unknown"
    changed = _command(["git", "-C", str(REPO), "status", "--porcelain"]) is not None
    return commit + (" with uncommitted changes" if changed else "")


def _cpu_times() -> tuple[float, float]:
    """(busy, total) jiffies over every core since boot."""
    fields = [float(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    idle = fields[3] + (fields[4] if len(fields) > 4 else 0.0)  # idle + iowait
    return sum(fields) - idle, sum(fields)


def cpu_seconds(pid: int) -> float | None:
    """User + system CPU time of one process so far (all its threads); None once it is gone."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return None
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def descendants(pid: int) -> list[int]:
    """The processes below `pid` (children, theirs, ...) alive now, from /proc."""
    parents: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            ppid = int(stat.read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, ValueError, IndexError):
            continue
        parents.setdefault(ppid, []).append(int(stat.parent.name))
    found, todo = [], [pid]
    while todo:
        children = parents.get(todo.pop(), [])
        found += children
        todo += children
    return found


def tree_cpu_seconds(pid: int) -> float:
    """CPU time of a process and every process below it: a server that runs helpers (Triton's tritonserver
    and Python-backend stub under PyTriton) is charged for all of them."""
    return sum(cpu_seconds(p) or 0.0 for p in [pid, *descendants(pid)])


def busy_cores(seconds: float) -> float | None:
    """How many cores' worth of CPU the whole machine used over the next `seconds` (others' load, when idle)."""
    try:
        busy0, total0 = _cpu_times()
        time.sleep(seconds)
        busy1, total1 = _cpu_times()
    except (OSError, ValueError, IndexError):
        return None
    return (busy1 - busy0) / max(total1 - total0, 1e-9) * (os.cpu_count() or 1)


def load_average() -> str:
    try:
        return " / ".join(f"{v:.1f}" for v in os.getloadavg())
    except OSError:
        return "n/a"


def describe(quick: bool, argv: list[str], idle_busy: float | None) -> str:
    """Title and the machine description every number below depends on."""
    found_gpu = gpu()
    cores = nproc()
    busy = f"{idle_busy:.1f} of {cores} cores busy over 3 s before the first table" if idle_busy is not None else ""
    rows = [
        ("date", datetime.datetime.now().astimezone().strftime("%Y-%m-%d %H:%M %Z")),
        ("command", f"`{shlex.join(['python', 'bench/run.py', *argv])}`" + MAKE_TARGETS.get(tuple(argv), "")),
        ("cores (nproc)", str(cores)),
        ("CPU", cpu_model()),
        ("memory", _memory()),
        ("GPU", found_gpu or "none"),
        ("OS", f"{platform.system()} {platform.release()} ({platform.machine()})"),
        ("Python", platform.python_version()),
        ("packages", f"torch {_version('torch')}, {_onnxruntime()}, kopf {_version('kopf')}, "
                     f"numpy {_version('numpy')}, starlette {_version('starlette')}, uvicorn {_version('uvicorn')}"),
        ("control plane", _control_plane()),
        ("kiln", f"{_version('kiln')}, commit {_commit()}"),
        ("load average (1/5/15 min) at start", load_average() + (f"; {busy}" if busy else "")),
    ]  # fmt: skip
    lines = [f"# kiln benchmarks{' (quick)' if quick else ''}", "", "| | |", "|---|---|"]
    lines += [f"| {k} | {v} |" for k, v in rows]
    lines += [
        "",
        "Each table ran in its own process, one after another. Absolute times depend on this machine and on",
        "whatever else ran on it (the load lines); the claims are the ratios measured side by side in one run.",
    ]
    return "\n".join(lines) + "\n"


class OthersLoad:
    """Cores that processes outside this run kept busy over an interval: the machine's busy CPU time (/proc/stat)
    minus what this run's children used (getrusage counts a child once it has been waited for)."""

    def __enter__(self) -> "OthersLoad":
        self.began, self.machine, self.ours = time.monotonic(), self._machine(), self._ours()
        self.cores: float | None = None
        return self

    def __exit__(self, *_: object) -> None:
        machine, ours, wall = self._machine(), self._ours(), time.monotonic() - self.began
        if machine is not None and self.machine is not None and wall > 0:
            self.cores = max(0.0, (machine - self.machine) - (ours - self.ours)) / wall

    @staticmethod
    def _machine() -> float | None:
        try:
            return _cpu_times()[0] / os.sysconf("SC_CLK_TCK")
        except (OSError, ValueError, IndexError):
            return None

    @staticmethod
    def _ours() -> float:
        usage = resource.getrusage(resource.RUSAGE_CHILDREN)
        return usage.ru_utime + usage.ru_stime
