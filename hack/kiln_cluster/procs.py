"""Child processes that never outlive the test run.

Every process starts in its own session, so it and its children form one process group that is signalled
as a whole. Linux's parent-death signal is set to SIGKILL, so it dies with its spawner even if pytest itself
is SIGKILLed; Linux sends it when the spawning *thread* ends, so spawn from a thread that outlives the
process (the main thread does, and so do the node agent's per-pod threads). Every process is recorded in a
registry that an `atexit` hook empties. Output goes to a log file whose tail failure messages can quote.
"""

import atexit
import contextlib
import ctypes
import os
import signal
import subprocess
import threading
import time
from collections.abc import Mapping, Sequence
from pathlib import Path

_PR_SET_PDEATHSIG = 1
_libc = ctypes.CDLL(None, use_errno=True)
_prctl = _libc.prctl  # resolved before any fork: the child runs as little Python as possible


def _die_with_parent() -> None:
    _prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)


class Process:
    """One started command: its log file, its exit status, and a stop that escalates TERM → KILL.

    ``detached`` processes (`make cluster`'s daemons) outlive their spawner: no parent-death signal, no atexit
    kill; whoever stops them later does so by pid (`stop_pid`)."""

    def __init__(
        self,
        name: str,
        argv: Sequence[str],
        log_path: Path,
        env: Mapping[str, str] | None = None,
        cwd: Path | None = None,
        detached: bool = False,
    ) -> None:
        self.name = name
        self.argv = list(argv)
        self.log_path = log_path
        log_path.parent.mkdir(parents=True, exist_ok=True)
        with log_path.open("ab") as log:
            log.write(f"$ {' '.join(self.argv)}\n".encode())
            log.flush()
            self.popen = subprocess.Popen(
                self.argv,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                env=dict(env) if env is not None else None,
                cwd=cwd,
                start_new_session=True,
                preexec_fn=None if detached else _die_with_parent,
            )
        if not detached:
            _register(self)

    @property
    def pid(self) -> int:
        return self.popen.pid

    def poll(self) -> int | None:
        """The exit code once the process has ended, else None."""
        return self.popen.poll()

    def wait(self, timeout: float | None = None) -> int:
        return self.popen.wait(timeout)

    def signal(self, sig: int) -> None:
        """Send `sig` to the whole process group (the process and anything it started)."""
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.popen.pid, sig)

    def stop(self, grace: float = 10.0) -> int:
        """SIGTERM the group, SIGKILL it after `grace` seconds; return the exit code."""
        if self.popen.poll() is None:
            self.signal(signal.SIGTERM)
            try:
                self.popen.wait(grace)
            except subprocess.TimeoutExpired:
                pass
        # Children may linger after the leader exited; the group is killed either way.
        self.signal(signal.SIGKILL)
        code = self.popen.wait()
        _unregister(self)
        return code

    def tail(self, lines: int = 40) -> str:
        """The last lines of the process's log, for failure messages."""
        try:
            text = self.log_path.read_text(errors="replace")
        except OSError:
            return f"(no log at {self.log_path})"
        return f"--- last {lines} lines of {self.log_path} ---\n" + "\n".join(text.splitlines()[-lines:])


_live: set[Process] = set()
_lock = threading.Lock()


def _register(proc: Process) -> None:
    with _lock:
        _live.add(proc)


def _unregister(proc: Process) -> None:
    with _lock:
        _live.discard(proc)


def stop_pid(pid: int, grace: float = 10.0) -> None:
    """SIGTERM the process group led by `pid`, SIGKILL it after `grace` seconds (for detached processes)."""
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pid, signal.SIGTERM)
    deadline = time.monotonic() + grace
    while alive(pid) and time.monotonic() < deadline:
        with contextlib.suppress(ChildProcessError):
            os.waitpid(pid, os.WNOHANG)
        time.sleep(0.1)
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pid, signal.SIGKILL)


def alive(pid: int) -> bool:
    """Whether a process with this pid still exists (zombies count until reaped)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


@atexit.register
def kill_all() -> None:
    """Kill every process group still running; the last line of defence when fixtures did not finalize."""
    with _lock:
        procs = list(_live)
    for proc in procs:
        proc.signal(signal.SIGKILL)
        with contextlib.suppress(Exception):
            proc.popen.wait(5)
        _unregister(proc)
