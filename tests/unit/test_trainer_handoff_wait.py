"""Ranks 1+ wait for rank 0's compile step outside the training group's timeout, and agree on stop flags
over the CPU control group; two real gloo processes whose collectives time out after 3 s."""

import json
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


def test_ranks_wait_for_rank_0s_compile_longer_than_the_collective_timeout(tmp_path: Path) -> None:
    script = tmp_path / "rank.py"
    script.write_text(RANK)
    common = {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(support.free_port()), "WORLD_SIZE": "2"}
    outputs = support.run_ranks(
        [[sys.executable, str(script)]] * 2, [support.trainer_env(RANK=str(rank), **common) for rank in (0, 1)]
    )
    lines = [json.loads(out.strip().splitlines()[-1]) for out, _ in outputs]
    assert lines == [
        {"rank": 0, "stop": True, "result": {"from": 0}},
        {"rank": 1, "stop": True, "result": {"from": 0}},
    ]
