"""Ranks 1+ wait for rank 0's compile step outside the training group's timeout, and agree on stop flags
over the CPU control group; two real gloo processes whose collectives time out after 3 s."""

import json
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

import trainer_support as support

# Rank 0 "compiles" for longer than every collective may take, then hands its result over.
RANK = textwrap.dedent(
    """
    import datetime, json, sys, time
    from kiln_trainer import distributed

    distributed.TIMEOUT = datetime.timedelta(seconds=3)
    ctx = distributed.setup()
    stop = distributed.any_rank(ctx, ctx.rank == 1)
    if ctx.is_main:
        time.sleep(8)
    result = distributed.after_main(ctx, {"from": ctx.rank} if ctx.is_main else None)
    print(json.dumps({"rank": ctx.rank, "stop": stop, "result": result}))
    distributed.teardown(ctx)
    """
)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_ranks_wait_for_rank_0s_compile_longer_than_the_collective_timeout(tmp_path: Path) -> None:
    script = tmp_path / "rank.py"
    script.write_text(RANK)
    common = {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(_free_port()), "WORLD_SIZE": "2"}
    ranks = [
        subprocess.Popen(
            [sys.executable, str(script)],
            env=support.trainer_env(RANK=str(rank), **common),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for rank in (0, 1)
    ]
    try:
        outputs = [rank.communicate(timeout=300) for rank in ranks]
    finally:
        for rank in ranks:
            rank.kill()
    for rank, (_, stderr) in zip(ranks, outputs, strict=True):
        assert rank.returncode == 0, stderr
    lines = [json.loads(out.strip().splitlines()[-1]) for out, _ in outputs]
    assert lines == [
        {"rank": 0, "stop": True, "result": {"from": 0}},
        {"rank": 1, "stop": True, "result": {"from": 0}},
    ]
