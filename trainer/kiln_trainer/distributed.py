"""Data-parallel training across processes or pods, from the usual torch.distributed environment.

torchrun and the operator's Indexed Job both set MASTER_ADDR, MASTER_PORT and WORLD_SIZE; RANK comes from
torchrun or the operator, and an Indexed Job's JOB_COMPLETION_INDEX stands in when RANK is unset. Without
WORLD_SIZE > 1 everything here is a no-op and training runs in one process.
"""

import datetime
import logging
import os
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as dist

from kiln_trainer import errors, watchdog

log = logging.getLogger(__name__)

# Long enough for rank 0 to evaluate and checkpoint a large model while the others wait. A lost peer is
# noticed much sooner, by the heartbeat watchdog (watchdog.py).
TIMEOUT = datetime.timedelta(minutes=30)
_watchdogs: list[watchdog.Watchdog] = []
# How long ranks 1+ wait for rank 0 to compile every variant on its CPU after training (minutes to hours).
HANDOFF_TIMEOUT = datetime.timedelta(hours=12)


@dataclass(frozen=True)
class Context:
    """Who this process is and where it computes."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")
    # gloo groups beside the training one: CPU-side agreement on stop flags (no GPU sync), and the hand-off,
    # whose long timeout covers rank 0's compile step, outside NCCL's watchdog.
    control: dist.ProcessGroup | None = field(default=None, compare=False, repr=False)
    handoff: dist.ProcessGroup | None = field(default=None, compare=False, repr=False)

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        """Rank 0 evaluates, reports, checkpoints and compiles."""
        return self.rank == 0


def _env_int(name: str, default: int | None = None) -> int | None:
    value = os.environ.get(name)
    if value is None or value == "":
        return default
    try:
        return int(value)
    except ValueError:
        raise errors.ConfigError(f"environment: {name}={value!r} is not an integer") from None


def setup() -> Context:
    """Join the process group when WORLD_SIZE > 1 (gloo on CPU, nccl on GPU) and pick the device: the local
    GPU when CUDA is present, else the CPU."""
    world_size = _env_int("WORLD_SIZE", 1) or 1
    rank = _env_int("RANK")
    if rank is None:
        rank = _env_int("JOB_COMPLETION_INDEX", 0) or 0
    local_rank = _env_int("LOCAL_RANK", 0) or 0
    if not 0 <= rank < world_size:
        raise errors.ConfigError(f"environment: RANK {rank} is outside WORLD_SIZE {world_size}")
    if torch.cuda.is_available():
        device = torch.device("cuda", local_rank % torch.cuda.device_count())
        torch.cuda.set_device(device)
    else:
        device = torch.device("cpu")
    if world_size > 1:
        for name in ("MASTER_ADDR", "MASTER_PORT"):
            if not os.environ.get(name):
                raise errors.ConfigError(f"environment: WORLD_SIZE={world_size} but {name} is not set")
        os.environ["RANK"] = str(rank)  # env:// reads it, also when it came from JOB_COMPLETION_INDEX
        backend = "nccl" if device.type == "cuda" else "gloo"
        dist.init_process_group(backend, init_method="env://", rank=rank, world_size=world_size, timeout=TIMEOUT)
        control, handoff = _gloo_group(TIMEOUT), _gloo_group(HANDOFF_TIMEOUT)
        log.info("distributed: rank %d of %d joined (%s, %s)", rank, world_size, backend, device)
        port = int(os.environ["MASTER_PORT"])
        guard = watchdog.Watchdog(rank, world_size, os.environ["MASTER_ADDR"], port, watchdog.peer_timeout())
        _watchdogs.append(guard.start())
        return Context(rank, world_size, local_rank, device, control=control, handoff=handoff)
    return Context(rank=rank, world_size=world_size, local_rank=local_rank, device=device)


def _gloo_group(timeout: datetime.timedelta) -> dist.ProcessGroup:
    """A gloo group of every rank (each rank must create it, in the same order)."""
    group = dist.new_group(backend="gloo", timeout=timeout)
    assert isinstance(group, dist.ProcessGroup)  # every rank is a member
    return group


def teardown(ctx: Context) -> None:
    while _watchdogs:  # first: peers leaving normally must not look lost
        _watchdogs.pop().stop()
    if ctx.enabled and dist.is_initialized():
        dist.destroy_process_group()


def any_rank(ctx: Context, flag: bool) -> bool:
    """True on every rank when it is true on any (a stop request must stop all ranks at the same step).
    Agreed on the CPU over the control group: reading a GPU tensor back would wait for the GPU every step."""
    if not ctx.enabled:
        return flag
    value = torch.tensor([1 if flag else 0], dtype=torch.int32)
    dist.all_reduce(value, op=dist.ReduceOp.MAX, group=ctx.control)
    return bool(value.item() > 0)


def sum_across(ctx: Context, values: torch.Tensor) -> torch.Tensor:
    """Element-wise sum over ranks (for training loss and accuracy counts)."""
    if ctx.enabled:
        values = values.to(ctx.device)
        dist.all_reduce(values, op=dist.ReduceOp.SUM)
    return values


def after_main(ctx: Context, obj: Any) -> Any:
    """Rank 0's ``obj`` on every rank once rank 0 has finished its work alone (the compile step): the others
    wait up to HANDOFF_TIMEOUT on the hand-off group, not in an NCCL barrier whose watchdog would end them
    after TIMEOUT."""
    if not ctx.enabled:
        return obj
    box = [obj if ctx.is_main else None]
    dist.broadcast_object_list(box, src=0, group=ctx.handoff)
    return box[0]


def broadcast(ctx: Context, obj: Any) -> Any:
    """Rank 0's ``obj`` on every rank (decisions only rank 0 can make: stop, resume epoch, final result)."""
    if not ctx.enabled:
        return obj
    box = [obj if ctx.is_main else None]
    dist.broadcast_object_list(box, src=0, device=ctx.device if ctx.device.type == "cuda" else None)
    return box[0]


PEER_FAILURES = ("Connection closed by peer", "Connection reset by peer", "Broken pipe", "Socket Timeout")


def is_peer_failure(err: BaseException) -> bool:
    """Whether a collective failed because a peer went away (not this rank's own bug), so the exit should be
    EXIT_PEER_LOST: the lost peer's failure is the one the Job counts."""
    return isinstance(err, dist.DistError) or any(text in str(err) for text in PEER_FAILURES)
