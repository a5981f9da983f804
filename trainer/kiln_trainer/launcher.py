"""Several trainer processes in one pod, one per local rank, the way torchrun starts them.

The operator gives a pod WORLD_SIZE (pods x processes), LOCAL_WORLD_SIZE (processes per pod) and GROUP_RANK
(the pod's completion index; JOB_COMPLETION_INDEX stands in when it is unset). When LOCAL_WORLD_SIZE > 1 and
no LOCAL_RANK is set yet, `kiln train` is the launcher: it starts LOCAL_WORLD_SIZE copies of itself with
RANK = GROUP_RANK x LOCAL_WORLD_SIZE + LOCAL_RANK and LOCAL_RANK set, and waits. The group lives and dies
together: when one process fails the launcher stops the others and exits with the failing code, so the pod
fails as one and the Job retries it from the last checkpoint (a half-dead pod would leave its peers waiting
on a collective). SIGTERM and SIGINT are passed on, so a suspended or deleted pod checkpoints cleanly.
"""

import logging
import os
import signal
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence
from types import FrameType

from kiln_trainer import errors

log = logging.getLogger(__name__)

# How long the other processes get to stop after one failed (or after a signal) before they are killed.
STOP_GRACE_SECONDS = 30.0
POLL_SECONDS = 0.2


def _int(env: Mapping[str, str], name: str) -> int | None:
    value = env.get(name, "")
    if value == "":
        return None
    try:
        return int(value)
    except ValueError:
        raise errors.ConfigError(f"environment: {name}={value!r} is not an integer") from None


def processes(env: Mapping[str, str]) -> int:
    """How many processes this pod should start: LOCAL_WORLD_SIZE when this process is the launcher, else 1
    (a single process, or one the launcher started, which has LOCAL_RANK)."""
    count = _int(env, "LOCAL_WORLD_SIZE") or 1
    return count if count > 1 and _int(env, "LOCAL_RANK") is None else 1


def rank_env(env: Mapping[str, str], local_rank: int, count: int) -> dict[str, str]:
    """The environment of one local rank: its global RANK, LOCAL_RANK and the unchanged world."""
    group = _int(env, "GROUP_RANK")
    if group is None:
        group = _int(env, "JOB_COMPLETION_INDEX") or 0
    world = _int(env, "WORLD_SIZE") or count
    rank = group * count + local_rank
    if rank >= world:
        raise errors.ConfigError(
            f"environment: RANK {rank} (group {group} x {count} + {local_rank}) >= WORLD_SIZE {world}"
        )
    return {
        **env,
        "RANK": str(rank),
        "LOCAL_RANK": str(local_rank),
        "LOCAL_WORLD_SIZE": str(count),
        "GROUP_RANK": str(group),
        "WORLD_SIZE": str(world),
    }


def launch(args: Sequence[str], count: int, env: Mapping[str, str] | None = None) -> int:
    """Run `python -m kiln_trainer ARGS` once per local rank; the first failure stops the rest."""
    base = dict(os.environ if env is None else env)
    envs = [rank_env(base, local, count) for local in range(count)]  # a bad environment fails before any start
    children = [subprocess.Popen([sys.executable, "-m", "kiln_trainer", *args], env=e) for e in envs]
    log.info("launcher: started %d trainer processes (ranks %s)", count, ", ".join(e["RANK"] for e in envs))

    def forward(signum: int, _frame: FrameType | None) -> None:
        for child in children:
            if child.poll() is None:
                child.send_signal(signum)

    previous = {sig: signal.signal(sig, forward) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        return _wait(children)
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def _wait(children: list[subprocess.Popen[bytes]]) -> int:
    """Wait for every process; after the first non-zero exit stop the others. Returns the pod's exit code."""
    failed: int | None = None
    while any(child.poll() is None for child in children):
        if failed is None:
            failed = next((c.returncode for c in children if c.returncode not in (None, 0)), None)
            if failed is not None:
                log.error("launcher: a trainer process exited with %d; stopping the others", failed)
                _stop(children)
        time.sleep(POLL_SECONDS)
    if failed is None:
        failed = next((int(c.returncode) for c in children if c.returncode != 0), 0)
    return _exit_code(failed)


def _exit_code(code: int) -> int:
    """A child killed by signal N reports -N; a shell-style 128 + N is what the pod should show."""
    return 128 - code if code < 0 else code


def _stop(children: list[subprocess.Popen[bytes]]) -> None:
    for child in children:
        if child.poll() is None:
            child.terminate()
    deadline = time.monotonic() + STOP_GRACE_SECONDS
    for child in children:
        try:
            child.wait(max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            child.kill()
            child.wait()
